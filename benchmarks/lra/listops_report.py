"""ListOps (Long Range Arena) results of finished runs: test accuracy and the curves.

    reformer train --task listops --max-minutes 85 --out runs/listops-lsh
    reformer train --task listops --config benchmarks/lra/listops-full.json \\
        --max-minutes 85 --out runs/listops-full
    python benchmarks/lra/listops_report.py runs/listops-lsh runs/listops-full \\
        --test 2000 --out docs

For each run it scores the newest checkpoint on the first ``--test`` examples of the ListOps
test split (never drawn in training or validation) with ``reformer.training.evaluate``, reads
the validation accuracy after every evaluation from ``metrics.jsonl`` with the wall time it was
reached at, scores two rules that read no expression on the same test examples (the most
frequent class, and the most frequent class of each root operator), writes
``lra-listops.png`` (validation accuracy against minutes, one line per run) and
``lra-listops.json`` into ``--out``, and prints a Markdown table. Two more rules evaluate
only the root's digit arguments (those near either end, and all of them): how far a model
gets that reads the ends of the sequence, or the depth of every token, without evaluating
any nested operator.
"""

from __future__ import annotations

import argparse
import json
import time
from collections import Counter, defaultdict
from pathlib import Path

from reformer.data import listops
from reformer.data.labelled import ListOpsTask
from reformer.training import checkpoint as ckpt
from reformer.training.evaluate import evaluate_head_run
from reformer.training.metrics import MetricsLog

PUBLISHED = {"Transformer (LRA paper)": 36.37, "Reformer (LRA paper)": 37.27}


def baselines(n_test: int, n_fit: int = 5000) -> dict[str, float]:
    """Test accuracy of two rules that read no expression: the most frequent class, and the
    most frequent class of each root operator (both counted on ``n_fit`` training examples).
    """
    by_root: dict[str, Counter] = defaultdict(Counter)
    for i in range(n_fit):
        symbols, value = listops.example(ListOpsTask.DATA_SEED, "train", i)
        by_root[symbols[0]][value] += 1
    overall = sum(by_root.values(), Counter()).most_common(1)[0][0]
    rule = {op: counts.most_common(1)[0][0] for op, counts in by_root.items()}
    majority = root = 0
    for i in range(n_test):
        symbols, value = listops.example(ListOpsTask.DATA_SEED, "test", i)
        majority += value == overall
        root += value == rule[symbols[0]]
    return {f"most frequent class ({overall})": majority / n_test,
            "most frequent class per root operator ("
            + ", ".join(f"{op[1:]} -> {v}" for op, v in sorted(rule.items())) + ")":
            root / n_test}


def _top_digits(symbols: list[str]) -> tuple[list[tuple[int, int]], int]:
    """The root's digit arguments as (token position, digit), and the sequence's length."""
    op, args = listops.parse(symbols)
    position, digits = 1, []
    for arg in args:
        if isinstance(arg, int):
            digits.append((position, arg))
            position += 1
        else:
            position += len(listops.tokens(arg))
    return digits, len(symbols)


def _summary(op: str, digits: list[int]) -> tuple:
    """What a digit argument list says about the root's value: MAX its largest digit, MIN
    its smallest, MED the digits, SM their sum modulo 10 and count."""
    digits = sorted(digits)
    if op == "[MAX":
        return op, digits[-1] if digits else -1
    if op == "[MIN":
        return op, digits[0] if digits else 10
    if op == "[MED":
        return op, tuple(digits)
    return op, sum(digits) % 10, len(digits)


def shallow_rules(n_test: int, n_fit: int = 20000, window: int = 128) -> dict[str, float]:
    """Test accuracy of two rules that evaluate only the root's digit arguments (none of its
    nested operators), fitted as the most frequent value of each case on ``n_fit`` training
    examples: those within ``window`` tokens of either end of the sequence (what a
    classifier that pools both ends of a stack of local attention layers can see), and all
    of them (which needs the nesting depth of every token)."""
    def cases(split: str, n: int):
        for i in range(n):
            symbols, value = listops.example(ListOpsTask.DATA_SEED, split, i)
            digits, length = _top_digits(symbols)
            near = [d for p, d in digits if p < window or p >= length - window]
            yield symbols[0], near, [d for _, d in digits], value

    fitted = {"ends": defaultdict(Counter), "all": defaultdict(Counter)}
    by_root: dict[str, Counter] = defaultdict(Counter)
    for op, near, every, value in cases("train", n_fit):
        fitted["ends"][_summary(op, near)][value] += 1
        fitted["all"][_summary(op, every)][value] += 1
        by_root[op][value] += 1
    right = Counter()
    for op, near, every, value in cases("test", n_test):
        for name, digits in (("ends", near), ("all", every)):
            counts = fitted[name].get(_summary(op, digits), by_root[op])
            right[name] += counts.most_common(1)[0][0] == value
    return {f"the root operator and its digit arguments within {window} tokens of either end":
            right["ends"] / n_test,
            "the root operator and all its digit arguments (needs each token's depth)":
            right["all"] / n_test}


