"""What resuming a run checks and restores besides the weights: the config changes allowed,
the data, the number of processes, and each process's RNG stream.

A checkpoint holds every rank's RNG state (``rng["ranks"]``, rank 0's also at the top level as
in one-process checkpoints) and the number of processes (``world``; 1 when absent). Resuming
with another number of processes is refused: the global batches would be the same, but each
process's dropout and hashing stream would not.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from reformer.config import ReformerConfig
from reformer.training import checkpoint as ckpt
from reformer.training.config import RESUMABLE_FIELDS, RunConfig


def rank_seed(seed: int, rank: int) -> int:
    """The global RNG seed of ``rank`` after the model is built (see the module docstring)."""
    return seed + rank * 2**32


def rng_state(device: torch.device) -> dict[str, torch.Tensor]:
    """This process's global RNG state: the CPU's and, on CUDA, the device's."""
    rng = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        rng["cuda"] = torch.cuda.get_rng_state(device)
    return rng


def set_rng_state(rng: dict[str, torch.Tensor], device: torch.device) -> None:
    torch.set_rng_state(rng["torch"])
    if device.type == "cuda" and "cuda" in rng:
        torch.cuda.set_rng_state(rng["cuda"], device)


def check_resumable(run_dir: Path, state: dict[str, Any], fingerprint: dict[str, int],
                    world: int) -> None:
    """A ValueError unless a checkpoint's trainer ``state`` continues with this data
    (``fingerprint``) on ``world`` processes."""
    data = state["data"]
    if "fingerprint" not in data:  # saved before tasks existed: text sizes only
        data["fingerprint"] = {k: data[k] for k in ("train_bytes", "val_bytes")}
    if data["fingerprint"] != fingerprint:
        diff = ", ".join(f"{k} {data['fingerprint'].get(k)} -> {v}"
                         for k, v in fingerprint.items() if data["fingerprint"].get(k) != v)
        raise ValueError(f"the data changed since {run_dir} was saved ({diff}); "
                         "resume with the same data or start a new run")
    saved = state.get("world", 1)
    if saved != world:
        raise ValueError(f"{run_dir} was trained on {saved} process(es) and this run has "
                         f"{world}; every process's RNG stream depends on it, so resume it with "
                         f"torchrun --nproc_per_node={saved} (or start a new run)")


def merge_for_resume(run_dir: Path, saved: RunConfig, model: ReformerConfig | None,
                      changes: dict[str, Any]) -> RunConfig:
    """The saved config with the resumable changes applied; other differences are errors."""
    diff = [] if model is None else ckpt.config_differences(saved.model, model)
    if diff:
        raise ValueError(f"{run_dir} was trained with another model config ({'; '.join(diff)}); "
                         "resume without --preset/--config, or choose a new --out")
    current = saved.training.to_dict()
    requested = saved.training.replace(**changes).to_dict()  # validates the new values
    fixed = [f"{k}: {current[k]!r} -> {requested[k]!r}" for k in sorted(changes)
             if k not in RESUMABLE_FIELDS and requested[k] != current[k]]
    if fixed:
        raise ValueError(f"{run_dir} was trained with other settings ({'; '.join(fixed)}); "
                         f"only {', '.join(sorted(RESUMABLE_FIELDS))} may change on resume")
    if "sequence" in (current["parallel"], requested["parallel"]) \
            and current["parallel"] != requested["parallel"]:
        raise ValueError(f"{run_dir} was trained with parallel={current['parallel']!r}; it cannot "
                         f"resume with {requested['parallel']!r} (sequence parallelism reads "
                         "other batches per process); resume without --parallel")
    keep = {k: v for k, v in changes.items() if k in RESUMABLE_FIELDS}
    return RunConfig(saved.model, saved.training.replace(**keep), saved.preset)
