"""A run directory's guards: one training run at a time (a lock naming its holder), and no
run written among a user's own files.

Two runs in one directory would interleave metrics and overwrite each other's checkpoints, so
a Trainer holds an exclusive ``flock`` on ``.lock``; the kernel releases it when the process
exits or dies, so a killed run never leaves a stale lock.
"""

from __future__ import annotations

import fcntl
import io
import os
import socket
from pathlib import Path

from reformer.training.checkpoint import CONFIG_FILE, LOCK_FILE, has_checkpoint


class RunLock:
    """An exclusive ``flock`` on ``run_dir/.lock``, whose text names the holder (pid, host).

    The kernel drops the lock when its file is closed, and so when the process exits or is
    killed: a lock is never left stale. ``acquire`` and ``release`` may be repeated.
    """

    def __init__(self, run_dir: Path) -> None:
        self.path = run_dir / LOCK_FILE
        self._file: io.TextIOWrapper | None = None

    def acquire(self) -> None:
        if self._file is not None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        f = self.path.open("a+", encoding="utf-8")  # "a+": never truncates the holder's text
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "a process that is starting"
            f.close()
            raise ValueError(f"{self.path.parent} is in use by another training run ({holder}, "
                             f"which holds {self.path}); wait for it to end or stop it, or "
                             "choose another output folder") from None
        f.truncate(0)
        f.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
        f.flush()
        self._file = f

    def release(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def check_new_run_dir(run_dir: Path) -> None:
    """A ValueError unless a new run may start in ``run_dir``: a new or empty folder, or a run
    directory without a checkpoint. Anything else holds someone's files (or a trained run)."""
    if run_dir.exists() and not run_dir.is_dir():
        raise ValueError(f"{run_dir} is a file, not a folder; choose a new folder for the run")
    if has_checkpoint(run_dir):
        raise ValueError(f"{run_dir} already holds a trained run; pass --resume to continue "
                         "it, or choose another --out")
    if run_dir.is_dir() and not (run_dir / CONFIG_FILE).is_file():
        others = sorted(p.name for p in run_dir.iterdir() if p.name != LOCK_FILE)
        if others:
            shown = ", ".join(others[:3]) + (", ..." if len(others) > 3 else "")
            raise ValueError(f"{run_dir} is not empty ({shown}) and is not a run directory (no "
                             f"{CONFIG_FILE}); a run writes its weights, metrics and plot "
                             "there, so choose a new or empty folder")
