"""The training step and evaluation shared by the demo (and later the full trainer).

Metric: bits per character (byte) = mean next-token cross-entropy in nats / ln 2.
"""

from __future__ import annotations

import math

import torch

from reformer.model import ReformerLM

LN2 = math.log(2.0)


def train_step(model: ReformerLM, optimizer: torch.optim.Optimizer, batch: torch.Tensor,
               clip: float | None = 1.0) -> float:
    """One AdamW-style step on a (B, L) batch; returns the loss in nats."""
    model.train()
    out = model(batch, labels=batch, return_logits=False)
    optimizer.zero_grad(set_to_none=True)
    out.loss.backward()
    if clip:
        torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
    optimizer.step()
    return out.loss.item()


@torch.no_grad()
def evaluate_bpc(model: ReformerLM, windows: torch.Tensor, n_hashes: int | None = None,
                 seed: int = 0) -> float:
    """Bits per character over (N, L) windows, one window at a time.

    The global RNG is seeded (and restored afterwards) so that LSH rotations are the same for
    every evaluation.
    """
    was_training = model.training
    model.eval()
    total = 0.0
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for w in windows:
            w = w[None].to(next(model.parameters()).device)
            total += model(w, labels=w, n_hashes=n_hashes, return_logits=False).loss.item()
    model.train(was_training)
    return total / len(windows) / LN2
