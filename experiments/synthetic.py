"""Reproduce Table 2 of the Reformer paper (the duplication task 0w0w) on a CPU.

Trains the paper's one-layer model four times with the same budget -- full attention, LSH
with 4, 2 and 1 hash rounds -- through ``reformer synthetic train`` (the library's own trainer),
then evaluates every model with full attention and with LSH-8/4/2/1, with the de-duplication
of pairs found by several rounds (``dedup_rounds``) off and on, and writes
``docs/synthetic.md`` with the tables, the settings, the wall times and each run's curve.

Runs go two at a time, each on one thread (the machine has two cores); a run directory that
already holds a finished run is reused, an interrupted one is resumed.

    python experiments/synthetic.py                   # the recorded runs (about an hour)
    python experiments/synthetic.py --steps 20 --out /tmp/syn --docs /tmp/syn-docs  # a check

Two settings by default: chunks of 32 and of 16 over length 256 (|w| = 127). With 16 the
buckets (32) and the share of the sequence a query sees per round (2 chunks = 12.5%) are the
paper's (length 1024, chunks of 64).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from reformer.training import checkpoint as ckpt
from reformer.training.evaluate import evaluate_attentions

TRAINED = ("full", "lsh-4", "lsh-2", "lsh-1")
DEDUP_SUFFIX = "-dedup"
DEDUP_RUN = "lsh-4" + DEDUP_SUFFIX  # LSH-4 trained with dedup_rounds on (one setting)
EVALUATED = ("full", "lsh-8", "lsh-4", "lsh-2", "lsh-1")
NOTES = """\
**Setting.** The paper's one-layer model (d_model = d_ff = 256, 4 heads of 64, shared-QK
attention, causal) on `0 w 0 w` with |w| = 127 (length 256) instead of 511 (length 1024), and
1,500 steps of batch 16 (each run capped at 14 minutes on one core) instead of 150K: AdamW, lr
1e-3, 100 warm-up steps, cosine decay. Every run starts from the same weights (seed 0).
Accuracy counts the 127 symbols of the second copy of w on 64 held-out sequences (the second
separator is not counted: its position is fixed); LSH evaluation uses fixed rotations.
Positions are learned per position (the `synthetic` preset): with the library's default axial
positions (16 x 16) full attention stalled at 82% accuracy, because for some columns the shared
query/key dot product cannot single out the position 127 back; with learned positions it
reaches 100% by step 200. Two hashing settings: chunks of 32 (16 buckets, a query sees 25% of
the sequence per round) and chunks of 16 (32 buckets and 12.5%, the paper's bucket count and
share at length 1024 with chunks of 64).

**Targets.** Full -> Full 100% (>= 99%), LSH-4 -> LSH-8 100% (>= 99%), LSH-1 -> LSH-8 100%
(>= 95%), in both settings.

**Where the table departs from the paper.**
- Full-trained models lose far less when evaluated with LSH: 100 / 100 / 99.9 / 96.1% with
  8 / 4 / 2 / 1 rounds at chunks of 16, against the paper's 94.8 / 92.5 / 76.9 / 52.5%. Even
  one round of 32 buckets rarely separates a query from the key it needs in our model; we did
  not measure why the paper's (4x the length, 100x the steps) is more fragile.
- LSH-trained models evaluated with full attention reach 100%, where the paper reports 0.8%
  (and the published reproduction 46-76%). Here full attention puts its weight on the same
  key that the buckets found, so the LSH-trained weights transfer unchanged.
- The rest follows the paper's pattern: fewer evaluation rounds cost accuracy, most with one
  round (93.7-98.0% at chunks of 16, against 77.9-91.9% in the paper), and 8 rounds recover it
  all; halving the chunk (and window) makes one round cost more.
