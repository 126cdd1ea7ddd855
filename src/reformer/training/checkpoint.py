"""Run directories: the config, one atomic checkpoint, metrics, and a lock against a second run.

A run directory holds

    config.json          {"format": 1, "preset": ..., "model": ReformerConfig, "training": ...}
    step-00001200/       the newest complete checkpoint, one unit:
        model.safetensors    the weights (metadata: the step they belong to)
        trainer_state.pt     optimizer, schedule (step, elapsed time), RNG and data-sampler state
    metrics.jsonl        see reformer.training.metrics
    plot.png             train and validation curves
    .lock                flock-ed by the run training here; holds "pid P on HOST"

Why a folder: weights and trainer state written as two files can be torn apart by a kill
between their two renames. A save writes both into ``.tmp-step-N/``, fsyncs them and the folder,
then renames the folder to ``step-N/`` (one atomic rename), fsyncs the run directory, and only
then deletes the older checkpoint (renaming it to ``.tmp-...`` first). So a ``step-*`` folder is
always complete, the newest one is what resume loads, a kill at any point leaves the old or the
new checkpoint, and disk use stays at one checkpoint plus the one being written. ``.tmp-*``
entries are leftovers of a killed save, removed by the next run that locks the directory. A
non-empty folder cannot be replaced by a rename, so saving a step again (a periodic save, then
the final one) writes ``step-N.1``, ``step-N.2``, ... (newest = highest step, then suffix).

Runs saved before step folders hold model.safetensors and trainer_state.pt at the top level;
they still load and resume (a pair torn by a kill is refused by comparing their steps), and
their first new save replaces them.

Two runs in one directory would interleave metrics and overwrite each other's checkpoints, so
a Trainer holds the directory's lock (``rundir.RunLock``) while it trains.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from reformer.config import ReformerConfig
from reformer.data.task import task_head
from reformer.heads import build_model
from reformer.model import ReformerTrunk
from reformer.training.config import RunConfig

FORMAT = 1
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
STATE_FILE = "trainer_state.pt"
METRICS_FILE = "metrics.jsonl"
PLOT_FILE = "plot.png"
LOCK_FILE = ".lock"  # see rundir.RunLock
TMP_PREFIX = ".tmp-"
_STEP_FOLDER = re.compile(r"step-(\d+)(?:\.(\d+))?")


# ------------------------------------------------------------------ durable writes
def _write_synced(path: Path, data: bytes) -> None:
    """Create ``path`` with ``data`` and fsync it (os-level calls: tests inject faults there)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    finally:
        os.close(fd)


def _sync_dir(path: Path) -> None:
    """fsync a folder, so that the names created or renamed in it survive a power cut."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to a temporary file beside ``path``, sync it, then rename it over."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")  # two writers never share it
    _write_synced(tmp, data)
    os.replace(tmp, path)


def write_config(run_dir: Path, run: RunConfig) -> None:
    atomic_write_bytes(run_dir / CONFIG_FILE, run.to_json().encode("utf-8"))


def read_config(run_dir: str | Path) -> RunConfig:
    """The run configuration saved in ``run_dir``; a ValueError says what is wrong."""
    path = Path(run_dir) / CONFIG_FILE
    if not path.is_file():
        raise ValueError(f"{str(run_dir)!r} is not a run directory (no {CONFIG_FILE}); pass "
                         "the output folder of a `reformer train` run")
    try:
        return RunConfig.from_json(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise ValueError(f"{path} is not a valid run config ({err}); it needs \"model\" and "
                         "\"training\" sections as `reformer train` writes them") from err


# ------------------------------------------------------------ finding checkpoints
@dataclass(frozen=True)
class Checkpoint:
    """A complete checkpoint: a step folder, or the run directory itself (the old layout)."""

    folder: Path
    step: int
    resave: int = 0  # k for step-N.k, the k-th later save of the same step

    @property
    def weights(self) -> Path:
        return self.folder / WEIGHTS_FILE

    @property
    def state(self) -> Path:
        return self.folder / STATE_FILE


def checkpoints(run_dir: str | Path) -> list[Checkpoint]:
    """The complete checkpoints in ``run_dir``, oldest first (an old-layout pair first)."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return []
    found = sorted((Checkpoint(p, int(m[1]), int(m[2] or 0)) for p in run_dir.iterdir()
                    if (m := _STEP_FOLDER.fullmatch(p.name)) and p.is_dir()),
                   key=lambda c: (c.step, c.resave))
    if (run_dir / WEIGHTS_FILE).is_file():
        found.insert(0, Checkpoint(run_dir, _header_step(run_dir / WEIGHTS_FILE)))
    return found


