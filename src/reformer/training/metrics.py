"""Evaluation in bits per token, the metrics log, and the plot of a run's curves.

Metric: bits per token = mean next-token cross-entropy in nats / ln 2 over the labelled
positions: bits per character for byte-level text, bits per dimension for images.

``metrics.jsonl`` holds one JSON object per line: ``{"kind": "train", "step", "loss", "bpc",
"lr", "tokens", "tokens_per_s", "elapsed_s"}`` after every optimiser step and ``{"kind": "eval",
"step", "val_bpc", "val_bpc_n_hashes": {"8": ...}}`` after every evaluation. ``plot.png``
draws the train bpc (raw and smoothed) and the validation bpc against the step.
"""

from __future__ import annotations

import contextlib
import json
import math
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from reformer.model import ReformerLM
from reformer.parallel.world import World
from reformer.training.checkpoint import atomic_write_bytes

LN2 = math.log(2.0)
EVAL_BATCH = 8  # examples per forward when evaluating a head
MetricsFn = Callable[[torch.Tensor, torch.Tensor], dict[str, float]]


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """bf16 autocast on ``device`` (CPU or CUDA) when ``precision == "bf16"``, else a no-op."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")


BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")  # /proc/cpuinfo's names for bf16 instructions


def cpu_has_native_bf16(cpuinfo: str | Path = "/proc/cpuinfo") -> bool:
    """Whether this CPU has bf16 instructions (AVX512-BF16 or AMX): oneDNN's answer, or where a
    torch build lacks that (private) query, the flags in ``cpuinfo`` (False where unreadable)."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        pass
    try:
        text = Path(cpuinfo).read_text(encoding="utf-8", errors="replace")
    except OSError:  # not Linux: no answer, and a warning is the safer side
        return False
    flags = {f for line in text.splitlines() if line.startswith("flags")
             for f in line.partition(":")[2].split()}
    return any(f in flags for f in BF16_CPU_FLAGS)


def precision_warning(device: torch.device, precision: str,
                      native: Callable[[], bool] | None = None) -> str | None:
    """A line for the run's banner when bf16 on ``device`` will be emulated, else None.

    On a CPU without bf16 instructions (an AMD EPYC Zen 3, AVX2) the ListOps preset ran at
    about 1,000-1,900 tokens/s in bf16 against 11,000-18,500 in fp32 (docs/lra.md, tenth run).
    """
    if precision != "bf16" or device.type != "cpu" or (native or cpu_has_native_bf16)():
        return None
    return (f"warning: this CPU has no bf16 instructions ({torch.backends.cpu.get_cpu_capability()}"
            "), so bf16 is emulated and runs several times slower than fp32; pass "
            "--precision fp32")


@contextlib.contextmanager
def fixed_rng(seed: int, device: torch.device) -> Iterator[None]:
    """Seed the global RNGs inside the block and restore them afterwards.

    LSH layers without a ``hash_seed`` draw their rotations from the global RNG; seeding makes
    every evaluation use the same rotations without disturbing the training run's RNG stream.
    """
    cuda = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda):
        torch.manual_seed(seed)
        yield


