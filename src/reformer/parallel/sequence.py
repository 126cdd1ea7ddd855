"""Sequence parallelism: one sequence split across P processes (DESIGN.md 3.1; the scheme
DeepSpeed calls Ulysses).

Each process holds a contiguous slice of the positions (lengths differing by at most one, so
any L >= P works) of both reversible streams. The embedding (with the slice's position
offset), the feed-forward halves, the LayerNorms, the output head and the loss blocks work on
the local slice. Each attention half projects its local slice for a slice of h heads, and an
``all_to_all`` hands every process the whole length for h/P of those heads; the unchanged
attention core (lsh, local, full) runs on them, a second ``all_to_all`` brings the outputs
back to the positions' owners, and W_o is applied locally (:class:`HeadExchange`, in
exchange.py). The reversible stack's attention halves run their forward and their
recomputing backward through the exchange one head slice at a time (the backward replays the
forward's exchanges and sends dL/do out and the gradients back); the plain stack uses the
exchanges as autograd Functions. Rotations are drawn for the whole length (so the number of
buckets is the one-process one) from an RNG stream every process shares, so all hash a head
alike. The loss is the sum over the processes' slices divided by the whole sequence's count
of targets; the label shift crosses slice boundaries because every process holds the whole
(B, L) ids and labels (small next to the streams) and cuts its own targets from the shifted
whole. The weights are replicated: :meth:`SequenceParallelLM.sync_gradients` sums their
gradients over the group after a backward. Checkpoints are the ordinary ones.

Shapes: B batch, L whole length, l a slice's length, H heads, h a head slice, E d_head,
P processes.

Head slices hold a multiple of P heads (``attn_head_chunk_size`` rounded up), so each
process attends with as many heads per slice as one process would. Dropout (hidden and
attention) equals one process's: masks are keyed by global position and by (sequence, head)
(reformer._dropout), with seeds from the shared RNG stream, so each process builds exactly
its part of one process's masks. Limits now: P must divide n_heads; one sequence-parallel
group (no data parallelism over other ranks yet).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from reformer.model import ReformerLM, ReformerOutput, shifted_targets
from reformer.parallel.exchange import HeadExchange
from reformer.reversible import CallInfo


def split_lengths(length: int, parts: int) -> list[int]:
    """Slice lengths of ``length`` positions over ``parts`` processes, the first ones longer
    by one where it does not divide."""
    if length < parts:
        raise ValueError(f"a sequence of {length} tokens cannot be split over {parts} "
                         f"processes (each needs at least one); use at least {parts} tokens "
                         "or fewer processes")
    base, extra = divmod(length, parts)
    return [base + (r < extra) for r in range(parts)]


class SequenceParallelLM(nn.Module):
    """A ReformerLM whose sequences are split across the processes of ``group``.

    Every process calls it with the same whole (B, L) ids (and labels, mask); each computes
    its slice. The returned loss is the whole sequence's (the same on every process); its
    gradient flows only through this process's slice, so call :meth:`sync_gradients` after
    the backward to sum the weights' gradients over the group.
    """

    def __init__(self, model: ReformerLM, group: dist.ProcessGroup | None = None) -> None:
        super().__init__()
        cfg = model.config
        self.model, self.group = model, group
        self.size, self.rank = dist.get_world_size(group), dist.get_rank(group)
        if cfg.n_heads % self.size:
            raise ValueError(f"sequence parallelism over {self.size} processes needs n_heads="
                             f"{cfg.n_heads} divisible by {self.size} (each process attends with "
                             f"its share of the heads); use a number of processes that divides "
                             f"{cfg.n_heads}")

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                labels: torch.Tensor | None = None, n_hashes: int | None = None,
                return_logits: bool = True) -> ReformerOutput:
        """As :meth:`ReformerLM.forward` on the whole (B, L) sequence; ``logits`` are this
        process's slice's, (B, l, V)."""
        model = self.model
        model._check_inputs(input_ids, attention_mask, labels)
        lengths = split_lengths(input_ids.shape[1], self.size)
        start = sum(lengths[:self.rank])
        mine = slice(start, start + lengths[self.rank])
        self._share_rng()
        call = CallInfo(attention_mask=None if attention_mask is None else attention_mask.bool(),
                        n_hashes=n_hashes, owned_grads=labels is not None and not return_logits,
                        exchange=HeadExchange(lengths, self.rank, self.group))
        targets = None if labels is None else shifted_targets(labels)  # (B, L)
        logits, total = model.forward_slice(input_ids[:, mine], start, call,
                                            None if targets is None else targets[:, mine],
                                            return_logits)
        if total is None:
            return ReformerOutput(logits=logits)
        whole = total.detach().clone()
        dist.all_reduce(whole, group=self.group)
        total = total + (whole - total.detach())  # the whole sum; the gradient of this slice's
        return ReformerOutput(logits=logits, loss=total / (targets != -100).sum().clamp(min=1))

    def _share_rng(self) -> None:
        """Give every process rank 0's RNG state, so that all draw the same rotations."""
        state = [torch.get_rng_state()]
        dist.broadcast_object_list(state, src=dist.get_global_rank(self.group, 0)
                                   if self.group is not None else 0, group=self.group)
        torch.set_rng_state(state[0])

    def sync_gradients(self) -> None:
        """Sum every weight's gradient over the group (each process holds its slice's)."""
        grads = [p.grad for p in self.model.parameters() if p.grad is not None]
        if grads:
            flat = torch.cat([g.reshape(-1) for g in grads])
            dist.all_reduce(flat, group=self.group)
            offset = 0
            for g in grads:
                g.copy_(flat[offset:offset + g.numel()].view_as(g))
                offset += g.numel()
