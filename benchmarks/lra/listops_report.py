"""ListOps (Long Range Arena) results of finished runs: test accuracy and the curves.

    reformer train --task listops --max-minutes 85 --out runs/listops-lsh
    reformer train --task listops --config benchmarks/lra/listops-full.json \\
        --max-minutes 85 --out runs/listops-full
    python benchmarks/lra/listops_report.py runs/listops-lsh runs/listops-full \\
        --test 2000 --out docs

For each run it scores the newest checkpoint on the first ``--test`` examples of the ListOps
test split (never drawn in training or validation) with the forwards ``reformer eval`` runs
(``reformer.training.metrics.classify_examples``: the same batches and seeds), once with the
hash rounds it trained with, and for LSH runs also with each of ``--more-hashes``; it reads
the validation accuracy after every evaluation from ``metrics.jsonl`` with the wall time it was
reached at, scores two rules that read no expression on the same test examples (the most
frequent class, and the most frequent class of each root operator), writes
``lra-listops.png`` (validation accuracy, and validation bits per example, against minutes,
one line per run) and ``lra-listops.json`` into ``--out``, and prints a Markdown table. Both
panels mark the root-operator rule on the same validation examples: beating the rule there,
not a validation accuracy, is the sign that a model reads more than the root operator. Three
more rules evaluate only the root's digit arguments (the runs of digits at either end, those
near either end, and all of them): how far a model gets that reads the ends of the sequence,
or the depth of every token, without evaluating any nested operator. Each run after the first
is compared with the first example by example (``paired_with_first``: the difference in
accuracy and its paired standard error), since all score the same test examples.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import time
from collections import Counter, defaultdict
from pathlib import Path

from reformer.data import listops
from reformer.data.labelled import ListOpsTask
from reformer.data.task import build_task
from reformer.training import checkpoint as ckpt
from reformer.training.metrics import MetricsLog, classify_examples

PUBLISHED = {"Transformer (LRA paper)": 36.37, "Reformer (LRA paper)": 37.27}


@functools.cache  # the report asks for it three times (both splits, and the test table)
def _root_counts(n_fit: int) -> dict[str, Counter]:
    """The classes of each root operator, counted on the first ``n_fit`` training examples."""
    by_root: dict[str, Counter] = defaultdict(Counter)
    for i in range(n_fit):
        symbols, value = listops.example(ListOpsTask.DATA_SEED, "train", i)
        by_root[symbols[0]][value] += 1
    return by_root


def baselines(n_test: int, n_fit: int = 5000) -> dict[str, float]:
    """Test accuracy of two rules that read no expression: the most frequent class, and the
    most frequent class of each root operator (both counted on ``n_fit`` training examples).
    """
    by_root = _root_counts(n_fit)
    overall = sum(by_root.values(), Counter()).most_common(1)[0][0]
    rule = {op: counts.most_common(1)[0][0] for op, counts in by_root.items()}
    majority = sum(listops.example(ListOpsTask.DATA_SEED, "test", i)[1] == overall
                   for i in range(n_test))
    return {f"most frequent class ({overall})": majority / n_test,
            "most frequent class per root operator ("
            + ", ".join(f"{op[1:]} -> {v}" for op, v in sorted(rule.items())) + ")":
            root_rule("test", n_test, n_fit)["accuracy"]}


@functools.cache  # the test split's is asked for by baselines and by main
def root_rule(split: str, n: int, n_fit: int = 5000) -> dict[str, float]:
    """The root-operator rule on the first ``n`` examples of ``split``: its accuracy, and its
    bits per example when it predicts each root operator's class frequencies (add-one
    smoothed). A model has learned more than the root operator only where its held-out bits
    fall below these on the same examples; the validation sample favours the rule (40.0%
    right against 34.2% on test), so its accuracy alone misleads."""
    by_root = _root_counts(n_fit)
    right, bits = 0, 0.0
    for i in range(n):
        symbols, value = listops.example(ListOpsTask.DATA_SEED, split, i)
        counts = by_root[symbols[0]]
        right += counts.most_common(1)[0][0] == value
        bits -= math.log2((counts[value] + 1) / (sum(counts.values()) + listops.N_CLASSES))
    return {"accuracy": right / n, "bits": bits / n}


def _top_digits(args: list) -> list[tuple[int, int]]:
    """The root's digit arguments (``args``, as listops.parse gives them) as (token position,
    digit)."""
    position, digits = 1, []
    for arg in args:
        if isinstance(arg, int):
            digits.append((position, arg))
            position += 1
        else:
            position += len(listops.tokens(arg))
    return digits


def _edge_digits(args: list) -> list[int]:
    """The root's digit arguments that no nested operator separates from either end: those
    before its first nested operator and after its last (all of them if it has none). A
    reader of the sequence finds them without counting brackets: the run of digits right
    after the root operator, and the run right before the closing ']'. ``args`` as
    listops.parse gives them."""
    nested = [k for k, arg in enumerate(args) if not isinstance(arg, int)]
    if not nested:
        return list(args)
    return args[:nested[0]] + args[nested[-1] + 1:]


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
    """Test accuracy of three rules that evaluate only the root's digit arguments (none of
    its nested operators), fitted as the most frequent value of each case on ``n_fit``
    training examples: the runs of digits at either end (:func:`_edge_digits`), those within
    ``window`` tokens of either end of the sequence (what a classifier that pools both ends
    of a stack of local attention layers can see), and all of them (which needs the nesting
    depth of every token)."""
    def cases(split: str, n: int):
        for i in range(n):
            symbols, value = listops.example(ListOpsTask.DATA_SEED, split, i)
            args = listops.parse(symbols)[1]
            digits, length = _top_digits(args), len(symbols)
            near = [d for p, d in digits if p < window or p >= length - window]
            yield symbols[0], value, {"edge": _edge_digits(args), "ends": near,
                                      "all": [d for _, d in digits]}

    fitted = {"edge": defaultdict(Counter), "ends": defaultdict(Counter),
              "all": defaultdict(Counter)}
    by_root: dict[str, Counter] = defaultdict(Counter)
    for op, value, digits in cases("train", n_fit):
        for name, some in digits.items():
            fitted[name][_summary(op, some)][value] += 1
        by_root[op][value] += 1
    right = Counter()
    for op, value, digits in cases("test", n_test):
        for name, some in digits.items():
            counts = fitted[name].get(_summary(op, some), by_root[op])
            right[name] += counts.most_common(1)[0][0] == value
    return {"the root operator and the runs of digit arguments at either end (before its "
            "first nested operator, after its last)": right["edge"] / n_test,
            f"the root operator and its digit arguments within {window} tokens of either end":
            right["ends"] / n_test,
            "the root operator and all its digit arguments (needs each token's depth)":
            right["all"] / n_test}


def curve(records: list[dict]) -> list[tuple[int, float, float, float]]:
    """(step, minutes, validation accuracy, validation bits per example) after every
    evaluation in a run's metrics ``records``."""
    minutes = {r["step"]: r["elapsed_s"] / 60 for r in records if r["kind"] == "train"}
    minutes[0] = 0.0
    return [(r["step"], minutes.get(r["step"], float("nan")), r["val_accuracy"], r["val_bpc"])
            for r in records if r["kind"] == "eval"]


