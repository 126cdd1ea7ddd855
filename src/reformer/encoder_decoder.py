"""Encoder-decoder Reformer (DESIGN.md 3.4; the Reformer paper's translation setup, trax's
``Reformer``): a bidirectional reversible encoder (:class:`reformer.model.ReformerTrunk`), and
a causal reversible decoder whose layers add dense cross-attention to the encoder's output
(reformer.decoder, where the decoder's layers and their reversibility are described).

    m = LayerNorm(concat(Encoder(src)))                      (B, S, 2De)  the memory
    logits = Decoder(tgt, m)                                 (B, T, V)

Shapes: B batch, S source length, T target length, De the encoder's d_model, V the decoder's
vocab_size.

Decisions:
- The memory is the encoder trunk's own final LayerNorm of concat(y1, y2), width 2De, read
  directly by each decoder layer's W_k and W_v (2De -> H*E): no extra projection, and the
  encoder's and decoder's widths may differ.
- ``labels`` are aligned with ``decoder_input_ids`` and shifted inside, as ReformerLM's:
  position t predicts labels[t + 1]. Typically decoder_input_ids = labels = [bos, y_1..y_n].
- Decoding encodes once and projects each layer's k, v once (:meth:`new_cache`); a step runs
  one position with the self-attention caches of reformer.attention (see generation.py for
  when LSH layers make that exact). :func:`translate_batch` decodes many sources, one batch
  per source length, so that a batch computes what each source alone would.
"""

from __future__ import annotations

import torch
from torch import nn

from reformer.config import ReformerConfig, check_positive_int, fail
from reformer.decoder import DecoderCache, ReformerDecoder, memory_bias
from reformer.generation import _draw, _global_rng_seeded, check_filters, filter_logits
from reformer.model import (
    ReformerOutput,
    ReformerTrunk,
    _ChunkedHeadLoss,
    _loss_sum,
    shifted_targets,
)
from reformer.plan import plan_for
from reformer.reversible import CallInfo


def _check_configs(encoder: ReformerConfig, decoder: ReformerConfig,
                   cross_chunk_size: int) -> None:
    if encoder.causal:
        fail("encoder.causal", True, "would let each source token see only earlier ones",
             "build the encoder config with causal=False (and n_chunks_after >= 1)")
    if not decoder.causal:
        fail("decoder.causal", False, "would let each target position see later targets",
             "build the decoder config with causal=True")
    for name, config in (("encoder", encoder), ("decoder", decoder)):
        if config.hf_compat:
            fail(f"{name}.hf_compat", True, "is not supported by the encoder-decoder",
                 "build it with hf_compat=False")
    check_positive_int("cross_chunk_size", cross_chunk_size)


