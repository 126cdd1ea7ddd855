"""Does the token embedding's initial std decide whether ListOps's classifier reads the root's
digits? A short probe on crops, minutes per setting instead of an 85-minute run.

    python benchmarks/lra/embedding_probe.py --stds 0.02 0.7 --out docs

Every ListOps example is cut to its first and last ``--edge`` tokens (the root operator and the
root's leading digits; its trailing digits and the final ``]``), which is where the report's
edge rule (38.60% on test, benchmarks/lra/listops_report.py) finds what lifts it above the
root-operator rule (34.20%). For each ``embed_init_std`` given, the ``listops`` preset's trunk
with the classifier of the ninth and tenth runs (``pooling="ends"``, ``width=16``, a hidden
layer of 256) is trained from the same seed on the first ``--examples`` training examples,
once each in a seeded order, in batches of ``--batch-size`` with the trainer's AdamW and its
warm-up and cosine schedule, in float32. The first ``--test`` test examples (cut the same way)
are scored every ``--every`` steps. Sinusoidal positions have unit amplitude: at the trunk's
``init_std`` of 0.02 a token's identity starts as about 3% of its input vector.

Writes ``lra-embedding-probe.json`` (the accuracy curve of each setting) into ``--out`` and
prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from reformer.data import listops
from reformer.heads import ReformerForSequenceClassification
from reformer.presets import LISTOPS_TRUNK
from reformer.training.config import TrainConfig
from reformer.training.optim import build_optimizer, lr_at, set_lr


def crops(split: str, n: int, edge: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The first ``n`` examples of ``split`` as (n, 2 * edge) ids (first and last ``edge``
    tokens; every example has at least 500) and (n,) labels."""
    ids = torch.empty(n, 2 * edge, dtype=torch.long)
    labels = torch.empty(n, dtype=torch.long)
    for i in range(n):
        symbols, value = listops.example(0, split, i)
        tokens = listops.encode(symbols)
        ids[i] = torch.cat([tokens[:edge], tokens[-edge:]])
        labels[i] = value
    return ids, labels


@torch.no_grad()
def accuracy(model: torch.nn.Module, ids: torch.Tensor, labels: torch.Tensor) -> float:
    model.eval()
    right = sum(int((model(ids[i:i + 250]).logits.argmax(-1) == labels[i:i + 250]).sum())
                for i in range(0, len(ids), 250))
    model.train()
    return right / len(ids)


def probe(std: float, data: dict, args: argparse.Namespace) -> list[dict]:
    """One setting's curve: test accuracy after every ``--every`` steps."""
    train_ids, train_labels = data["train"]
    steps = len(train_ids) // args.batch_size
    config = LISTOPS_TRUNK.replace(max_seq_len=2 * args.edge, embed_init_std=std)
    torch.manual_seed(args.seed)
    model = ReformerForSequenceClassification(config, listops.N_CLASSES, pooling="ends",
                                              hidden=256, width=16)
    schedule = TrainConfig(lr=args.lr, steps=steps, warmup_steps=100)
    optimizer = build_optimizer(model, schedule)
    order = torch.randperm(len(train_ids), generator=torch.Generator().manual_seed(args.seed))
    curve, start = [], time.perf_counter()
    for step in range(steps):
        rows = order[step * args.batch_size:(step + 1) * args.batch_size]
        set_lr(optimizer, lr_at(schedule, step))
        loss = F.cross_entropy(model(train_ids[rows]).logits, train_labels[rows])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), schedule.grad_clip)
        optimizer.step()
        if (step + 1) % args.every == 0 or step + 1 == steps:
            point = {"step": step + 1, "examples": (step + 1) * args.batch_size,
                     "test_accuracy": accuracy(model, *data["test"]),
                     "seconds": round(time.perf_counter() - start, 1)}
            curve.append(point)
            print(f"std {std}: {point}", flush=True)
    return curve


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--stds", type=float, nargs="+", default=[0.02, 0.7])
    parser.add_argument("--edge", type=int, default=64, help="tokens kept at each end")
    parser.add_argument("--examples", type=int, default=32000)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--test", type=int, default=2000)
    parser.add_argument("--every", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("."))
    args = parser.parse_args()
    start = time.perf_counter()
    data = {"train": crops("train", args.examples, args.edge),
            "test": crops("test", args.test, args.edge)}
    print(f"cropped {args.examples:,} + {args.test:,} examples in "
          f"{time.perf_counter() - start:.0f} s", flush=True)
    curves = {str(std): probe(std, data, args) for std in args.stds}
    result = {"settings": {k: (str(v) if isinstance(v, Path) else v)
                           for k, v in vars(args).items()},
              "cpu": platform.processor() or platform.machine(),
              "threads": torch.get_num_threads(), "torch": torch.__version__,
              "curves": curves}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "lra-embedding-probe.json").write_text(json.dumps(result, indent=1) + "\n")
    marks = [p["examples"] for p in next(iter(curves.values()))]
    print("\n| embed_init_std | " + " | ".join(f"{m:,} examples" for m in marks) + " |")
    print("| --- |" + " --- |" * len(marks))
    for std, curve in curves.items():
        print(f"| {std} | " + " | ".join(f"{100 * p['test_accuracy']:.2f}%" for p in curve)
              + " |")


if __name__ == "__main__":
    main()
