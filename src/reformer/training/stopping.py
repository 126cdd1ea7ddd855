"""When a training run stops: its step count, its time budget, a signal or a request, and,
with several processes, the same decision on every one of them.

Ctrl-C and SIGTERM ask the loop to stop after the current step (and save); a second Ctrl-C
stops one process at once, without saving. With several processes every step ends with one
small all-reduce of the processes' reasons (the most urgent wins, STOP_CODES), so they all stop
after the same step and save the checkpoint together. torchrun starts the processes in their
own session, so a terminal's Ctrl-C reaches the launcher, which forwards it; there a repeated
signal does not abort a process's save (the others would wait for it in a collective), and
the launcher kills the processes if they take longer than its shutdown timeout (30 s).
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Callable, Iterator

import torch

from reformer.parallel.world import World
from reformer.training.config import TrainConfig

STOP_CODES = {"steps": 1, "time": 2, "SIGINT": 3, "SIGTERM": 4}  # agreed by the largest


class StopControl:
    """The stop decision of one training loop."""

    def __init__(self, world: World, device: torch.device) -> None:
        self.world, self.device = world, device
        self.requested: str | None = None

    def request(self, reason: str) -> None:
        """Stop after the current step (and save a checkpoint)."""
        self.requested = reason

    def reason(self, cfg: TrainConfig, step: int, elapsed_s: float, step_time: float
               ) -> str | None:
        """Why to stop now, if so, the same on every process; a time budget stops when the
        next step would overrun it."""
        mine = self.requested
        if mine is None and step >= cfg.steps:
            mine = "steps"
        if mine is None and cfg.max_minutes is not None \
                and elapsed_s + step_time > 60.0 * cfg.max_minutes:
            mine = "time"
        return self._agree(mine)

    def _agree(self, reason: str | None) -> str | None:
        """The reason every process adopts: the most urgent of theirs."""
        if not self.world.distributed:
            return reason
        mine = 0 if reason is None else STOP_CODES.get(reason, len(STOP_CODES) + 1)
        agreed = self.world.all_max(mine, self.device)
        if agreed == mine:
            return reason
        names = {code: name for name, code in STOP_CODES.items()}
        return names.get(agreed, "another process's stop request")

    @contextlib.contextmanager
    def signals(self, on_request: Callable[[str], None]) -> Iterator[None]:
        """Within the block, SIGINT and SIGTERM request a stop (and call ``on_request`` with
        the signal's name); the previous handlers come back afterwards. Main thread only."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return

        def handler(signum: int, frame: object) -> None:
            if self.requested is not None:
                if signum == signal.SIGINT and not self.world.distributed:
                    raise KeyboardInterrupt  # a second Ctrl-C: stop now, without saving
                return  # one process alone cannot stop: the launcher's timeout does
            self.request(signal.Signals(signum).name)
            on_request(self.requested)

        previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for sig, old in previous.items():
                signal.signal(sig, old)