def latest_checkpoint(run_dir: str | Path) -> Checkpoint | None:
    found = checkpoints(run_dir)
    return found[-1] if found else None


def has_checkpoint(run_dir: str | Path) -> bool:
    return latest_checkpoint(run_dir) is not None


def _header_step(path: Path) -> int:
    """The step in a safetensors file's metadata, read from its header alone; -1 if unreadable."""
    with path.open("rb") as f:
        head = f.read(8)
        try:
            return _weights_step(head + f.read(int.from_bytes(head, "little")))
        except (ValueError, AttributeError):
            return -1


def _weights_step(data: bytes) -> int:
    header_len = int.from_bytes(data[:8], "little")
    meta = json.loads(data[8:8 + header_len]).get("__metadata__") or {}
    return int(meta.get("step", -1))


# ------------------------------------------------------------------------- saving
def save_checkpoint(run_dir: Path, weights: dict[str, torch.Tensor], state: dict[str, Any]
                    ) -> Checkpoint:
    """Save ``weights`` (a model's ``state_dict``) and ``state`` (which holds "step") as
    the newest checkpoint, atomically.

    The caller holds the run's :class:`RunLock`. Older checkpoints are deleted once the new one
    is complete.
    """
    remove_stale(run_dir)
    step, older = state["step"], checkpoints(run_dir)
    resave = max((c.resave + 1 for c in older if c.step == step and c.folder != run_dir),
                 default=0)
    new = Checkpoint(run_dir / (f"step-{step:08d}" + (f".{resave}" if resave else "")),
                     step, resave)
    tmp = run_dir / f"{TMP_PREFIX}{new.folder.name}"
    os.mkdir(tmp)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in weights.items()}
    _write_synced(tmp / WEIGHTS_FILE, save_safetensors(
        tensors, metadata={"step": str(step), "format": str(FORMAT)}))
    buf = io.BytesIO()
    torch.save(state, buf)
    _write_synced(tmp / STATE_FILE, buf.getvalue())
    _sync_dir(tmp)
    os.rename(tmp, new.folder)  # the switch: from here on the new checkpoint is the newest
    _sync_dir(run_dir)
    for old in older:
        _delete(old)
    return new


def _delete(checkpoint: Checkpoint) -> None:
    """Delete an older checkpoint; a step folder is renamed away first, so that a kill midway
    never leaves a half-deleted folder under a ``step-*`` name."""
    if checkpoint.folder.name.startswith("step-"):
        doomed = checkpoint.folder.with_name(f"{TMP_PREFIX}old-{checkpoint.folder.name}")
        os.rename(checkpoint.folder, doomed)
        shutil.rmtree(doomed)
    else:  # the old layout; without its weights a left-over state file is ignored
        checkpoint.weights.unlink(missing_ok=True)
        checkpoint.state.unlink(missing_ok=True)


def remove_stale(run_dir: Path) -> None:
    """Remove what killed saves left in a run directory; only call it holding the lock."""
    if not (run_dir / CONFIG_FILE).is_file():
        return  # not a run (yet): nothing here is ours to delete
    for path in run_dir.iterdir():
        name = path.name
        if name.startswith(TMP_PREFIX) or (name.startswith(".") and name.endswith(".tmp")):
            shutil.rmtree(path) if path.is_dir() else path.unlink()
    if not (run_dir / WEIGHTS_FILE).exists():
        (run_dir / STATE_FILE).unlink(missing_ok=True)


# ------------------------------------------------------------------------ loading
def load_weights(run_dir: str | Path, model: ReformerTrunk) -> int:
    """Load the newest checkpoint's weights into ``model``; returns the step they were saved at."""
    found, tensors, step = _newest_weights(
        Path(run_dir), f"{str(run_dir)!r} holds no checkpoint yet; train first or pass another "
        "run directory")
    _fit(found, tensors, model)
    return step


