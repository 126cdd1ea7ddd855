"""What the training loop reports: per step, per evaluation, at the end, and to a Callback.

The library never prints; the CLI's progress bar is a :class:`Callback`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from reformer.training.trainer import Trainer


@dataclass
class StepReport:
    step: int  # steps completed
    steps: int
    loss: float  # nats, mean over the step's windows
    bpc: float
    lr: float
    tokens_per_s: float
    elapsed_s: float
    eta_s: float
    progress: float  # fraction of the run done, by steps or by time (see optim.progress)


@dataclass
class EvalReport:
    step: int
    val_bpc: float  # with the model's own n_hashes
    by_n_hashes: dict[int, float] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)  # the task's, e.g. accuracy


@dataclass
class RunResult:
    run_dir: Path
    step: int
    stop_reason: str  # "steps", "time", or the signal / reason given to request_stop
    evals: list[EvalReport]

    @property
    def interrupted(self) -> bool:
        return self.stop_reason not in ("steps", "time")


class Callback:
    """Hooks the loop calls; override what you need."""

    def on_step(self, trainer: Trainer, report: StepReport) -> None: ...
    def on_eval(self, trainer: Trainer, report: EvalReport) -> None: ...
    def on_checkpoint(self, trainer: Trainer, reason: str) -> None: ...
    def on_stop_requested(self, trainer: Trainer, reason: str) -> None: ...