def trained_minutes(records: list[dict], step: int) -> float:
    """Wall-clock minutes of training up to ``step`` (the last training record at or
    before it)."""
    return max((r["elapsed_s"] for r in records if r["kind"] == "train" and r["step"] <= step),
               default=0.0) / 60


def score(run_dir: Path, n_test: int, more_hashes: list[int]
          ) -> tuple[dict[int, dict[str, float]], dict[str, dict[str, float]], list[bool]]:
    """The run's first ``n_test`` test examples scored once per number of hash rounds (those
    it trained with first, then ``more_hashes``): {rounds: accuracy and bits per example},
    the first rounds' answers split by root operator (:func:`by_root`), and whether each
    of those answers is right (for :func:`paired`)."""
    model, run = ckpt.load_model(run_dir, "cpu")
    task = build_task(run.training.replace(eval_windows=n_test).task_spec())
    ids, mask, labels = task.test_set(n_test)
    scored, first = {}, None
    for rounds in dict.fromkeys((run.model.n_hashes, *more_hashes)):  # each once, in order
        picked, bits = classify_examples(model, ids, mask, labels, n_hashes=rounds,
                                         seed=run.training.seed,
                                         precision=run.training.precision)
        scored[rounds] = {"accuracy": (picked == labels).double().mean().item(),
                          "bits": bits.mean().item()}
        first = picked if first is None else first
    return (scored, by_root(ids[:, 0].tolist(), first.tolist(), labels.tolist()),
            (first == labels).tolist())