class ReformerEncoderDecoder(nn.Module):
    """A Reformer encoder-decoder (see the module docstring).

    Args:
        encoder: the encoder's config (``causal=False``).
        decoder: the decoder's config (``causal=True``); its vocabulary is the output's.
        cross_chunk_size: target positions per chunk of the cross-attention.
    """

    def __init__(self, encoder: ReformerConfig, decoder: ReformerConfig,
                 cross_chunk_size: int = 256) -> None:
        _check_configs(encoder, decoder, cross_chunk_size)
        super().__init__()
        self.encoder = ReformerTrunk(encoder)
        self.decoder = ReformerDecoder(decoder, 2 * encoder.d_model, cross_chunk_size)
        self.encoder.apply(self.encoder._init_weights)
        self.decoder.apply(self.decoder._init_weights)

    @classmethod
    def from_config(cls, config: ReformerConfig, cross_chunk_size: int = 256
                    ) -> ReformerEncoderDecoder:
        """Encoder and decoder of one shape: ``config`` read both ways (``causal=False``,
        looking at least one chunk ahead) for the encoder and causally for the decoder; the
        training CLI's ``--task seq2seq`` builds its model so."""
        ahead = max(1, config.n_chunks_after)
        encoder = config.replace(causal=False, n_chunks_after=ahead)
        decoder = config.replace(causal=True, n_chunks_after=0, local_n_chunks_after=(
            None if config.local_n_chunks_after is None else 0))
        return cls(encoder, decoder, cross_chunk_size)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def _check_source(self, input_ids: torch.Tensor,
                      attention_mask: torch.Tensor | None) -> torch.Tensor | None:
        """Checked source inputs; returns the mask as bool."""
        self.encoder._check_inputs(input_ids, attention_mask, None)
        if attention_mask is None:
            return None
        mask = attention_mask.bool()
        if not bool(mask.any(dim=1).all()):
            raise ValueError("a source sequence has no real token (its attention_mask row is "
                             "all False); give every sequence at least one unmasked token")
        return mask

    def _memory(self, input_ids: torch.Tensor, mask: torch.Tensor | None,
                n_hashes: int | None = None) -> torch.Tensor:
        y1, y2 = self.encoder.streams(input_ids, mask, n_hashes)
        return self.encoder.norm(torch.cat([y1, y2], dim=-1))  # (B, S, 2De)

    def encode(self, input_ids: torch.Tensor,
               attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """(B, S) source ids (and (B, S) bool mask, True = real) -> (B, S, 2De) memory."""
        return self._memory(input_ids, self._check_source(input_ids, attention_mask))

    def forward(self, input_ids: torch.Tensor, decoder_input_ids: torch.Tensor,
                attention_mask: torch.Tensor | None = None,
                decoder_attention_mask: torch.Tensor | None = None,
                labels: torch.Tensor | None = None, return_logits: bool = True,
                n_hashes: int | None = None) -> ReformerOutput:
        """Run the model.

        Args:
            input_ids: (B, S) source ids.
            decoder_input_ids: (B, T) target ids, e.g. [bos, y_1, ..., y_n].
            attention_mask: (B, S) bool, True = real source token.
            decoder_attention_mask: (B, T) bool, True = real target token.
            labels: (B, T) aligned with decoder_input_ids (shifted inside), -100 = ignore.
            return_logits: also return the logits; False (with labels) computes the loss
                block by block without them.
            n_hashes: LSH rounds of every LSH layer, encoder and decoder, for this call
                (default: each config's ``n_hashes``).

        Returns:
            ReformerOutput(logits (B, T, V) or None, mean next-token loss or None).
        """
        mask = self._check_source(input_ids, attention_mask)
        try:
            self.decoder.check_inputs(decoder_input_ids, decoder_attention_mask, labels)
        except ValueError as e:  # the trunk's messages, in this method's argument names
            raise ValueError(str(e).replace("attention_mask", "decoder_attention_mask")
                             .replace("input_ids", "decoder_input_ids")) from None
        if decoder_input_ids.shape[0] != input_ids.shape[0]:
            raise ValueError(f"input_ids has batch size {input_ids.shape[0]} but "
                             f"decoder_input_ids has {decoder_input_ids.shape[0]}; pass one "
                             "target sequence per source sequence")
        memory = self._memory(input_ids, mask, n_hashes)
        fused = labels is not None and not return_logits  # then its gradients are its own
        call = CallInfo(attention_mask=None if decoder_attention_mask is None
                        else decoder_attention_mask.bool(), n_hashes=n_hashes,
                        owned_grads=fused)
        dec = self.decoder
        y1, y2 = dec.streams(decoder_input_ids, memory, memory_bias(mask, memory.dtype), call)
        targets = None if labels is None else shifted_targets(labels)  # (B, T)
        count = None if labels is None else (targets != -100).sum().clamp(min=1)
        if fused:
            chunk = plan_for(y1.device).rows(dec.config.loss_chunk_size, dec.config.vocab_size)
            total = _ChunkedHeadLoss.apply(y1, y2, targets, dec.norm, dec.head, chunk,
                                           *dec.norm.parameters(), *dec.head.parameters())
            return ReformerOutput(loss=total / count)
        logits = dec.head(dec.norm(torch.cat([y1, y2], dim=-1)))  # (B, T, V)
        if labels is None:
            return ReformerOutput(logits=logits)
        return ReformerOutput(logits=logits,
                              loss=_loss_sum(logits.flatten(0, 1), targets.flatten()) / count)

    # ------------------------------------------------------------------ incremental decoding
    @torch.no_grad()
    def new_cache(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                  capacity: int) -> DecoderCache:
        """Encode the source (B, S) once and project every layer's cross-attention k, v; with
        empty self-attention caches for ``capacity`` target positions."""
        check_positive_int("capacity", capacity)
        if capacity > self.decoder.config.max_seq_len:
            raise ValueError(f"cache capacity {capacity} exceeds the decoder's max_seq_len="
                             f"{self.decoder.config.max_seq_len}; decode fewer tokens")
        mask = self._check_source(input_ids, attention_mask)
        memory = self._memory(input_ids, mask)
        return DecoderCache(
            bias=memory_bias(mask, memory.dtype),
            cross=[layer.cross.keys_values(memory) for layer in self.decoder.layers],
            layers=[layer.f.attn.new_cache(input_ids.shape[0], capacity, memory.device,
                                           memory.dtype) for layer in self.decoder.layers])

    @torch.no_grad()
    def step(self, token_ids: torch.Tensor, cache: DecoderCache) -> torch.Tensor:
        """Append one target token per sequence (B,); return its next-token logits (B, V)."""
        dec = self.decoder
        x = dec.embed_tokens(token_ids.view(-1, 1), offset=cache.length)  # (B, 1, D)
        x1 = x2 = x
        for layer, past, (k, v) in zip(dec.layers, cache.layers, cache.cross, strict=True):
            x1, x2 = layer.step(x1, x2, past, k, v, cache.bias)
        return dec.head(dec.norm(torch.cat([x1[:, 0], x2[:, 0]], dim=-1)))

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, max_new_tokens: int, bos_id: int,
                 attention_mask: torch.Tensor | None = None, *, do_sample: bool = False,
                 temperature: float = 1.0, top_k: int | None = None,
                 top_p: float | None = None, generator: torch.Generator | None = None
                 ) -> torch.Tensor:
        """Decode ``max_new_tokens`` target tokens after ``bos_id`` for each source (B, S),
        greedily or (``do_sample``) by sampling with ``temperature``, ``top_k`` and ``top_p``
        from ``generator``; with the caches. Call ``eval()`` first (dropout stays on otherwise).

        Returns:
            (B, max_new_tokens) token ids, without the bos.
        """
        check_positive_int("max_new_tokens", max_new_tokens)
        vocab = self.decoder.config.vocab_size
        if not isinstance(bos_id, int) or not 0 <= bos_id < vocab:
            fail("bos_id", bos_id, f"is not a token id in [0, {vocab})",
                 "pass the decoder vocabulary's start token")
        check_filters(temperature, top_k, top_p)
        cache = self.new_cache(input_ids, attention_mask, capacity=max_new_tokens)
        token = torch.full((input_ids.shape[0],), bos_id, dtype=torch.long,
                           device=input_ids.device)
        out = []
        for _ in range(max_new_tokens):
            logits = self.step(token, cache)  # (B, V)
            if do_sample:
                token = torch.stack([torch.multinomial(
                    filter_logits(row, temperature, top_k, top_p), 1, generator=generator)[0]
                    for row in logits])
            else:
                token = logits.argmax(dim=-1)
            out.append(token)
        return torch.stack(out, dim=1)