def _newest_weights(run_dir: Path, none: str) -> tuple[Checkpoint, dict[str, torch.Tensor], int]:
    """The newest checkpoint of ``run_dir``, its tensors and their step; ``none``: the error
    when there is no checkpoint."""
    for attempt in range(3):
        found = latest_checkpoint(run_dir)
        if found is None:
            raise ValueError(none)
        try:
            data = found.weights.read_bytes()
            break
        except FileNotFoundError:  # a running save replaced it meanwhile: look again
            if attempt == 2:
                raise
    return (found, *_decode_weights(run_dir, found, data))


def _decode_weights(run_dir: Path, found: Checkpoint, data: bytes
                    ) -> tuple[dict[str, torch.Tensor], int]:
    try:
        return load_safetensors(data), _weights_step(data)
    except (SafetensorError, ValueError) as err:
        raise _damaged(run_dir, found.weights, err) from err


def _fit(found: Checkpoint, tensors: dict[str, torch.Tensor], model: ReformerTrunk) -> None:
    """Load every tensor into ``model`` (strict); a misfit is a ValueError naming the file."""
    try:
        model.load_state_dict(tensors, strict=True)
    except RuntimeError as err:
        first = str(err).splitlines()[1].strip() if "\n" in str(err) else str(err)
        raise ValueError(f"{found.weights} does not fit the model of its {CONFIG_FILE} "
                         f"({first}); the weights come from another config") from err


HEAD_PREFIXES = ("head.", "hidden.", "slots.")  # the heads' own weights (reformer.heads, model.py)


def load_trunk(source: str | Path, model: ReformerTrunk) -> int:
    """Start ``model``'s trunk from the newest checkpoint of run directory ``source``.

    Every weight of ``model`` but its head's (:data:`HEAD_PREFIXES`) is copied from there, so
    a classifier can start from a masked LM's or a language model's trunk; the head keeps its
    fresh weights. Returns the step the weights were saved at. The two models must have the
    same trunk (d_model, layers, vocabulary, ...): a missing or differently shaped weight is
    a ValueError naming it. Attention kinds, hash rounds and causality have no weights and may
    differ.
    """
    source = Path(source)
    found, tensors, step = _newest_weights(
        source, f"init_from={str(source)!r} holds no checkpoint; pass the run directory of a "
        "run that has saved one")
    own = model.state_dict()
    trunk = [k for k in own if not k.startswith(HEAD_PREFIXES)]
    missing = [k for k in trunk if k not in tensors]
    if missing:
        raise ValueError(f"{found.weights} lacks {len(missing)} of this model's trunk weights "
                         f"(first: {missing[0]}); init_from needs a run whose model has the "
                         "same layers (same n_layers, attention layout, positions)")
    for k in trunk:
        if tensors[k].shape != own[k].shape:
            raise ValueError(f"{found.weights}: {k} is {tuple(tensors[k].shape)} there but "
                             f"{tuple(own[k].shape)} here; give this run the model config of "
                             f"{source / CONFIG_FILE} (d_model, d_ff, vocab_size, ...)")
    model.load_state_dict({k: tensors[k] for k in trunk}, strict=False)
    return step


def load_checkpoint(run_dir: Path, model: ReformerTrunk) -> dict[str, Any]:
    """Load the newest checkpoint: its weights into ``model``; returns its trainer state.

    The caller holds the run's :class:`RunLock`, so the checkpoint cannot change meanwhile.
    """
    found = latest_checkpoint(run_dir)
    if found is None:
        raise ValueError(f"{run_dir} holds no checkpoint yet, so there is nothing to resume; "
                         "start the run again instead")
    tensors, step = _decode_weights(run_dir, found, found.weights.read_bytes())
    _fit(found, tensors, model)
    if not found.state.is_file():
        raise ValueError(f"{found.folder} has weights but no {STATE_FILE}, so it cannot be "
                         "resumed; start a new run in another folder")
    try:
        state = torch.load(io.BytesIO(found.state.read_bytes()), map_location="cpu",
                           weights_only=True)
    except (RuntimeError, EOFError, ValueError, pickle.UnpicklingError) as err:
        raise _damaged(run_dir, found.state, err) from err
    if state["step"] != step:  # only the old layout can tear a pair apart
        raise ValueError(f"{run_dir}: {WEIGHTS_FILE} is from step {step} but {STATE_FILE} "
                         f"from step {state['step']} (interrupted while saving); the run cannot "
                         "be resumed exactly, start a new one")
    return state


