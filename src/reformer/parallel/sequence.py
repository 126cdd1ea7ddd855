"""Sequence parallelism: one sequence split across P processes (DESIGN.md 3.1).

Each process holds a contiguous slice of the positions (lengths differing by at most one, so
any L >= P works) of both reversible streams. The embedding (with the slice's position
offset), the feed-forward halves, the LayerNorms, the output head and the loss blocks work on
the local slice. Attention comes in two forms:

- **LSH layers split by sorted slots** (``lsh_split="rounds"``, the default; rounds.py):
  every process keeps its positions for every head and hashes them; the one-process sorted
  order of each hash round is dealt out in contiguous runs of chunks, each process attends
  its run (with the window's neighbour chunks), and outputs go back to the positions'
  owners, which fold the rounds. Every tensor is O(L/P), and P is not bounded by n_heads.
  This deviates from the issue's head-parallel design for a measured reason: head
  parallelism keeps one head's whole-length working set on every process, so its peak
  cannot go below 0.64x of one process's on 2 (docs/benchmarks.md).
- **The head exchange** (the scheme DeepSpeed calls Ulysses; exchange.py), for local and
  full layers, LSH layers over sequences too short to split (fewer than P * (1 + before +
  after) chunks per round) or with ``dedup_rounds``, and every layer under
  ``lsh_split="heads"``: each attention half projects its local slice for a slice of h heads,
  an ``all_to_all`` hands every process the whole length for h/P of those heads, the
  unchanged attention core runs on them, a second ``all_to_all`` brings the outputs back, and
  W_o is applied locally. The reversible stack's attention halves run their forward and their
  recomputing backward through the exchange one head slice at a time (the backward replays
  the forward's exchanges and sends dL/do out and the gradients back); the plain stack uses
  the exchanges as autograd Functions.

Both forms move rows with ``all_to_all``: through shared memory where every process of the
group is on this machine and the model is on the CPU (shm.py; measured faster than gloo's
loopback sockets, docs/benchmarks.md), else through the group's backend.

Rotations are drawn for the whole length (so the number of buckets is the one-process one)
from an RNG stream every process shares, so all hash a head alike. The loss is the sum over
the processes' slices divided by the whole sequence's count of targets; the label shift
crosses slice boundaries because every process holds the whole (B, L) ids and labels (small
next to the streams) and cuts its own targets from the shifted whole. The weights are
replicated: :meth:`SequenceParallelLM.sync_gradients` sums their gradients over the group
after a backward. Checkpoints are the ordinary ones.

Shapes: B batch, L whole length, l a slice's length, H heads, h a head slice, E d_head,
P processes.

Exchanged head slices hold a multiple of P heads (``attn_head_chunk_size`` rounded up), so
each process attends with as many heads per slice as one process would. Dropout (hidden and
attention) equals one process's: masks are keyed by global position and by (sequence, head)
or sorted chunk (reformer._dropout), with seeds from the shared RNG stream, so each process
builds exactly its part of one process's masks. Limits now: layers that exchange heads need P
to divide n_heads; one sequence-parallel group (no data parallelism over other ranks yet).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from reformer.attention.base import HeadSlicedAttention
from reformer.model import ReformerLM, ReformerOutput, shifted_targets
from reformer.parallel import shm
from reformer.parallel.exchange import HeadExchange
from reformer.parallel.rounds import SplitExchange, even_sizes
from reformer.reversible import CallInfo

LSH_SPLITS = ("rounds", "heads")
TRANSPORTS = ("auto", "shared-memory", "collective")


def split_lengths(length: int, parts: int) -> list[int]:
    """Slice lengths of ``length`` positions over ``parts`` processes, the first ones longer
    by one where it does not divide."""
    if length < parts:
        raise ValueError(f"a sequence of {length} tokens cannot be split over {parts} "
                         f"processes (each needs at least one); use at least {parts} tokens "
                         "or fewer processes")
    return even_sizes(length, parts)


class SequenceParallelLM(nn.Module):
    """A ReformerLM whose sequences are split across the processes of ``group``.

    Every process calls it with the same whole (B, L) ids (and labels, mask); each computes
    its slice. The returned loss is the whole sequence's (the same on every process); its
    gradient flows only through this process's slice, so call :meth:`sync_gradients` after
    the backward to sum the weights' gradients over the group.
    """

    def __init__(self, model: ReformerLM, group: dist.ProcessGroup | None = None,
                 lsh_split: str = "rounds", transport: str = "auto") -> None:
        """``transport``: how the exchanges move rows. "shared-memory" through /dev/shm
        (reformer.parallel.shm: every process on this machine, the model on the CPU),
        "collective" through the group's backend (gloo or NCCL), "auto" the first where it
        applies. Every process of the group must construct it (it is a collective)."""
        super().__init__()
        if lsh_split not in LSH_SPLITS:
            raise ValueError(f"lsh_split={lsh_split!r} is not one of {LSH_SPLITS}: 'rounds' "
                             "splits LSH layers by sorted slots, 'heads' exchanges heads")
        if transport not in TRANSPORTS:
            raise ValueError(f"transport={transport!r} is not one of {TRANSPORTS}")
        self.model, self.group, self.lsh_split = model, group, lsh_split
        self.size, self.rank = dist.get_world_size(group), dist.get_rank(group)
        self.attentions = [m for m in model.modules() if isinstance(m, HeadSlicedAttention)]
        self.shared = self._shared_memory(transport)
        self.transport = "collective" if self.shared is None else "shared-memory"

    def _shared_memory(self, wanted: str) -> shm.SharedMemoryAllToAll | None:
        """The shared-memory transport where asked for and possible, else None."""
        if wanted == "collective":
            return None
        on_cpu = all(p.device.type == "cpu" for p in self.model.parameters())
        if shm.one_machine(self.group, usable=on_cpu):  # the same answer everywhere
            return shm.SharedMemoryAllToAll(self.group)
        if wanted == "shared-memory":
            raise ValueError("transport='shared-memory' needs every process of the group on "
                             "this machine (sharing /dev/shm) and the model on the CPU; use "
                             "transport='collective' (or 'auto')")
        return None

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
        kind = SplitExchange if self.lsh_split == "rounds" else HeadExchange
        exchange = kind(lengths, self.rank, self.group, self.shared)
        self._check_heads(exchange)
        call = CallInfo(attention_mask=None if attention_mask is None else attention_mask.bool(),
                        n_hashes=n_hashes, owned_grads=labels is not None and not return_logits,
                        exchange=exchange)
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

    def _check_heads(self, exchange: HeadExchange) -> None:
        """Layers whose heads are exchanged need n_heads divisible by the processes."""
        exchanged = [a for a in self.attentions if not exchange.splits(a)]
        heads = self.model.config.n_heads
        if exchanged and heads % self.size:
            raise ValueError(
                f"sequence parallelism over {self.size} processes needs n_heads={heads} "
                f"divisible by {self.size} for its {type(exchanged[0]).__name__} layers at "
                f"{exchange.length} tokens (each process attends with its share of the "
                f"heads); use a number of processes that divides {heads}, or all-LSH layers "
                "over sequences long enough to split by sorted slots")

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
