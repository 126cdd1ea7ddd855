"""Run directories: config, weights and trainer state, written atomically.

A run directory holds

    config.json          {"format": 1, "preset": ..., "model": ReformerConfig, "training": ...}
    model.safetensors    the weights (metadata: the step they belong to)
    trainer_state.pt     optimizer, schedule (step, elapsed time), RNG and data-sampler state
    metrics.jsonl        see reformer.training.metrics
    plot.png             train and validation curves

Every file is written to a temporary name, synced and renamed over the old one, so an
interruption leaves either the old or the new file, never half of one. The weights and the
trainer state are two files; both record their step, and loading refuses a mismatched pair (a
crash between the two renames) instead of resuming from it silently.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from reformer.config import ReformerConfig
from reformer.model import ReformerLM
from reformer.training.config import RunConfig

FORMAT = 1
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
STATE_FILE = "trainer_state.pt"
METRICS_FILE = "metrics.jsonl"
PLOT_FILE = "plot.png"


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to a temporary file beside ``path``, sync it, then rename it over."""
    tmp = path.with_name(f".{path.name}.tmp")
    with tmp.open("wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_config(run_dir: Path, run: RunConfig) -> None:
    atomic_write_bytes(run_dir / CONFIG_FILE, run.to_json().encode("utf-8"))


def read_config(run_dir: str | Path) -> RunConfig:
    """The run configuration saved in ``run_dir``; a ValueError says what is wrong."""
    path = Path(run_dir) / CONFIG_FILE
    if not path.is_file():
        raise ValueError(f"{str(run_dir)!r} is not a run directory (no {CONFIG_FILE}); pass "
                         "the --out folder of a `reformer train` run")
    try:
        return RunConfig.from_json(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise ValueError(f"{path} is not a valid run config ({err}); it needs \"model\" and "
                         "\"training\" sections as `reformer train` writes them") from err


def has_checkpoint(run_dir: str | Path) -> bool:
    return (Path(run_dir) / WEIGHTS_FILE).is_file()


def save_weights(run_dir: Path, model: ReformerLM, step: int) -> None:
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    data = save_safetensors(tensors, metadata={"step": str(step), "format": str(FORMAT)})
    atomic_write_bytes(run_dir / WEIGHTS_FILE, data)


def load_weights(run_dir: str | Path, model: ReformerLM) -> int:
    """Load ``model.safetensors`` into ``model``; returns the step it was saved at."""
    path = Path(run_dir) / WEIGHTS_FILE
    if not path.is_file():
        raise ValueError(f"{str(run_dir)!r} holds no {WEIGHTS_FILE} yet; train first or pass "
                         "another run directory")
    data = path.read_bytes()
    tensors = load_safetensors(data)
    try:
        model.load_state_dict(tensors, strict=True)
    except RuntimeError as err:
        first = str(err).splitlines()[1].strip() if "\n" in str(err) else str(err)
        raise ValueError(f"{path} does not fit the model of its {CONFIG_FILE} ({first}); the "
                         "weights come from another config") from err
    return _weights_step(data)


def _weights_step(data: bytes) -> int:
    header_len = int.from_bytes(data[:8], "little")
    meta = json.loads(data[8:8 + header_len]).get("__metadata__", {})
    return int(meta.get("step", -1))


def save_state(run_dir: Path, state: dict[str, Any]) -> None:
    import io

    buf = io.BytesIO()
    torch.save(state, buf)
    atomic_write_bytes(run_dir / STATE_FILE, buf.getvalue())


def load_state(run_dir: Path, weights_step: int) -> dict[str, Any]:
    """The trainer state saved with the weights of ``weights_step``."""
    path = run_dir / STATE_FILE
    if not path.is_file():
        raise ValueError(f"{run_dir} has weights but no {STATE_FILE}, so it cannot be resumed; "
                         "start a new run with another --out")
    state = torch.load(path, map_location="cpu", weights_only=True)
    if state["step"] != weights_step:
        raise ValueError(f"{run_dir}: {WEIGHTS_FILE} is from step {weights_step} but "
                         f"{STATE_FILE} from step {state['step']} (interrupted while saving); "
                         "the run cannot be resumed exactly, start a new one")
    return state


def load_model(run_dir: str | Path, device: str | torch.device = "cpu",
               n_hashes: int | None = None, attention: str | None = None,
               dedup_rounds: bool | None = None) -> tuple[ReformerLM, RunConfig]:
    """The trained model of a run directory, in eval mode, and its configuration.

    Args:
        n_hashes: rebuild the model with this many LSH rounds (the weights do not depend on
            it), e.g. 8 for a model trained with 2.
        attention: rebuild every layer with this attention (see :func:`with_attention`), e.g.
            "full" to evaluate an LSH-trained model exactly; the weights are shared.
        dedup_rounds: turn the LSH de-duplication of pairs found by several rounds on or off
            (it has no parameters).
    """
    run = read_config(run_dir)
    config = run.model if n_hashes is None else run.model.replace(n_hashes=n_hashes)
    if attention is not None:
        config = with_attention(config, attention)
    if dedup_rounds is not None:
        config = config.replace(dedup_rounds=dedup_rounds)
    model = ReformerLM(config)
    load_weights(run_dir, model)
    return model.to(device).eval(), run


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