@torch.no_grad()
def evaluate_sequences(model: ReformerLM, inputs: torch.Tensor, labels: torch.Tensor | None = None,
                       n_hashes: int | None = None, seed: int = 0, precision: str = "fp32",
                       extra: MetricsFn | None = None, world: World | None = None
                       ) -> tuple[float, dict[str, float]]:
    """Bits per token over (N, L) held-out sequences, one sequence at a time.

    Sequence i runs with the global RNG seeded by ``seed + i`` (LSH layers without a
    ``hash_seed`` draw their rotations from it), so its loss does not depend on which process
    evaluates it or what ran before. With a ``world`` of several processes, process r takes
    sequences r, r + P, ...; each runs the same number of forwards (a sharded model gathers its
    weights collectively; the padding sequences count zero), and the sums are all-reduced, so
    every process returns the one-process figure.

    Args:
        inputs: (N, L) token ids.
        labels: (N, L) targets (-100 = no loss); default: the inputs (language modelling).
        n_hashes: LSH rounds (default: the model's ``n_hashes``).
        extra: per-sequence metrics from ((1, L, V) logits, (1, L) labels), averaged over the
            sequences (e.g. the synthetic task's accuracy); asks the model for full logits.
        world: the processes sharing the work (default: this one alone).

    Returns:
        (bits per labelled token, {name: mean of ``extra``'s values}).
    """
    labels = inputs if labels is None else labels
    world = world or World()
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    n = len(inputs)
    mine = range(world.rank, -(-n // world.size) * world.size, world.size)  # padded to P | N
    nats, count, sums = 0.0, 0, {}
    with fixed_rng(seed, device), autocast(device, precision):
        for i in mine:
            j, weight = min(i, n - 1), 1.0 if i < n else 0.0  # padding: run, not counted
            torch.manual_seed(seed + j)
            x, y = inputs[j][None].to(device), labels[j][None].to(device)  # (1, L)
            out = model(x, labels=y, n_hashes=n_hashes, return_logits=extra is not None)
            labelled = int((y[:, 1:] != -100).sum()) * weight
            nats, count = nats + out.loss.item() * labelled, count + labelled
            for k, v in (extra(out.logits, y) if extra is not None else {}).items():
                sums[k] = sums.get(k, 0.0) + v * weight
    model.train(was_training)
    keys = sorted(sums)
    nats, count, *totals = world.all_sum([nats, count, *(sums[k] for k in keys)], device)
    return nats / max(count, 1) / LN2, {k: v / n for k, v in zip(keys, totals, strict=True)}


def _eval_batches(model: torch.nn.Module, n: int, batch_size: int, seed: int,
                  precision: str, world: World) -> Iterator[tuple[slice, float, torch.device]]:
    """(rows, weight, device) of this process's batches of N held-out examples, the model in
    eval mode: batch k runs with the global RNG seeded by ``seed + k``; process r takes
    batches r, r + P, ..., padded with repeats of the last that count zero (weight 0), so that
    every process runs as many forwards."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    n_batches = -(-n // batch_size)
    try:
        with fixed_rng(seed, device), autocast(device, precision):
            for k in range(world.rank, -(-n_batches // world.size) * world.size, world.size):
                j = min(k, n_batches - 1)
                torch.manual_seed(seed + j)
                yield slice(j * batch_size, (j + 1) * batch_size), float(k < n_batches), device
    finally:
        model.train(was_training)


@torch.no_grad()
def evaluate_examples(model: torch.nn.Module, inputs: torch.Tensor,
                      attention_mask: torch.Tensor | None, labels: torch.Tensor,
                      n_hashes: int | None = None, seed: int = 0, precision: str = "fp32",
                      world: World | None = None, batch_size: int = EVAL_BATCH
                      ) -> tuple[float, dict[str, float]]:
    """Held-out loss and accuracy of a head (reformer.heads) over N examples.

    Classifiers (labels (N,)): bits per example and the share of examples classified right.
    Masked LM (labels (N, L), -100 = not masked): bits per masked token and the share of masked
    tokens predicted right. Examples run ``batch_size`` at a time, each batch cut to its
    longest real example, batch k with the global RNG seeded by ``seed + k``; with a ``world``
    of processes, process r runs batches r, r + P, ... and the sums are all-reduced.

    Returns:
        (bits per example or masked token, {"accuracy": share right}).
    """
    world = world or World()
    nats = count = correct = 0.0
    device = next(model.parameters()).device
    for _, weight, out, target in _head_batches(model, inputs, attention_mask, labels, n_hashes,
                                                seed, precision, world, batch_size):
        n = target.numel() * weight
        nats, count = nats + out.loss.item() * n, count + n
        correct += int((out.logits.argmax(dim=-1) == target).sum()) * weight
    nats, count, correct = world.all_sum([nats, count, correct], device)
    return nats / max(count, 1) / LN2, {"accuracy": correct / max(count, 1)}


@torch.no_grad()
def classify_examples(model: torch.nn.Module, inputs: torch.Tensor,
                      attention_mask: torch.Tensor | None, labels: torch.Tensor,
                      n_hashes: int | None = None, seed: int = 0, precision: str = "fp32",
                      batch_size: int = EVAL_BATCH) -> tuple[torch.Tensor, torch.Tensor]:
    """(N,) the class a classifier picks for each of N examples and (N,) its loss on each in
    bits, from the very forwards that :func:`evaluate_examples` scores (same batches, same
    seeds): the share of picks that equal ``labels`` is its accuracy and the mean loss its
    bits per example. For breaking both down by kind of example."""
    picked = torch.empty(len(inputs), dtype=torch.long)
    bits = torch.empty(len(inputs), dtype=torch.float64)
    for rows, _, out, target in _head_batches(model, inputs, attention_mask, labels, n_hashes,
                                              seed, precision, World(), batch_size):
        picked[rows] = out.logits.argmax(dim=-1).cpu()
        wide = out.logits.to(torch.promote_types(out.logits.dtype, torch.float32))
        bits[rows] = F.cross_entropy(wide, target.long(), reduction="none").cpu().double() / LN2
    return picked, bits


def _head_batches(model: torch.nn.Module, inputs: torch.Tensor,
                  attention_mask: torch.Tensor | None, labels: torch.Tensor,
                  n_hashes: int | None, seed: int, precision: str, world: World,
                  batch_size: int) -> Iterator[tuple[slice, float, Any, torch.Tensor]]:
    """(rows, weight, the head's output, its targets) of each of :func:`_eval_batches`'s
    batches, each cut to its longest real example; targets are the labels (B,) of a
    classifier or the masked positions' labels of a masked LM."""
    for rows, weight, device in _eval_batches(model, len(inputs), batch_size, seed, precision,
                                              world):
        x, y = inputs[rows], labels[rows]
        m = None if attention_mask is None else attention_mask[rows]
        if m is not None:  # cut the columns that only pad
            x, m = _cut(x, m)
            y = y[:, :x.shape[1]] if y.dim() == 2 else y
            m = m.to(device)
        x, y = x.to(device), y.to(device)
        out = model(x, attention_mask=m, labels=y, n_hashes=n_hashes)
        yield rows, weight, out, (y if y.dim() == 1 else y[y != -100])


@torch.no_grad()
def evaluate_pairs(model: torch.nn.Module, inputs: torch.Tensor, attention_mask: torch.Tensor,
                   decoder_inputs: torch.Tensor, labels: torch.Tensor,
                   n_hashes: int | None = None, seed: int = 0, precision: str = "fp32",
                   world: World | None = None, batch_size: int = EVAL_BATCH
                   ) -> tuple[float, dict[str, float]]:
    """Held-out loss of an encoder-decoder over N pairs, teacher-forced, in bits per target
    token; the share of target tokens predicted right and of pairs whose every target token is
    right ("exact_match": exactly the pairs that greedy decoding reproduces). Batches, seeds
    and processes as :func:`evaluate_examples`."""
    from reformer.model import shifted_targets
    world = world or World()
    nats = count = correct = exact = 0.0
    for rows, weight, device in _eval_batches(model, len(inputs), batch_size, seed, precision,
                                              world):
        src, m = _cut(inputs[rows], attention_mask[rows])
        tgt, y = _cut(decoder_inputs[rows], labels[rows] != -100)[0], labels[rows]
        y = y[:, :tgt.shape[1]].to(device)
        out = model(src.to(device), tgt.to(device), attention_mask=m.to(device), labels=y,
                    n_hashes=n_hashes)
        targets = shifted_targets(y)  # (b, T): position t predicts y[t + 1]
        valid = targets != -100
        right = (out.logits.argmax(dim=-1) == targets) & valid
        n = int(valid.sum()) * weight
        nats, count = nats + out.loss.item() * n, count + n
        correct += int(right.sum()) * weight
        exact += int((right | ~valid).all(dim=1).sum()) * weight
    nats, count, correct, exact = world.all_sum([nats, count, correct, exact], device)
    return nats / max(count, 1) / LN2, {"accuracy": correct / max(count, 1),
                                        "exact_match": exact / len(inputs)}


def _cut(ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, L) ids and mask without the columns that only pad."""
    length = int(mask.any(dim=0).nonzero().max()) + 1
    return ids[:, :length], mask[:, :length]


def evaluate_head(model: torch.nn.Module, head: str, held_out: tuple, **settings: Any
                  ) -> tuple[float, dict[str, float]]:
    """:func:`evaluate_pairs` for the encoder-decoder, else :func:`evaluate_examples`."""
    fn = evaluate_pairs if head == "seq2seq" else evaluate_examples
    return fn(model, *held_out, **settings)


def evaluate_bpc(model: ReformerLM, windows: torch.Tensor, n_hashes: int | None = None,
                 seed: int = 0, precision: str = "fp32") -> float:
    """Bits per character of a language model over (N, L) windows (every position counts)."""
    return evaluate_sequences(model, windows, n_hashes=n_hashes, seed=seed,
                              precision=precision)[0]


class MetricsLog:
    """Append-only JSON-lines log of a run's metrics."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    def append(self, record: dict[str, Any]) -> None:
        with self.path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")

    def read(self) -> list[dict[str, Any]]:
        if not self.path.exists():
            return []
        with self.path.open(encoding="utf-8") as f:
            return [json.loads(line) for line in f if line.strip()]

    def truncate_after(self, step: int) -> None:
        """Drop records of steps after ``step`` (logged after the last checkpoint)."""
        records = [r for r in self.read() if r["step"] <= step]
        text = "".join(json.dumps(r) + "\n" for r in records)
        atomic_write_bytes(self.path, text.encode("utf-8"))


def _smooth(values: list[float]) -> list[float]:
    """Exponential moving average, bias-corrected so that the start is not pulled to 0.

    Its span grows with the run (none for a handful of steps, ~50 steps for thousands).
    """
    weight = min(0.98, max(0.0, 1.0 - 20.0 / max(len(values), 1)))
    out, avg = [], 0.0
    for i, v in enumerate(values):
        avg = weight * avg + (1 - weight) * v
        out.append(avg / (1 - weight ** (i + 1)))
    return out


def plot_metrics(records: list[dict[str, Any]], path: str | Path, title: str = "",
                 unit: str = "char") -> None:
    """Draw train and validation bits per ``unit`` against the step into a PNG at ``path``.

    Held-out metrics other than bits (``val_accuracy`` of the synthetic task) go on a second
    axis, in percent.
    """
    import io

    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    train = [r for r in records if r["kind"] == "train"]
    evals = [r for r in records if r["kind"] == "eval"]
    fig = Figure(figsize=(8, 4.5), dpi=100)
    fig.subplots_adjust(left=0.09, right=0.9, bottom=0.11, top=0.92)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    if train:
        steps = [r["step"] for r in train]
        bpc = [r["bpc"] for r in train]
        ax.plot(steps, bpc, color="tab:blue", alpha=0.25, linewidth=0.8)
        ax.plot(steps, _smooth(bpc), color="tab:blue", label="train (smoothed)")
    if evals:
        ax.plot([r["step"] for r in evals], [r["val_bpc"] for r in evals], "o-",
                color="tab:orange", label="validation")
        extra = sorted({k for r in evals for k in r.get("val_bpc_n_hashes", {})}, key=int)
        for k, color in zip(extra, ("tab:green", "tab:red", "tab:purple", "tab:brown"),
                            strict=False):
            pts = [(r["step"], r["val_bpc_n_hashes"][k]) for r in evals
                   if k in r.get("val_bpc_n_hashes", {})]
            ax.plot(*zip(*pts, strict=True), "s--", color=color,
                    label=f"validation, {k} hash rounds")
    ax.set_xlabel("step")
    ax.set_ylabel(f"bits per {unit}")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    if train or evals:
        ax.legend(loc="upper center")
    _plot_extra_metrics(ax, evals)
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    atomic_write_bytes(Path(path), buf.getvalue())


def _plot_extra_metrics(ax: Any, evals: list[dict[str, Any]]) -> None:
    names = sorted({k for r in evals for k in r if k.startswith("val_") and k != "val_bpc"
                    and k != "val_bpc_n_hashes"})
    if not names:
        return
    right = ax.twinx()
    for name, color in zip(names, ("black", "tab:gray"), strict=False):
        pts = [(r["step"], 100.0 * r[name]) for r in evals if name in r]
        right.plot(*zip(*pts, strict=True), "^-", color=color,
                   label=name.removeprefix("val_").replace("_", " ") + " (%)")
    right.set_ylabel("%")
    right.set_ylim(0, 100)
    right.legend(loc="upper right")
