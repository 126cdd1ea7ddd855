"""Training: the loop, its configuration, checkpoints, metrics and plots.

Importable on their own; the ``reformer train | eval`` commands are thin wrappers over them.
"""

from reformer.training.checkpoint import load_model, read_config
from reformer.training.config import RunConfig, TrainConfig, resolve_run_config
from reformer.training.evaluate import evaluate_run
from reformer.training.metrics import evaluate_bpc, plot_metrics
from reformer.training.trainer import Callback, EvalReport, RunResult, StepReport, Trainer

__all__ = [
    "Callback",
    "EvalReport",
    "RunConfig",
    "RunResult",
    "StepReport",
    "TrainConfig",
    "Trainer",
    "evaluate_bpc",
    "evaluate_run",
    "load_model",
    "plot_metrics",
    "read_config",
    "resolve_run_config",
]
