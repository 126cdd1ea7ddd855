"""What each process of the sequence-parallel tests runs (gloo on the CPU); rank 0 writes the
largest differences from one process on the whole sequence to a JSON file."""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.distributed as dist

TINY = dict(vocab_size=32, d_model=16, n_heads=4, d_ff=32, n_layers=3,
            attn_layers=("lsh", "local", "full"), n_hashes=2, n_buckets=4, chunk_length=4,
            local_chunk_length=4, max_seq_len=64, hash_seed=0, init_std=0.1)
CASES = {  # name: (config overrides, length, call keywords, masked tail)
    "causal": ({}, 30, {}, 0),
    "odd-length": ({}, 23, {}, 0),
    "bidirectional": ({"causal": False}, 26, {}, 0),
    "padded": ({"causal": False}, 26, {}, 5),
    "n_hashes-at-call": ({}, 30, {"n_hashes": 3}, 0),
    "rotations-from-rng": ({"hash_seed": None}, 30, {}, 0),
    "not-reversible": ({"reversible": False}, 22, {}, 0),
    "one-sequence": ({}, 27, {}, 0),  # batch 1: the exchange's no-copy path
    # hidden and attention dropout: keyed masks, each process builds its part of them
    "dropout": ({"dropout": 0.2, "attention_dropout": 0.3}, 30, {}, 0),
    "dropout-bidirectional-padded": ({"dropout": 0.2, "attention_dropout": 0.3,
                                      "causal": False}, 26, {}, 5),
    "dropout-not-reversible": ({"dropout": 0.2, "attention_dropout": 0.3,
                                "reversible": False}, 22, {}, 0),
    # all-LSH stacks long enough that 4 processes split the sorted slots both ways too
    "lsh-bidirectional-padded": ({"attn_layers": ("lsh",), "causal": False, "n_hashes": 3},
                                 61, {}, 7),
    "lsh-dropout-bidirectional": ({"attn_layers": ("lsh",), "causal": False, "dropout": 0.2,
                                   "attention_dropout": 0.3}, 64, {}, 0),
    "lsh-look-ahead": ({"attn_layers": ("lsh",), "causal": False, "n_chunks_after": 1}, 64,
                       {}, 0),
    "lsh-one-head": ({"attn_layers": ("lsh",), "n_heads": 1, "d_head": 16}, 41, {}, 0),
    "lsh-not-reversible": ({"attn_layers": ("lsh",), "reversible": False}, 45, {"n_hashes": 4},
                           0),
}
BATCH = {"one-sequence": 1}  # default 2
# cases also run with lsh_split="heads" (every layer through the head exchange)
HEADS = ("causal", "odd-length", "padded", "dropout", "dropout-not-reversible", "one-sequence")
# cases also run with transport="collective" (gloo's all_to_all; the others default to "auto":
# shared memory, every process being on this machine)
COLLECTIVE = ("causal", "lsh-bidirectional-padded", "not-reversible")


def build(**overrides):
    from reformer import ReformerConfig, ReformerLM

    torch.manual_seed(0)
    return ReformerLM(ReformerConfig(**{**TINY, **overrides})).double().train()


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach(), b.detach()
    return float((a - b).norm() / b.norm().clamp(min=1e-300))


def compare(name: str, rank: int, world: int, lsh_split: str = "rounds",
            transport: str = "auto") -> dict:
    """One case: logits, loss and every gradient against one process, largest relative
    difference of each; ``split`` counts the layers that split LSH by sorted slots,
    ``shared`` whether the exchanges went through shared memory, ``shm_calls`` and
    ``shm_fallbacks`` how many of them did, and how many fell back to gloo."""
    from reformer.parallel import rounds
    from reformer.parallel.rounds import SplitExchange
    from reformer.parallel.sequence import SequenceParallelLM, split_lengths

    # the all-LSH cases attend a chunk per pass (many passes per round), the rest in one
    rounds.SPAN_ROWS = 1 if name.startswith("lsh-") else 1 << 16

    overrides, length, call, masked = CASES[name]
    batch = BATCH.get(name, 2)
    ids = torch.randint(0, TINY["vocab_size"], (batch, length),
                        generator=torch.Generator().manual_seed(length))
    mask = torch.ones(batch, length, dtype=torch.bool)
    if masked:
        mask[1, -masked:] = False
    labels = ids.masked_fill(~mask, -100)
    lengths = split_lengths(length, world)
    start = sum(lengths[:rank])
    mine = slice(start, start + lengths[rank])
    out = {}
    reference = build(**overrides)
    torch.manual_seed(7)
    ref = reference(ids, attention_mask=mask, labels=labels, **call)
    ref.loss.backward()
    model = build(**overrides)
    sp = SequenceParallelLM(model, lsh_split=lsh_split, transport=transport)
    split = SplitExchange(lengths, rank, None)
    out["split"] = 0 if lsh_split == "heads" else sum(split.splits(a) for a in sp.attentions)
    torch.manual_seed(7 if rank == 0 else 100 + rank)  # rank 0's stream is shared
    got = sp(ids, attention_mask=mask, labels=labels, **call)
    out["logits"] = relative(got.logits, ref.logits[:, mine])
    out["loss"] = relative(got.loss.detach(), ref.loss.detach())
    got.loss.backward()
    sp.sync_gradients()
    out["grads"] = max(relative(p.grad, q.grad) for p, q in
                       zip(model.parameters(), reference.parameters(), strict=True))
    # the fused loss (no logits) as training uses it
    model.zero_grad(set_to_none=True)
    torch.manual_seed(7 if rank == 0 else 100 + rank)
    fused = sp(ids, attention_mask=mask, labels=labels, return_logits=False, **call)
    fused.loss.backward()
    sp.sync_gradients()
    out["fused_loss"] = relative(fused.loss.detach(), ref.loss.detach())
    out["fused_grads"] = max(relative(p.grad, q.grad) for p, q in
                             zip(model.parameters(), reference.parameters(), strict=True))
    out["shared"] = int(sp.transport == "shared-memory")
    out["shm_calls"] = 0 if sp.shared is None else sp.shared.calls
    out["shm_fallbacks"] = 0 if sp.shared is None else sp.shared.fallbacks
    return out


