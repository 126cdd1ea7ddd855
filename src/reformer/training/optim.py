"""AdamW and its learning-rate schedule: linear warm-up, then cosine decay.

    lr(s) = lr * min(1, (s + 1) / warmup) * (r + (1 - r) * (1 + cos(pi * p)) / 2)

where r = ``min_lr_ratio`` and p in [0, 1] is the run's progress: the fraction of ``steps``
done, or of ``max_minutes`` spent, whichever is larger. The schedule is a pure function of
(step, elapsed time), so resuming needs only those two numbers, which the trainer saves.

Decision: weight decay applies to matrices (the linear layers' weights) only, not to biases,
LayerNorm gains, token or positional embeddings (the usual choice since GPT-2).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from reformer.training.config import TrainConfig


def build_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.AdamW:
    """AdamW over ``model``'s parameters; decay on nn.Linear weights only."""
    decay, no_decay = [], []
    for module in model.modules():
        for name, param in module.named_parameters(recurse=False):
            is_matrix = isinstance(module, nn.Linear) and name == "weight"
            (decay if is_matrix else no_decay).append(param)
    groups = [{"params": decay, "weight_decay": config.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=config.lr, betas=config.betas)


def progress(config: TrainConfig, step: int, elapsed_s: float) -> float:
    """Fraction of the run done in [0, 1]: by steps, or by time if that is further along."""
    done = step / config.steps
    if config.max_minutes is not None:
        done = max(done, elapsed_s / (60.0 * config.max_minutes))
    return min(1.0, done)


def lr_at(config: TrainConfig, step: int, elapsed_s: float = 0.0) -> float:
    """The learning rate for the update that follows ``step`` completed steps."""
    warm = min(1.0, (step + 1) / config.warmup_steps) if config.warmup_steps else 1.0
    r = config.min_lr_ratio
    cosine = r + (1.0 - r) * 0.5 * (1.0 + math.cos(math.pi * progress(config, step, elapsed_s)))
    return config.lr * warm * cosine


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