def curve(run_dir: Path) -> list[tuple[int, float, float]]:
    """(step, minutes, validation accuracy) after every evaluation of a run."""
    records = MetricsLog(run_dir / ckpt.METRICS_FILE).read()
    minutes = {r["step"]: r["elapsed_s"] / 60 for r in records if r["kind"] == "train"}
    minutes[0] = 0.0
    return [(r["step"], minutes.get(r["step"], float("nan")), r["val_accuracy"])
            for r in records if r["kind"] == "eval"]


def trained_minutes(run_dir: Path, step: int) -> float:
    """Wall-clock minutes of training up to ``step`` (the last training record at or
    before it)."""
    return max((r["elapsed_s"] for r in MetricsLog(run_dir / ckpt.METRICS_FILE).read()
                if r["kind"] == "train" and r["step"] <= step),
               default=0.0) / 60


def attention(run_dir: Path) -> str:
    return "/".join(ckpt.read_config(run_dir).model.attn_layers)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path, help="ListOps run directories")
    parser.add_argument("--test", type=int, default=2000, help="test examples (default 2000)")
    parser.add_argument("--out", type=Path, default=Path("docs"))
    args = parser.parse_args()
    results = []
    for run_dir in args.runs:
        t0 = time.perf_counter()
        (bits, metrics), = evaluate_head_run(run_dir, "test", n_examples=args.test,
                                             device="cpu").values()
        accuracy = metrics["accuracy"]
        points = curve(run_dir)
        # the scored checkpoint's step: a stopped run's is after its last evaluation
        step = ckpt.latest_checkpoint(run_dir).step
        results.append({"run": run_dir.name, "attention": attention(run_dir),
                        "steps": step, "minutes": round(trained_minutes(run_dir, step), 1),
                        "test_examples": args.test, "test_accuracy": accuracy,
                        "test_bits": bits, "best_val_accuracy": max(p[2] for p in points),
                        "final_val_accuracy": points[-1][2], "curve": points,
                        "eval_seconds": round(time.perf_counter() - t0, 1)})
        print(json.dumps({k: v for k, v in results[-1].items() if k != "curve"}), flush=True)
    rules = {**baselines(args.test), **shallow_rules(args.test)}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "lra-listops.json").write_text(json.dumps({"runs": results, "rules": rules},
                                                          indent=1) + "\n")
    plot(results, args.out / "lra-listops.png")
    print("\n| model | attention | steps | minutes | test accuracy |")
    print("|---|---|---|---|---|")
    for r in results:
        print(f"| ours ({r['run']}) | {r['attention']} | {r['steps']} | {r['minutes']} | "
              f"{100 * r['test_accuracy']:.2f}% |")
    for name, value in rules.items():
        print(f"| rule: {name} | | | | {100 * value:.2f}% |")
    for name, value in PUBLISHED.items():
        print(f"| {name} | | | | {value:.2f}% |")


def plot(results: list[dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4))
    for r in results:
        steps, minutes, accuracy = zip(*r["curve"], strict=True)
        ax.plot(minutes, [100 * a for a in accuracy], marker=".",
                label=f"{r['attention']} (test {100 * r['test_accuracy']:.1f}%)")
    ax.axhline(PUBLISHED["Reformer (LRA paper)"], color="grey", ls="--", lw=1,
               label="LRA paper's best (37.27%)")
    ax.axhline(10, color="grey", ls=":", lw=1, label="chance (10%)")
    ax.set_xlabel("wall-clock minutes (2-core CPU)")
    ax.set_ylabel("validation accuracy (%)")
    ax.set_title("ListOps: validation accuracy during training")
    ax.legend(loc="lower right", fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
