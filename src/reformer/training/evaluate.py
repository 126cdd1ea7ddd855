"""Evaluation of a saved run: held-out bits per token (or, for the heads, per example or
masked token, and accuracy) for several numbers of hash rounds.

The paper (section 5) trains LSH models with few rounds and evaluates them with more: "at 8
rounds it almost matches full attention". The weights do not depend on ``n_hashes``, so one
loaded model is evaluated with each R in turn, on the same fixed windows and rotations seed.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from reformer.config import check_positive_int
from reformer.data import text
from reformer.data.task import build_task, task_head, test_split_tasks
from reformer.training.checkpoint import load_model, read_config
from reformer.training.metrics import evaluate_head, evaluate_sequences
from reformer.training.trainer import resolve_device


def evaluate_run(run_dir: str | Path, data: Sequence[str | Path] = (),
                 n_hashes: Sequence[int | None] = (None,), n_windows: int | None = None,
                 seq_len: int | None = None, device: str = "auto",
                 precision: str | None = None) -> dict[int, float]:
    """Bits per token of a run's model on its held-out data, per number of hash rounds.

    Args:
        run_dir: a ``reformer train`` output directory.
        data: text to evaluate on, all of it held out; empty means the run's own held-out set
            (the only choice for image and synthetic runs).
        n_hashes: hash rounds to evaluate with; None means the model's own.
        n_windows, seq_len, precision: default to the run's training settings.

    Returns:
        {R: bpc} with R the number of rounds actually used.
    """
    run = read_config(run_dir)
    if task_head(run.training.task) != "lm":
        raise ValueError(f"{run_dir} is a {run.training.task} run; evaluate it with "
                         "evaluate_head_run (bits per example or masked token, and accuracy)")
    model, run = load_model(run_dir, resolve_device(device))
    cfg = run.training
    seq_len = _given_or(seq_len, "seq_len", cfg.seq_len)
    if seq_len < 2:
        raise ValueError(f"seq_len={seq_len} must be at least 2 (one target); pass e.g. "
                         f"{cfg.seq_len}")
    if seq_len > run.model.max_seq_len:
        raise ValueError(f"seq_len={seq_len} exceeds the model's max_seq_len="
                         f"{run.model.max_seq_len}; pass a smaller --seq-len")
    if cfg.task != "text" and (data or seq_len != cfg.seq_len):
        raise ValueError(f"--data and --seq-len apply to text runs; {run_dir} is a "
                         f"{cfg.task} run, evaluated on its own held-out set")
    n_windows = _given_or(n_windows, "n_windows", cfg.eval_windows)
    if data:
        held_out = text.ByteCorpus(text.resolve_paths(data)).span()
        inputs = labels = held_out.windows(seq_len, n_windows)  # (N, L)
    else:
        task = build_task(cfg.replace(seq_len=seq_len, eval_windows=n_windows).task_spec())
        inputs, labels = task.eval_set()  # (N, L) each
    results = {}
    for r in n_hashes:
        rounds = _given_or(r, "n_hashes", run.model.n_hashes)
        results[rounds] = evaluate_sequences(model, inputs, labels, n_hashes=rounds,
                                             seed=cfg.seed,
                                             precision=precision or cfg.precision)[0]
    return results


def evaluate_head_run(run_dir: str | Path, split: str = "validation",
                      n_hashes: Sequence[int | None] = (None,), n_examples: int | None = None,
                      device: str = "auto", precision: str | None = None
                      ) -> dict[int, tuple[float, dict[str, float]]]:
    """Held-out loss and accuracy of a classifier or masked-LM run, per number of hash rounds.

    Args:
        split: "validation" (the run's held-out set) or, for listops and listops-mlm, "test"
            (examples that neither training nor validation drew; masked for listops-mlm).
        n_examples: how many examples (default: the run's eval_windows; for sequences of the
            mlm task, windows).

    Returns:
        {R: (bits per example, masked or target token, {"accuracy": ..., and for seq2seq
        "exact_match": ...})}.
    """
    model, run = load_model(run_dir, resolve_device(device))
    cfg = run.training
    if split not in ("validation", "test"):
        raise ValueError(f"split={split!r} is unknown; use validation or test")
    if split == "test" and cfg.task not in test_split_tasks():
        raise ValueError(f"only the {' and '.join(test_split_tasks())} tasks have a test split; "
                         f"{run_dir} is a {cfg.task} run (evaluate on other data by passing it "
                         "as the run's --val-data)")
    n = _given_or(n_examples, "n_examples", cfg.eval_windows)
    task = build_task(cfg.replace(eval_windows=n).task_spec())
    held_out = task.test_set(n) if split == "test" else task.eval_set()
    results = {}
    for r in n_hashes:
        rounds = _given_or(r, "n_hashes", run.model.n_hashes)
        results[rounds] = evaluate_head(model, task.head, held_out, n_hashes=rounds,
                                        seed=cfg.seed, precision=precision or cfg.precision)
    return results


def evaluate_attentions(run_dir: str | Path, attentions: Sequence[str], device: str = "auto",
                        n_sequences: int | None = None, dedup_rounds: bool | None = None
                        ) -> dict[str, tuple[float, dict[str, float]]]:
    """A run's held-out bits per token and task metrics with each of several attentions.

    The paper's Table 2 evaluates models trained with one attention (full, or LSH with R
    rounds) with each of the others; the weights are the same, only the layers are rebuilt
    (see :func:`reformer.training.checkpoint.with_attention`).

    Args:
        attentions: e.g. ("full", "lsh-8", "lsh-4", "lsh-2", "lsh-1").
        n_sequences: held-out sequences (default: the run's eval_windows).
        dedup_rounds: evaluate LSH with de-duplication on or off (default: as trained).

    Returns:
        {attention: (bits per token, {metric: value})}, e.g. the synthetic task's accuracy.
    """
    run = read_config(run_dir)
    cfg = run.training
    n_sequences = _given_or(n_sequences, "n_sequences", cfg.eval_windows)
    task = build_task(cfg.replace(eval_windows=n_sequences).task_spec())
    inputs, labels = task.eval_set()
    results = {}
    for attention in attentions:
        model, _ = load_model(run_dir, resolve_device(device), attention=attention,
                              dedup_rounds=dedup_rounds)
        results[attention] = evaluate_sequences(model, inputs, labels, seed=cfg.seed,
                                                precision=cfg.precision,
                                                extra=task.extra_metrics)
    return results


def _given_or(value: int | None, name: str, default: int) -> int:
    """``value``, checked to be a positive integer, or ``default`` where it is None (0 is a
    mistake, not a request for the default)."""
    if value is None:
        return default
    check_positive_int(name, value)
    return value
