"""Task heads on the shared trunk (DESIGN.md 3.4): masked language modelling and sequence
classification. Each adds one projection and its loss to :class:`reformer.model.ReformerTrunk`
(the language model, :class:`reformer.ReformerLM`, is the third) and computes only what the
loss needs.

    (y1, y2) = trunk(tokens)                                    (B, L, D) each
    masked LM:       logits = Linear(LayerNorm(concat(y1, y2)))  at the masked positions only
    classification:  logits = Linear(pool(LayerNorm(concat(y1, y2))))              (B, C)
                     or, with a hidden layer, Linear(p + W2 ReLU(W1 p + b1) + b2), p = pool(...)

Shapes: B batch, L length, D d_model, V vocab_size, C classes, n masked positions.

Decisions:
- Both heads need the whole sequence on both sides, so they refuse a causal config (build
  the trunk with ``causal=False``).
- The masked-LM loss is the mean cross-entropy over the positions whose label is not -100
  (those :func:`reformer.data.masking.bert_mask` chose): only their n rows of (y1, y2) are
  normalised and projected, never the (L, V) logits.
- Pooling is the mean over real tokens (``attention_mask``; all tokens without one), the
  first token, or both ends: the first and the last real token's states side by side (4D
  wide). A bidirectional trunk of local layers sees a window around each end, so "ends"
  reads what the sequence says at its start and at its close (in ListOps, the root's first
  and last arguments) where "first" reads only the start. With ``width`` K > 1, "ends" reads
  the first K and the last K real tokens, each state projected to SLOT_FEATURES by one shared
  layer first (fed the 4KD features directly, ListOps's head diverged in its warm-up: Adam
  moves each weight by about lr, so logits move by about lr times the fan-in); it did not
  help ListOps in 85 minutes either (docs/lra.md, ninth run). The mean is taken block by block
  by one autograd node that recomputes each block's LayerNorm in its backward
  (:class:`_ChunkedMeanPool`), so no (L, 2D) tensor exists; its backward returns fresh
  dL/dy1, dL/dy2, which the reversible stack may reuse.
- The classifier is linear by default; ``hidden`` > 0 adds one residual ReLU layer of that
  width before it (LRA's classifiers are two-layer MLPs). With "ends" pooling a linear
  classifier adds what the two ends say but cannot combine them: in ListOps the root operator
  sits at the start and the root's last arguments at the close, and the answer depends on
  both at once (the MAX of the closing digits, not their MIN). The layer's output projection
  starts at zero, so training starts from the linear classifier: a plain two-layer MLP head
  (both layers at std 0.02) learned far slower (ListOps, step 800: 2.97 validation bits per
  example against the linear head's 2.58). The residual layer did not help ListOps in 85
  minutes either (docs/lra.md, fifth run: 34.55% against the linear head's 35.15%), so no
  preset uses it. The final projection keeps the name ``head`` either way, so its rows give
  the number of classes in a checkpoint.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from reformer.config import ReformerConfig, check_positive_int, fail, is_int
from reformer.layers import row_chunks
from reformer.model import ReformerOutput, ReformerTrunk
from reformer.reversible import _leaf_params

POOLINGS = ("mean", "first", "ends")
SLOT_FEATURES = 32  # S: what each of the 2K slots of "ends" pooling with K > 1 passes on


def _bidirectional(config: ReformerConfig, what: str) -> None:
    if config.causal:
        fail("causal", True, f"makes {what} see only earlier tokens",
             "build the model with causal=False (and n_chunks_after >= 1 for context from "
             "later chunks)")


class ReformerForMaskedLM(ReformerTrunk):
    """BERT-style masked language modelling: predict the tokens at the masked positions."""

    def __init__(self, config: ReformerConfig) -> None:
        _bidirectional(config, "a masked language model")
        super().__init__(config)
        self.head = nn.Linear(2 * config.d_model, config.vocab_size)
        self.apply(self._init_weights)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                labels: torch.Tensor | None = None,
                n_hashes: int | None = None) -> ReformerOutput:
        """Logits (B, L, V) without labels; with labels (B, L) (-100: not predicted) the mean
        loss over the labelled positions and their logits (n, V) in row-major order."""
        self._check_inputs(input_ids, attention_mask, labels)
        length = input_ids.shape[1]
        input_ids, attention_mask, labels = self.hf_padded(input_ids, attention_mask, labels)
        y1, y2 = self.streams(input_ids, attention_mask, n_hashes)
        if labels is None:
            logits = self.head(self.norm(torch.cat([y1, y2], dim=-1)))
            return ReformerOutput(logits=logits[:, :length])
        chosen = labels != -100  # (B, L)
        hidden = self.norm(torch.cat([y1[chosen], y2[chosen]], dim=-1))  # (n, 2D)
        logits = self.head(hidden)
        if not logits.shape[0]:  # nothing to predict: a zero that keeps the graph
            return ReformerOutput(logits=logits, loss=logits.sum())
        wide = logits.to(torch.promote_types(logits.dtype, torch.float32))
        return ReformerOutput(logits=logits, loss=F.cross_entropy(wide, labels[chosen].long()))


class ReformerForSequenceClassification(ReformerTrunk):
    """One label per sequence from the pooled final states.

    Args:
        config: the trunk (``causal=False``).
        n_classes: C.
        pooling: "mean" (over real tokens), "first" (the first token's state) or "ends"
            (the first and the last ``width`` real tokens' states, concatenated).
        hidden: 0 for a linear classifier, else the width of one residual ReLU layer before
            it (see the module docstring).
        width: with "ends", how many tokens each end gives (K; 1 by default).
    """

    def __init__(self, config: ReformerConfig, n_classes: int, pooling: str = "mean",
                 hidden: int = 0, width: int = 1) -> None:
        _bidirectional(config, "a sequence classifier")
        check_positive_int("n_classes", n_classes)
        if pooling not in POOLINGS:
            fail("pooling", pooling, "is unknown", f"use one of {POOLINGS}")
        if not is_int(hidden) or hidden < 0:
            fail("hidden", hidden, "must be a non-negative integer",
                 "pass 0 for a linear classifier or e.g. 256 for one hidden layer")
        check_positive_int("width", width)
        if width > 1 and pooling != "ends":
            fail("width", width, f"applies to pooling='ends' only (pooling={pooling!r})",
                 "pass width=1 or pooling='ends'")
        super().__init__(config)
        self.n_classes, self.pooling, self.width = n_classes, pooling, width
        features = (4 if pooling == "ends" else 2) * config.d_model
        if width > 1:  # each slot's state shrinks first, so the head's fan-in stays 2K * S
            self.slots = nn.Linear(2 * config.d_model, SLOT_FEATURES)
            features = 2 * width * SLOT_FEATURES
        self.hidden = _ResidualReLU(features, hidden) if hidden else nn.Identity()
        self.head = nn.Linear(features, n_classes)
        self.apply(self._init_weights)
        if hidden:
            nn.init.zeros_(self.hidden.outer.weight)  # starts as the linear classifier

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                labels: torch.Tensor | None = None,
                n_hashes: int | None = None) -> ReformerOutput:
        """Logits (B, C) and, with labels (B,) in [0, C), the mean cross-entropy."""
        self._check_inputs(input_ids, attention_mask, None)
        if labels is not None and (labels.shape != input_ids.shape[:1]
                                   or int(labels.min()) < 0
                                   or int(labels.max()) >= self.n_classes):
            raise ValueError(f"labels must be (B,) = {tuple(input_ids.shape[:1])} class ids "
                             f"in [0, {self.n_classes}); got shape {tuple(labels.shape)}")
        # hf_compat's padding is masked: it adds no pooled token
        input_ids, attention_mask, _ = self.hf_padded(input_ids, attention_mask)
        y1, y2 = self.streams(input_ids, attention_mask, n_hashes,
                              owned_grads=self.pooling == "mean")
        if self.pooling == "first":
            pooled = self.norm(torch.cat([y1[:, 0], y2[:, 0]], dim=-1))  # (B, 2D)
        elif self.pooling == "ends":
            pooled = self._ends(y1, y2, _last_real(input_ids, attention_mask))
        else:
            weights = _mean_weights(input_ids, attention_mask, y1.dtype)
            pooled = _ChunkedMeanPool.apply(y1, y2, weights, self.norm,
                                            self.config.loss_chunk_size, *self.norm.parameters())
        logits = self.head(self.hidden(pooled))  # (B, C)
        wide = logits.to(torch.promote_types(logits.dtype, torch.float32))  # bf16 -> fp32
        loss = None if labels is None else F.cross_entropy(wide, labels.long())
        return ReformerOutput(logits=logits, loss=loss)

    def _ends(self, y1: torch.Tensor, y2: torch.Tensor, last: torch.Tensor) -> torch.Tensor:
        """The normalised states of positions 0..K-1 and last-K+1..last, in that order, as
        one row each: (B, 4D) for K = 1, else each slot projected to S features first,
        (B, 2KS); a slot outside a sequence shorter than K is zeros."""
        offsets = torch.arange(self.width, device=y1.device)
        slots = torch.cat([offsets.expand(len(last), -1),
                           last[:, None] - self.width + 1 + offsets], dim=1)  # (B, 2K)
        inside = (slots >= 0) & (slots <= last[:, None])
        index = slots.clamp(min=0).minimum(last[:, None])[..., None]  # (B, 2K, 1)
        picked = [y.gather(1, index.expand(-1, -1, y.shape[-1])) for y in (y1, y2)]
        states = self.norm(torch.cat(picked, dim=-1))  # (B, 2K, 2D)
        if self.width > 1:
            states = self.slots(states)  # (B, 2K, S)
        return (states * inside[..., None]).flatten(1)


class _ResidualReLU(nn.Module):
    """x + outer(ReLU(inner(x))): the classifier's optional hidden layer."""

    def __init__(self, width: int, hidden: int) -> None:
        super().__init__()
        self.inner, self.outer = nn.Linear(width, hidden), nn.Linear(hidden, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.outer(F.relu(self.inner(x)))


def _last_real(input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
    """(B,) the index of each sequence's last real token (L - 1 without a mask)."""
    length = input_ids.shape[1]
    if attention_mask is None:
        return torch.full(input_ids.shape[:1], length - 1, device=input_ids.device)
    real = attention_mask.bool()
    if not bool(real.any(dim=1).all()):
        raise ValueError("a sequence has no real token (its attention_mask is all False); "
                         "pooling='ends' reads its last one")
    return length - 1 - real.flip(1).int().argmax(dim=1)


def _mean_weights(input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                  dtype: torch.dtype) -> torch.Tensor:
    """(B, L) weights 1/count over each sequence's real tokens, 0 on padding."""
    real = (torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None
            else attention_mask.bool())
    if not bool(real.any(dim=1).all()):
        raise ValueError("a sequence has no real token (its attention_mask is all False); "
                         "mean pooling needs at least one")
    real = real.to(dtype)
    return real / real.sum(dim=1, keepdim=True)


class _ChunkedMeanPool(torch.autograd.Function):
    """``sum_t w[b, t] LayerNorm(concat(y1, y2))[b, t]`` -> (B, 2D), a block of positions at
    a time; the backward recomputes each block on detached stand-ins of the norm's parameters
    and returns fresh dL/dy1, dL/dy2 (as model.py's chunked loss does)."""

    @staticmethod
    def forward(ctx, y1, y2, weights, norm, chunk, *params):
        ctx.norm, ctx.chunk = norm, chunk
        ctx.save_for_backward(y1, y2, weights)
        pooled = y1.new_zeros(y1.shape[0], 2 * y1.shape[-1])
        for s in row_chunks(y1.shape[1], chunk):
            hidden = norm(torch.cat([y1[:, s], y2[:, s]], dim=-1))  # (B, l, 2D)
            pooled += torch.einsum("bl,bld->bd", weights[:, s], hidden)
        return pooled

    @staticmethod
    def backward(ctx, grad_pooled):
        y1, y2, weights = ctx.saved_tensors
        params = _leaf_params(ctx.norm)
        param_grads = [torch.zeros_like(p) for p in params.values()]
        grad_y1, grad_y2 = torch.empty_like(y1), torch.empty_like(y2)
        D = y1.shape[-1]
        with torch.enable_grad():
            for s in row_chunks(y1.shape[1], ctx.chunk):
                joined = torch.cat([y1[:, s], y2[:, s]], dim=-1).detach().requires_grad_(True)
                hidden = functional_call(ctx.norm, params, (joined,))
                part = torch.einsum("bl,bld->bd", weights[:, s], hidden)
                g, *grads = torch.autograd.grad(part, [joined, *params.values()], grad_pooled)
                grad_y1[:, s], grad_y2[:, s] = g[..., :D], g[..., D:]
                for total, gp in zip(param_grads, grads, strict=True):
                    total += gp
        return (grad_y1, grad_y2, None, None, None, *param_grads)


def build_model(config: ReformerConfig, head: str = "lm", n_classes: int = 0,
                pooling: str = "mean", head_hidden: int = 0, pool_width: int = 1) -> nn.Module:
    """The model a task trains (``Task.head``): the language model, the masked language
    model, a classifier of ``n_classes`` with ``pooling`` (``pool_width`` tokens from each end
    for "ends"; and a hidden layer of ``head_hidden`` if > 0), or an encoder-decoder whose
    encoder and decoder both take ``config``'s shape."""
    if head == "lm":
        from reformer.model import ReformerLM
        return ReformerLM(config)
    if head == "mlm":
        return ReformerForMaskedLM(config)
    if head == "classify":
        return ReformerForSequenceClassification(config, n_classes, pooling, head_hidden,
                                                 pool_width)
    if head == "seq2seq":
        from reformer.encoder_decoder import ReformerEncoderDecoder
        return ReformerEncoderDecoder.from_config(config)
    fail("head", head, "is unknown", "use lm, mlm, classify or seq2seq")
    raise AssertionError  # fail raises