def flat_grads(model) -> torch.Tensor:
    return torch.cat([p.grad.reshape(-1) for p in model.parameters()])


def bf16_errors(rank: int, world: int) -> dict:
    """Under bf16 autocast: how far the gradients of one process and of the sequence-parallel
    processes are from float32's (relative norms over every weight), and the losses'
    relative difference. The exchanges compute in other shapes than one process, so bf16
    rounds differently: the bar is one process's own bf16 error."""
    from reformer.parallel.sequence import SequenceParallelLM

    overrides = dict(n_layers=2, attn_layers=("lsh", "local"), d_model=32)
    ids = torch.randint(0, TINY["vocab_size"], (2, 30), generator=torch.Generator().manual_seed(3))
    grads, losses = {}, {}
    for name in ("fp32", "one", "sp"):
        model = build(**overrides).float()
        lm = SequenceParallelLM(model) if name == "sp" else model
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=name != "fp32"):
            loss = lm(ids, labels=ids, return_logits=False).loss
        loss.backward()
        if name == "sp":
            lm.sync_gradients()
        grads[name], losses[name] = flat_grads(model), float(loss)
    far = {n: float((grads[n] - grads["fp32"]).norm() / grads["fp32"].norm()) for n in grads}
    return {"one": far["one"], "sp": far["sp"],
            "loss": abs(losses["sp"] - losses["one"]) / abs(losses["one"])}


def fused_check(rank: int, world: int) -> dict:
    """float32, all-LSH, long enough to split and a multiple of the chunks (no padding mask):
    spans attend in the C++ kernel (as one process does). Relative differences of logits,
    loss and gradients from one process, with the spans in the C++ kernel and in the
    blockwise PyTorch one, and how many split calls took each."""
    from reformer.parallel import rounds
    from reformer.parallel.sequence import SequenceParallelLM, split_lengths

    overrides = dict(attn_layers=("lsh",), causal=False, n_hashes=3)
    ids = torch.randint(0, TINY["vocab_size"], (2, 64), generator=torch.Generator().manual_seed(5))
    torch.manual_seed(7)
    reference = build(**overrides).float()
    ref = reference(ids, labels=ids)
    ref.loss.backward()
    taken = []
    original = rounds.RoundSplit._fused
    out = {}
    # a pass per round, and a pass per chunk (each span then has one query chunk)
    for name, force, span_rows in (("kernel", None, 1 << 16), ("kernel-by-chunk", None, 1),
                                   ("blocks", False, 1 << 16)):
        rounds.SPAN_ROWS = span_rows

        def fused(self, qk, v, force=force):
            taken.append(original(self, qk, v) if force is None else force)
            return taken[-1]
        rounds.RoundSplit._fused = fused
        model = build(**overrides).float()
        sp = SequenceParallelLM(model)
        torch.manual_seed(7 if rank == 0 else 100 + rank)
        got = sp(ids, labels=ids)
        got.loss.backward()
        sp.sync_gradients()
        lengths = split_lengths(64, world)
        start = sum(lengths[:rank])
        mine = slice(start, start + lengths[rank])
        out[name] = {"logits": relative(got.logits, ref.logits[:, mine]),
                     "loss": relative(got.loss, ref.loss),
                     "grads": max(relative(p.grad, q.grad) for p, q in
                                  zip(model.parameters(), reference.parameters(), strict=True)),
                     "fused_calls": sum(taken)}
        taken.clear()
    rounds.RoundSplit._fused, rounds.SPAN_ROWS = original, 1 << 16
    return out


def heads_check(rank: int, world: int) -> dict:
    """n_heads=3 on 2 or 4 processes: a clear error where a layer exchanges heads (local and
    full layers), none where every layer splits by sorted slots (the loss is then finite)."""
    from reformer.parallel.sequence import SequenceParallelLM

    ids = torch.randint(0, TINY["vocab_size"], (1, 48), generator=torch.Generator().manual_seed(1))
    out = {}
    for name, layers in (("mixed", ("lsh", "local")), ("lsh", ("lsh",))):
        sp = SequenceParallelLM(build(n_heads=3, d_head=8, attn_layers=layers))
        try:
            out[name] = float(sp(ids, labels=ids).loss)
        except ValueError as err:
            out[name] = str(err)
    return out


def compute(rank: int, world: int) -> dict:
    """Every case; the worst difference over the processes."""
    results = {name: compare(name, rank, world) for name in CASES}
    results.update({f"heads/{name}": compare(name, rank, world, "heads") for name in HEADS})
    results.update({f"collective/{name}": compare(name, rank, world, transport="collective")
                    for name in COLLECTIVE})
    results["bf16"] = bf16_errors(rank, world)
    fused = fused_check(rank, world)
    results.update({f"fused/{k}": v for k, v in fused.items()})
    results["heads-check"] = heads_check(rank, world)  # the same on every process
    gathered = [None] * world
    dist.all_gather_object(gathered, results)
    return {name: {k: max(g[name][k] for g in gathered) for k in results[name]}
            for name in results}


if __name__ == "__main__":  # python sequence_workers.py RANK WORLD STORE OUT
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    from tests.parallel.launch import worker_main

    worker_main(compute)