def paired(first_right: list[bool], second_right: list[bool]) -> dict[str, float]:
    """Two runs' accuracies on the same test examples compared example by example: the
    difference (first minus second), its standard error from the per-example differences
    (each -1, 0 or 1; smaller than the unpaired one when the runs err on the same
    examples), and how many examples only one of them answers right."""
    n = len(first_right)
    if n != len(second_right) or n < 2:
        raise ValueError(f"paired: {n} and {len(second_right)} answers; score both runs on "
                         "the same test examples, at least 2")
    only_first = sum(a and not b for a, b in zip(first_right, second_right, strict=True))
    only_second = sum(b and not a for a, b in zip(first_right, second_right, strict=True))
    mean = (only_first - only_second) / n
    variance = ((only_first + only_second) / n - mean ** 2) * n / (n - 1)
    return {"difference": mean, "standard_error": math.sqrt(variance / n),
            "only_first_right": only_first, "only_second_right": only_second}


def by_root(roots: list[int], picked: list[int], labels: list[int]
            ) -> dict[str, dict[str, float]]:
    """Test answers split by root operator id: how many examples, their accuracy, the
    root-operator rule's, and the share answered otherwise than the rule. A classifier that
    reads no more than the root operator answers as the rule on every MAX and MIN root."""
    rule = {op: counts.most_common(1)[0][0] for op, counts in _root_counts(5000).items()}
    split: dict[str, Counter] = defaultdict(Counter)
    for op_id, answer, value in zip(roots, picked, labels, strict=True):
        op = listops.VOCAB[op_id]
        split[op].update(n=1, right=answer == value, rule_right=rule[op] == value,
                         otherwise=answer != rule[op])
    return {op[1:]: {"examples": c["n"], "accuracy": c["right"] / c["n"],
                     "rule_accuracy": c["rule_right"] / c["n"],
                     "answered_otherwise": c["otherwise"] / c["n"]}
            for op, c in sorted(split.items())}


