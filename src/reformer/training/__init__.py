"""Training: the loop, its configuration, checkpoints, metrics and plots.

Importable on their own; the ``reformer train | eval | synthetic`` commands are thin wrappers
over them. The data side of a run is a task (reformer.data.task: text, images, synthetic).
"""

from reformer.training.checkpoint import load_model, read_config, with_attention
from reformer.training.config import RunConfig, TrainConfig, resolve_run_config
from reformer.training.evaluate import evaluate_attentions, evaluate_run
from reformer.training.metrics import evaluate_bpc, evaluate_sequences, plot_metrics
from reformer.training.trainer import Callback, EvalReport, RunResult, StepReport, Trainer

__all__ = [
    "Callback",
    "EvalReport",
    "RunConfig",
    "RunResult",
    "StepReport",
    "TrainConfig",
    "Trainer",
    "evaluate_attentions",
    "evaluate_bpc",
    "evaluate_run",
    "evaluate_sequences",
    "load_model",
    "plot_metrics",
    "read_config",
    "resolve_run_config",
    "with_attention",
]