@torch.no_grad()
def translate_batch(model: ReformerEncoderDecoder, sources: list[torch.Tensor],
                    max_new_tokens: int, bos_id: int, eos_id: int | None = None, *,
                    n_per_source: int = 1, temperature: float = 1.0, top_k: int | None = None,
                    top_p: float | None = None, greedy: bool = False, seed: int = 0
                    ) -> list[list[int]]:
    """``n_per_source`` target sequences for each of ``sources`` ((S,) ids, lengths may
    differ), decoded with the caches, in one batch per source length.

    Sources of one length need no padding, so each batch computes what one source alone
    would (with LSH encoders the bucket count follows the length): with the same ``seed``,
    sequence k (source-major: sample j of source i at i * n_per_source + j) draws from
    ``torch.Generator().manual_seed(seed + k)`` and the global RNG (LSH rotations without
    ``hash_seed``) is seeded with ``seed`` for each batch, so its tokens equal those of the
    source decoded alone as sequence 0 with seed ``seed + k``. A sequence ends at ``eos_id``
    (not returned) or after ``max_new_tokens``.

    Returns:
        len(sources) * n_per_source lists of target ids, without bos and eos.
    """
    check_positive_int("max_new_tokens", max_new_tokens)
    check_positive_int("n_per_source", n_per_source)
    check_filters(temperature, top_k, top_p)
    vocab = model.decoder.config.vocab_size
    for name, token in (("bos_id", bos_id), ("eos_id", eos_id)):
        if token is not None and (not isinstance(token, int) or not 0 <= token < vocab):
            fail(name, token, f"is not a token id in [0, {vocab})",
                 "pass a token of the decoder's vocabulary")
    if not sources or any(s.dim() != 1 or not len(s) for s in sources):
        raise ValueError("sources must be a non-empty list of non-empty (S,) id tensors")
    rows = [s for s in sources for _ in range(n_per_source)]
    device = next(model.parameters()).device
    groups: dict[int, list[int]] = {}
    for k, source in enumerate(rows):
        groups.setdefault(len(source), []).append(k)
    out: list[list[int]] = [[] for _ in rows]
    for group in groups.values():
        with _global_rng_seeded(seed, device):
            generators = [torch.Generator().manual_seed(seed + k) for k in group]
            batch = torch.stack([rows[k] for k in group]).to(device)
            cache = model.new_cache(batch, None, capacity=max_new_tokens)
            token = torch.full((len(group),), bos_id, dtype=torch.long, device=device)
            done = [False] * len(group)
            for _ in range(max_new_tokens):
                logits = model.step(token, cache)  # (b, V)
                drawn = (logits.argmax(dim=-1).tolist() if greedy
                         else _draw(logits, (temperature, top_k, top_p), generators))
                for i, (k, t) in enumerate(zip(group, drawn, strict=True)):
                    done[i] = done[i] or t == eos_id
                    if not done[i]:
                        out[k].append(t)
                if all(done):
                    break
                token = torch.tensor(drawn, dtype=torch.long, device=device)
    return out