def attention(run_dir: Path) -> str:
    return "/".join(ckpt.read_config(run_dir).model.attn_layers)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path, help="ListOps run directories")
    parser.add_argument("--test", type=int, default=2000, help="test examples (default 2000)")
    parser.add_argument("--validation", type=int, default=400,
                        help="validation examples the runs evaluated on (default 400, the "
                        "preset's)")
    parser.add_argument("--more-hashes", type=int, nargs="*", default=[], metavar="R",
                        help="also score runs with LSH layers with R hash rounds (the paper "
                        "evaluates with more rounds than it trains with), e.g. 4 8")
    parser.add_argument("--out", type=Path, default=Path("docs"))
    args = parser.parse_args()
    if any(r < 1 for r in args.more_hashes):
        parser.error(f"--more-hashes {args.more_hashes}: hash rounds must be at least 1")
    results, right = [], []
    for run_dir in args.runs:
        t0 = time.perf_counter()
        extra = args.more_hashes if "lsh" in attention(run_dir) else []
        scored, roots, answers = score(run_dir, args.test, extra)
        right.append(answers)
        trained = next(iter(scored.values()))  # with the hash rounds it trained with
        accuracy, bits = trained["accuracy"], trained["bits"]
        records = MetricsLog(run_dir / ckpt.METRICS_FILE).read()
        points = curve(records)
        # the scored checkpoint's step: a stopped run's is after its last evaluation
        step = ckpt.latest_checkpoint(run_dir).step
        results.append({"run": run_dir.name, "attention": attention(run_dir),
                        "steps": step, "minutes": round(trained_minutes(records, step), 1),
                        "test_examples": args.test, "test_accuracy": accuracy,
                        "test_bits": bits, "best_val_accuracy": max(p[2] for p in points),
                        "final_val_accuracy": points[-1][2], "curve": points,
                        "test_by_hash_rounds": scored, "test_by_root": roots,
                        "eval_seconds": round(time.perf_counter() - t0, 1)})
        print(json.dumps({k: v for k, v in results[-1].items() if k != "curve"}), flush=True)
    for r, answers in zip(results[1:], right[1:], strict=True):  # each against the first
        r["paired_with_first"] = {"first": results[0]["run"], **paired(right[0], answers)}
    rules = {**baselines(args.test), **shallow_rules(args.test)}
    on_validation = root_rule("validation", args.validation)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "lra-listops.json").write_text(json.dumps(
        {"runs": results, "rules": rules, "root_rule_on_validation": on_validation,
         "root_rule_on_test": root_rule("test", args.test)}, indent=1) + "\n")
    plot(results, on_validation, args.out / "lra-listops.png")
    print("\n| model | attention | steps | minutes | test accuracy |")
    print("|---|---|---|---|---|")
    for r in results:
        print(f"| ours ({r['run']}) | {r['attention']} | {r['steps']} | {r['minutes']} | "
              f"{100 * r['test_accuracy']:.2f}% |")
        for rounds, scored in list(r["test_by_hash_rounds"].items())[1:]:
            print(f"| ours ({r['run']}), {rounds} hash rounds at test | {r['attention']} | "
                  f"{r['steps']} | {r['minutes']} | {100 * scored['accuracy']:.2f}% |")
    for name, value in rules.items():
        print(f"| rule: {name} | | | | {100 * value:.2f}% |")
    for name, value in PUBLISHED.items():
        print(f"| {name} | | | | {value:.2f}% |")
    print("\n| run | root | examples | accuracy | root-operator rule | answered otherwise |")
    print("|---|---|---|---|---|---|")
    for r in results:
        for op, c in r["test_by_root"].items():
            print(f"| {r['run']} | {op} | {c['examples']} | {100 * c['accuracy']:.1f}% | "
                  f"{100 * c['rule_accuracy']:.1f}% | {100 * c['answered_otherwise']:.1f}% |")
    for r in results[1:]:
        c = r["paired_with_first"]
        print(f"\n{c['first']} minus {r['run']}, paired over {args.test} test examples: "
              f"{100 * c['difference']:+.2f} points (standard error "
              f"{100 * c['standard_error']:.2f}); only {c['first']} right on "
              f"{c['only_first_right']}, only {r['run']} right on {c['only_second_right']}")


def plot(results: list[dict], rule: dict[str, float], path: Path) -> None:
    """Validation accuracy and bits per example against minutes, each beside the
    root-operator rule on the same validation examples."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (acc_ax, bits_ax) = plt.subplots(1, 2, figsize=(11, 4))
    for r in results:
        _, minutes, accuracy, bits = zip(*r["curve"], strict=True)
        label = f"{r['attention']} (test {100 * r['test_accuracy']:.1f}%)"
        acc_ax.plot(minutes, [100 * a for a in accuracy], marker=".", label=label)
        bits_ax.plot(minutes, bits, marker=".", label=label)
    acc_ax.axhline(PUBLISHED["Reformer (LRA paper)"], color="grey", ls="--", lw=1,
                   label="LRA paper's best (37.27%)")
    acc_ax.axhline(10, color="grey", ls=":", lw=1, label="chance (10%)")
    acc_ax.axhline(100 * rule["accuracy"], color="black", ls="-.", lw=1,
                   label=f"root-operator rule here ({100 * rule['accuracy']:.1f}%)")
    acc_ax.set_ylabel("validation accuracy (%)")
    bits_ax.axhline(rule["bits"], color="black", ls="-.", lw=1,
                    label=f"root-operator rule here ({rule['bits']:.3f})")
    bits_ax.set_ylabel("validation bits per example")
    bits_ax.set_ylim(top=3.0)  # the first evaluations (about 3.5 bits) would hide the rest
    for ax in (acc_ax, bits_ax):
        ax.set_xlabel("wall-clock minutes (2-core CPU)")
        ax.legend(loc="best", fontsize=8)
        ax.grid(alpha=0.3)
    fig.suptitle("ListOps: held-out validation during training")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