def _damaged(run_dir: Path, path: Path, err: Exception) -> ValueError:
    """The error for a truncated or corrupt checkpoint file: which file, and what to do."""
    found = checkpoints(run_dir)
    if len(found) > 1 and found[-1].folder != run_dir:
        fix = f"delete {found[-1].folder} to fall back to the checkpoint of step {found[-2].step}"
    else:
        fix = ("no earlier checkpoint is kept: copy the run again if it was copied, or train "
               "a new run in another folder")
    reason = str(err).splitlines()[0] if str(err) else type(err).__name__
    return ValueError(f"{path} is truncated or damaged ({reason}); {fix}")


def load_model(run_dir: str | Path, device: str | torch.device = "cpu",
               n_hashes: int | None = None, attention: str | None = None,
               dedup_rounds: bool | None = None, language_model: bool = False
               ) -> tuple[ReformerTrunk, RunConfig]:
    """The trained model of a run directory (its newest checkpoint), in eval mode, and its
    configuration: a ReformerLM, or the head its task trains (reformer.heads).

    Args:
        n_hashes: rebuild the model with this many LSH rounds (the weights do not depend on
            it), e.g. 8 for a model trained with 2.
        attention: rebuild every layer with this attention (see :func:`with_attention`), e.g.
            "full" to evaluate an LSH-trained model exactly; the weights are shared.
        dedup_rounds: turn the LSH de-duplication of pairs found by several rounds on or off
            (it has no parameters).
        language_model: refuse a run that trained a head (a ValueError saying so), for
            commands that generate text.
    """
    run = read_config(run_dir)
    if language_model and task_head(run.training.task) != "lm":
        raise ValueError(f"{run_dir} trained a {run.training.task} model, which does not "
                         "generate text; pass the run directory of a language model (task text, "
                         "images or synthetic)")
    config = run.model if n_hashes is None else run.model.replace(n_hashes=n_hashes)
    if attention is not None:
        config = with_attention(config, attention)
    if dedup_rounds is not None:
        config = config.replace(dedup_rounds=dedup_rounds)
    head = task_head(run.training.task)
    n_classes = _stored_classes(Path(run_dir)) if head == "classify" else 0
    model = build_model(config, head, n_classes, run.training.pooling,
                        run.training.head_hidden, run.training.pool_width)
    load_weights(run_dir, model)
    return model.to(device).eval(), run


def _stored_classes(run_dir: Path) -> int:
    """A classifier's number of classes: the rows of its newest checkpoint's head."""
    found = latest_checkpoint(run_dir)
    if found is None:
        return 2  # load_weights says that there is no checkpoint
    try:
        with safe_open(str(found.weights), framework="pt") as f:
            return int(f.get_slice("head.weight").get_shape()[0])
    except (SafetensorError, OSError, KeyError) as err:
        raise _damaged(run_dir, found.weights, err) from err


def with_attention(config: ReformerConfig, attention: str) -> ReformerConfig:
    """``config`` with every layer's attention set by a short name.

    ``full``, ``lsh`` (the config's rounds) or ``lsh-R`` (R rounds). Full and LSH layers share
    one query/key projection and so the same parameters: weights load into either. (Local
    attention has separate query and key projections, so it is not offered.)
    """
    kind, _, rounds = attention.partition("-")
    if kind not in ("full", "lsh") or (rounds and (kind != "lsh" or not rounds.isdigit()
                                                   or int(rounds) < 1)):
        raise ValueError(f"attention {attention!r} is unknown; use full, lsh or lsh-R with R "
                         "hash rounds, e.g. lsh-4")
    changes: dict = {"attn_layers": (kind,)}
    if rounds:
        changes["n_hashes"] = int(rounds)
    return config.replace(**changes)


def config_differences(saved: ReformerConfig, requested: ReformerConfig) -> list[str]:
    """``["name: saved -> requested", ...]`` for the fields that differ."""
    a, b = saved.to_dict(), requested.to_dict()
    return [f"{k}: {a[k]!r} -> {b[k]!r}" for k in sorted(a) if a[k] != b[k]]