- `dedup_rounds` (the paper's correction for a key found by several rounds): switching it on
  or off at evaluation changes no accuracy cell and the bits only in the fourth decimal.
  LSH-4 trained with it (chunks of 16; 406 steps in its 14 minutes: with the correction a
  step took about 3.4x as long here) reaches the same 100% with full attention and 8 or 4
  rounds, and 96.1% with one round against 93.7% without it (1,371 steps).
  So neither matches the paper better here; at this accuracy the correction has nothing left
  to change.
"""
PAPER = {  # Kitaev et al. 2020, Table 2 (|w| = 511)
    "full": (100.0, 94.8, 92.5, 76.9, 52.5),
    "lsh-4": (0.8, 100.0, 99.9, 99.4, 91.9),
    "lsh-2": (0.8, 100.0, 99.9, 98.1, 86.8),
    "lsh-1": (0.8, 99.9, 99.6, 94.8, 77.9),
}


def train(name: str, chunk: int, args: argparse.Namespace) -> float:
    """Train (or resume, or reuse) one model; returns the wall time of this call.

    ``name`` is an attention (full, lsh-R), with ``-dedup`` to train with dedup_rounds on.
    """
    out = args.out / f"chunk{chunk}" / name
    dedup = ["--dedup-rounds"] if name.endswith(DEDUP_SUFFIX) else []
    flags = ["--attention", name.removesuffix(DEDUP_SUFFIX), *dedup,
             "--word-length", str(args.word_length),
             "--chunk-length", str(chunk),
             "--steps", str(args.steps), "--max-minutes", str(args.max_minutes),
             "--batch-size", str(args.batch_size), "--lr", str(args.lr),
             "--eval-every", str(args.eval_every), "--eval-windows", str(args.eval_sequences),
             "--seed", str(args.seed), "--device", "cpu", "--out", str(out)]
    if ckpt.has_checkpoint(out):
        if _finished(out):
            return 0.0
        flags = ["--out", str(out), "--resume", "--device", "cpu"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    t0 = time.monotonic()
    with open(out.parent / f"{name}.log", "a") as log:
        subprocess.run([sys.executable, "-m", "reformer", "synthetic", "train", *flags],
                       env=env, stdout=log, stderr=subprocess.STDOUT, check=True)
    return time.monotonic() - t0


def _finished(run_dir: Path) -> bool:
    run = ckpt.read_config(run_dir)
    train = [r for r in _records(run_dir) if r["kind"] == "train"]
    last = train[-1] if train else {}
    return last.get("step", 0) >= run.training.steps or \
        last.get("elapsed_s", 0) >= 60 * (run.training.max_minutes or float("inf")) - 60


def _records(run_dir: Path) -> list[dict]:
    path = run_dir / ckpt.METRICS_FILE
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def evaluate(run_root: Path, args: argparse.Namespace) -> dict:
    """{dedup: {trained: {evaluated: (accuracy %, bits)}}} for the runs under ``run_root``."""
    table = {}
    for dedup in (False, True):
        table[dedup] = {}
        for trained in _trained(run_root):
            results = evaluate_attentions(run_root / trained, EVALUATED, "cpu",
                                          args.eval_sequences, dedup_rounds=dedup)
            table[dedup][trained] = {e: (100 * m["accuracy"], bits)
                                     for e, (bits, m) in results.items()}
    return table


def _row(name: str, cells: list[str]) -> str:
    return f"| {name} | " + " | ".join(cells) + " |"


def _name(attention: str) -> str:
    name = attention.replace("lsh-", "LSH-").replace("full", "Full")
    return name.replace(DEDUP_SUFFIX, ", trained with dedup")


def _trained(run_root: Path) -> list[str]:
    """The runs under ``run_root``: the four of Table 2, and the dedup-trained one if any."""
    return [t for t in (*TRAINED, DEDUP_RUN) if (run_root / t).is_dir()]


HEAD = _row("Train \\ Eval", [_name(e) for e in EVALUATED])
RULE = "|---" * (len(EVALUATED) + 1) + "|"


def setting_section(run_root: Path, chunk: int, table: dict, args: argparse.Namespace,
                    docs: Path) -> list[str]:
    """The tables, runs and settings of one chunk length."""
    config = ckpt.read_config(run_root / TRAINED[0])
    length, nb = config.training.seq_len, 2 * config.training.seq_len // chunk
    lines = [f"## |w| = {args.word_length} (length {length}), chunk length {chunk}: "
             f"{nb} buckets, each query sees {2 * chunk} of {length} positions per round "
             f"({200 * chunk / length:.1f}%)", ""]
    for dedup in (False, True):
        lines += [f"Accuracy (%), evaluated with `dedup_rounds={dedup}`:", "", HEAD, RULE]
        lines += [_row(_name(t), [f"{table[dedup][t][e][0]:.1f}" for e in EVALUATED])
                  for t in _trained(run_root)]
        lines += ["", f"Held-out bits per symbol, `dedup_rounds={dedup}`:", "", HEAD, RULE]
        lines += [_row(_name(t), [f"{table[dedup][t][e][1]:.4f}" for e in EVALUATED])
                  for t in _trained(run_root)]
        lines.append("")
    lines += ["| trained with | steps | wall time | final train loss | curve |",
              "|---|---|---|---|---|"]
    for t in _trained(run_root):
        train = [r for r in _records(run_root / t) if r["kind"] == "train"]
        plot = docs / f"synthetic-chunk{chunk}-{t}.png"
        shutil.copyfile(run_root / t / ckpt.PLOT_FILE, plot)
        lines.append(f"| {t} | {train[-1]['step']} | {train[-1]['elapsed_s'] / 60:.1f} min | "
                     f"{train[-1]['loss']:.4f} nats | ![{t}]({plot.name}) |")
    lines += ["", "Settings: " + json.dumps({
        "word_length": args.word_length, "seq_len": length, "chunk_length": chunk,
        "n_buckets": nb, "batch_size": config.training.batch_size, "lr": config.training.lr,
        "steps": config.training.steps, "max_minutes": config.training.max_minutes,
        "seed": config.training.seed, "eval_sequences": args.eval_sequences,
        "d_model": config.model.d_model, "d_ff": config.model.d_ff,
        "n_heads": config.model.n_heads, "n_layers": config.model.n_layers,
        "pos_embedding": config.model.pos_embedding, "threads_per_run": 1}), ""]
    return lines


def write_doc(args: argparse.Namespace, tables: dict[int, dict]) -> None:
    args.docs.mkdir(parents=True, exist_ok=True)
    lines = ["# Synthetic duplication task (paper Table 2) on a 2-core CPU", "",
             "Generated by `python experiments/synthetic.py`; do not edit by hand.", "",
             NOTES, "", "## The paper's (|w| = 511, length 1024, 150K steps)", "", HEAD, RULE]
    lines += [_row(_name(t), [f"{v:.1f}" for v in PAPER[t]]) for t in TRAINED]
    lines.append("")
    for chunk, table in tables.items():
        lines += setting_section(args.out / f"chunk{chunk}", chunk, table, args, args.docs)
    (args.docs / "synthetic.md").write_text("\n".join(lines))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--word-length", type=int, default=127)
    p.add_argument("--chunk-lengths", type=int, nargs="+", default=[32, 16])
    p.add_argument("--dedup-chunk-lengths", type=int, nargs="*", default=[16],
                   help="settings that also train LSH-4 with dedup_rounds on")
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--max-minutes", type=float, default=14.0)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--eval-every", type=int, default=100)
    p.add_argument("--eval-sequences", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--parallel", type=int, default=2)
    p.add_argument("--out", type=Path, default=Path("runs/synthetic"))
    p.add_argument("--docs", type=Path, default=Path("docs"))
    args = p.parse_args()
    jobs = [(a, c) for c in args.chunk_lengths for a in TRAINED]
    jobs += [(DEDUP_RUN, c) for c in args.dedup_chunk_lengths]
    for chunk in args.chunk_lengths:
        (args.out / f"chunk{chunk}").mkdir(parents=True, exist_ok=True)
    with ThreadPoolExecutor(args.parallel) as pool:
        wall = list(pool.map(lambda job: round(train(*job, args)), jobs))
    print("trained (s this call):", dict(zip(map(str, jobs), wall, strict=True)), flush=True)
    write_doc(args, {c: evaluate(args.out / f"chunk{c}", args) for c in args.chunk_lengths})
    print(f"wrote {args.docs / 'synthetic.md'}")


if __name__ == "__main__":
    main()
