"""ReformerLM: tokens -> logits and next-token loss (DESIGN.md 1.1), on the shared trunk.

    x = Embedding(tokens) + PositionalEmbedding          (B, L, D)
    (y1, y2) = ReversibleStack(x, x)                      (B, L, D) each
    logits = Linear(LayerNorm(concat(y1, y2)))            (B, L, V)

Shapes: B batch, L length, D d_model, V vocab_size, n rows of one loss block.

Decisions:
- ``labels`` are aligned with ``input_ids``; the model shifts them (position t predicts
  labels[t + 1]) and ignores -100. The loss is the mean cross-entropy in nats.
- With ``return_logits=False`` the final LayerNorm, the output projection and the loss are one
  autograd node (:class:`_ChunkedHeadLoss`) that works over blocks of ``loss_chunk_size``
  positions of (y1, y2) and recomputes each block in the backward, so that neither the (L, 2D)
  normalised states nor the (L, V) logits ever exist: at a million tokens, D = 256 and V = 256
  they would be 2 GiB and 1 GiB. Its backward writes dL/dy1 and dL/dy2 into two fresh tensors
  that nothing else holds, which lets the reversible stack reuse their storage
  (``CallInfo.owned_grads``).
- Lengths that are not a multiple of a chunk length need no padding here: each attention
  layer pads internally and masks the padding.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from reformer._dropout import position_dropout
from reformer.attention.base import LayerCache
from reformer.config import ReformerConfig, check_positive_int
from reformer.layers import positional_embedding, row_chunks
from reformer.plan import plan_for
from reformer.reversible import CallInfo, ReversibleStack, _leaf_params


@dataclass
class ReformerOutput:
    """What :meth:`ReformerLM.forward` returns."""

    logits: torch.Tensor | None = None  # (B, L, V)
    loss: torch.Tensor | None = None  # () mean next-token cross-entropy, nats


# A pytree node, so that code which walks a module's outputs for tensors finds the loss and the
# logits in it: DistributedDataParallel with static_graph=True otherwise sees no tensor and
# silently skips the gradient all-reduce.
torch.export.register_dataclass(ReformerOutput, serialized_type_name="reformer.ReformerOutput")


class ReformerTrunk(nn.Module):
    """The shared trunk (DESIGN.md 3.4): embedding, positions, the reversible stack and the
    final LayerNorm(2D); the language model and the heads of heads.py add only their
    projection and loss. A subclass adds its head in ``__init__`` and then calls
    ``self.apply(self._init_weights)``."""

    def __init__(self, config: ReformerConfig) -> None:
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.d_model)
        self.pos = positional_embedding(config)
        self.stack = ReversibleStack(config)
        self.norm = nn.LayerNorm(2 * config.d_model, eps=config.layer_norm_eps)

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, nn.Embedding) and self.config.embed_init_std is not None:
            nn.init.normal_(module.weight, std=self.config.embed_init_std)
        elif isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=self.config.init_std)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def _check_inputs(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                      labels: torch.Tensor | None) -> None:
        cfg = self.config
        if input_ids.dim() != 2 or input_ids.dtype not in (torch.long, torch.int, torch.int16,
                                                            torch.uint8):
            raise ValueError(f"input_ids must be an integer tensor (B, L); got dtype "
                             f"{input_ids.dtype} and shape {tuple(input_ids.shape)}")
        if input_ids.numel() == 0:
            raise ValueError(f"input_ids has shape {tuple(input_ids.shape)}: the batch and the "
                             "length must both be at least 1; pass at least one token per "
                             "sequence")
        length = input_ids.shape[1]
        if length > cfg.max_seq_len:
            raise ValueError(f"sequence length {length} exceeds max_seq_len={cfg.max_seq_len}; "
                             "truncate the input or build the model with a larger max_seq_len")
        for name, t in (("attention_mask", attention_mask), ("labels", labels)):
            if t is not None and t.shape != input_ids.shape:
                raise ValueError(f"{name} has shape {tuple(t.shape)} but input_ids has "
                                 f"{tuple(input_ids.shape)}; they must match")
        if input_ids.is_cuda:  # checked on the device: no host sync in the step
            torch._assert_async(((input_ids >= 0) & (input_ids < cfg.vocab_size)).all(),
                                f"a token id is outside [0, {cfg.vocab_size}) = [0, vocab_size)")
            return
        lo, hi = int(input_ids.min()), int(input_ids.max())
        if lo < 0 or hi >= cfg.vocab_size:
            bad = lo if lo < 0 else hi
            raise ValueError(f"token id {bad} is outside [0, {cfg.vocab_size}) = [0, "
                             "vocab_size); re-encode the input or raise vocab_size")

    def embed_tokens(self, input_ids: torch.Tensor, offset: int = 0) -> torch.Tensor:
        """(B, L) ids at positions offset.. -> (B, L, D) token + position embeddings."""
        x = self.embed(input_ids.long())
        if self.pos is not None:
            x = x + self.pos(input_ids.shape[1], offset).to(x.dtype)
        drop = position_dropout(self.config.dropout if self.training else 0.0,
                                input_ids.shape[1], offset)  # keyed by global position
        return x if drop is None else x * drop.like(x)

    def streams(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                n_hashes: int | None = None, owned_grads: bool = False
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """The stack's outputs (y1, y2), (B, L, D) each, for checked inputs; ``owned_grads``:
        their gradients will be fresh tensors that nothing else holds (the stack may reuse
        their storage)."""
        if n_hashes is not None:
            check_positive_int("n_hashes", n_hashes)
        mask = None if attention_mask is None else attention_mask.bool()
        call = CallInfo(attention_mask=mask, n_hashes=n_hashes, owned_grads=owned_grads)
        return self.stack(self.embed_tokens(input_ids), call)

    def hf_padded(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                  labels: torch.Tensor | None = None) -> tuple:
        """The inputs as Hugging Face's model pads them before its layers (``hf_compat``; else
        unchanged): up to a multiple of the lcm of its layers' chunk lengths, when longer than
        the shortest, with ``pad_token_id`` tokens, masked, without targets (-100 labels)."""
        cfg, (B, L) = self.config, input_ids.shape
        kinds = {cfg.layer_kind(i) for i in range(cfg.n_layers)}
        chunks = [c for kind, c in (("lsh", cfg.chunk_length), ("local", cfg.local_chunk_length))
                  if kind in kinds]
        pad = -L % math.lcm(*chunks) if cfg.hf_compat and chunks and L > min(chunks) else 0
        if not pad:
            return input_ids, attention_mask, labels
        if attention_mask is None:
            attention_mask = torch.ones(B, L, dtype=torch.bool, device=input_ids.device)
        return (F.pad(input_ids, (0, pad), value=cfg.pad_token_id),
                F.pad(attention_mask.bool(), (0, pad), value=False),
                None if labels is None else F.pad(labels, (0, pad), value=-100))


class ReformerLM(ReformerTrunk):
    """A Reformer language model."""

    def __init__(self, config: ReformerConfig) -> None:
        super().__init__(config)
        self.head = nn.Linear(2 * config.d_model, config.vocab_size)
        self.apply(self._init_weights)

    # ------------------------------------------------------------------ incremental decoding
    def new_cache(self, batch: int, capacity: int) -> list[LayerCache]:
        """Empty per-layer caches for decoding up to ``capacity`` positions."""
        if capacity > self.config.max_seq_len:
            raise ValueError(f"cache capacity {capacity} exceeds max_seq_len="
                             f"{self.config.max_seq_len}; decode fewer tokens")
        p = next(self.parameters())
        return [block.f.attn.new_cache(batch, capacity, p.device, p.dtype)
                for block in self.stack.blocks]

    def supports_cache(self) -> bool:
        """Whether incremental decoding applies: causal, and no LSH de-duplication."""
        cfg = self.config
        return cfg.causal and not (cfg.dedup_rounds and "lsh" in cfg.attn_layers)

    @torch.no_grad()
    def prefill(self, input_ids: torch.Tensor, caches: list[LayerCache]) -> torch.Tensor:
        """Run the prompt (B, L), filling ``caches``; return the last position's logits (B, V)."""
        self._check_inputs(input_ids, None, None)
        call = CallInfo(caches=caches)
        y1, y2 = self.stack(self.embed_tokens(input_ids), call, reversible=False)
        return self.head(self.norm(torch.cat([y1[:, -1], y2[:, -1]], dim=-1)))

    @torch.no_grad()
    def step(self, token_ids: torch.Tensor, caches: list[LayerCache]) -> torch.Tensor:
        """Append one token per sequence (B,) after the cached ones; return its logits (B, V).

        Equals the last position of a full forward over the whole prefix when the hashing is
        the same (a fixed ``hash_seed`` and ``n_buckets``; the cache fixes both).
        """
        x = self.embed_tokens(token_ids.view(-1, 1), offset=caches[0].length)  # (B, 1, D)
        x1 = x2 = x
        for block, cache in zip(self.stack.blocks, caches, strict=True):
            x1, x2 = block.step(x1, x2, cache)
        return self.head(self.norm(torch.cat([x1[:, 0], x2[:, 0]], dim=-1)))

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                labels: torch.Tensor | None = None, n_hashes: int | None = None,
                return_logits: bool = True) -> ReformerOutput:
        """Run the model.

        Args:
            input_ids: (B, L) token ids in [0, vocab_size).
            attention_mask: (B, L) bool, True = real token, False = padding.
            labels: (B, L) targets aligned with input_ids (shifted inside), -100 = ignore.
            n_hashes: LSH rounds for this call (default ``config.n_hashes``), e.g. 8 at
                evaluation for a model trained with 2.
            return_logits: also return (B, L, V) logits; False (with labels) computes
                the loss block by block without them (:class:`_ChunkedHeadLoss`).

        Returns:
            ReformerOutput(logits, loss).
        """
        self._check_inputs(input_ids, attention_mask, labels)
        if n_hashes is not None:
            check_positive_int("n_hashes", n_hashes)
        if attention_mask is not None:
            attention_mask = attention_mask.bool()
        length = input_ids.shape[1]
        input_ids, attention_mask, labels = self.hf_padded(input_ids, attention_mask, labels)
        fused_loss = labels is not None and not return_logits
        # The fused loss is then the only consumer of (y1, y2), and its gradients are its own.
        call = CallInfo(attention_mask=attention_mask, n_hashes=n_hashes, owned_grads=fused_loss)
        targets = None if labels is None else shifted_targets(labels)  # (B, L)
        logits, total = self.forward_slice(input_ids, 0, call, targets, return_logits)
        if logits is not None and logits.shape[1] != length:  # hf_compat's padding
            logits = logits[:, :length]
        if total is None:
            return ReformerOutput(logits=logits)
        return ReformerOutput(logits=logits, loss=total / (targets != -100).sum().clamp(min=1))

    def forward_slice(self, input_ids: torch.Tensor, offset: int, call: CallInfo,
                      targets: torch.Tensor | None = None, return_logits: bool = True
                      ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Positions offset.. of a sequence: the whole of it, or, under sequence parallelism
        (reformer.parallel.sequence), this process's slice while others hold the rest.

        Args:
            input_ids: (B, l) the slice's token ids.
            call: the call's settings (its attention mask is the whole sequence's).
            targets: (B, l) the slice's next-token targets (:func:`shifted_targets` of the
                whole labels, sliced), -100 = none.
            return_logits: False (with targets): the loss block by block, no logits.

        Returns:
            ((B, l, V) logits or None, the summed loss of the slice's targets or None).
        """
        y1, y2 = self.stack(self.embed_tokens(input_ids, offset), call)
        if targets is not None and not return_logits:
            chunk = plan_for(y1.device).rows(self.config.loss_chunk_size, self.config.vocab_size)
            total = _ChunkedHeadLoss.apply(y1, y2, targets, self.norm, self.head, chunk,
                                           *self.norm.parameters(), *self.head.parameters())
            return None, total
        logits = self.head(self.norm(torch.cat([y1, y2], dim=-1)))  # (B, l, V)
        if targets is None:
            return logits, None
        return logits, _loss_sum(logits.flatten(0, 1), targets.flatten())


def shifted_targets(labels: torch.Tensor) -> torch.Tensor:
    """(B, L) labels -> (B, L) targets: position t predicts labels[t + 1]; the last, nothing."""
    return F.pad(labels[:, 1:].long(), (0, 1), value=-100)


def _loss_sum(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Summed cross-entropy, computed in at least float32 (bf16 logits are upcast)."""
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    return F.cross_entropy(logits, targets, ignore_index=-100, reduction="sum")


def _block_loss(norm: nn.Module, head: nn.Module, params: dict, y1: torch.Tensor,
                y2: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """(n, D) rows of each stream, (n,) targets -> () summed loss of head(norm(concat))."""
    hidden = functional_call(norm, params["norm"], (torch.cat([y1, y2], dim=-1),))  # (n, 2D)
    return _loss_sum(functional_call(head, params["head"], (hidden,)), targets)  # (n, V) logits


class _ChunkedHeadLoss(torch.autograd.Function):
    """Summed cross-entropy of Linear(LayerNorm(concat(y1, y2))), one block of rows at a time.

    Keeps only (y1, y2) and the targets; the backward recomputes each block on detached
    stand-ins of the parameters (as the reversible stack does), so parameter hooks see each
    total gradient once, and returns dL/dy1, dL/dy2 as two fresh, separate tensors.
    ``params`` (the norm's, then the head's) are inputs only so that autograd hands their
    gradients on; the values are read from the modules.
    """

    @staticmethod
    def forward(ctx, y1, y2, targets, norm, head, chunk, *params):
        ctx.norm, ctx.head, ctx.chunk = norm, head, chunk
        ctx.autocast = (y1.device.type, torch.is_autocast_enabled(y1.device.type),
                        torch.get_autocast_dtype(y1.device.type))
        ctx.save_for_backward(y1, y2, targets)
        real = {"norm": dict(norm.named_parameters()), "head": dict(head.named_parameters())}
        rows1, rows2 = y1.reshape(-1, y1.shape[-1]), y2.reshape(-1, y2.shape[-1])  # (B*L, D)
        t = targets.reshape(-1)  # (B*L,)
        total = None
        for s in row_chunks(t.shape[0], chunk):
            part = _block_loss(norm, head, real, rows1[s], rows2[s], t[s])
            total = part if total is None else total + part
        return total

    @staticmethod
    def backward(ctx, grad_total):
        y1, y2, targets = ctx.saved_tensors
        params = {"norm": _leaf_params(ctx.norm), "head": _leaf_params(ctx.head)}
        leaves = [*params["norm"].values(), *params["head"].values()]
        param_grads = [torch.zeros_like(p) for p in leaves]
        grad_y1 = torch.empty(y1.shape, dtype=y1.dtype, device=y1.device)  # (B, L, D)
        grad_y2 = torch.empty(y2.shape, dtype=y2.dtype, device=y2.device)
        rows1, rows2 = y1.reshape(-1, y1.shape[-1]), y2.reshape(-1, y2.shape[-1])  # (B*L, D)
        g1, g2 = grad_y1.view(-1, y1.shape[-1]), grad_y2.view(-1, y2.shape[-1])
        t = targets.reshape(-1)  # (B*L,); the last position's -100 makes its gradient zero
        device_type, enabled, dtype = ctx.autocast
        with torch.enable_grad(), torch.autocast(device_type, dtype=dtype, enabled=enabled):
            for s in row_chunks(t.shape[0], ctx.chunk):
                a = rows1[s].detach().requires_grad_(True)
                b = rows2[s].detach().requires_grad_(True)
                loss = _block_loss(ctx.norm, ctx.head, params, a, b, t[s])
                g1[s], g2[s], *grads = torch.autograd.grad(loss, [a, b, *leaves], grad_total)
                for total, g in zip(param_grads, grads, strict=True):
                    total += g
                del loss, grads
        return (grad_y1, grad_y2, None, None, None, None, *param_grads)
