"""Probe: does returning glibc's free heap pages between layers stop peak memory growing with depth?

    TRIM=1 python benchmarks/malloc_trim_probe.py --system ours --length 16384 --layers 12 --steps 2

Runs ``train_step.py`` (same arguments, same JSON output) with ``malloc_trim(0)`` called after
every reversible block's forward and after every block's backward (its attention half runs
last) when ``TRIM=1``; with ``TRIM=0`` it is train_step.py unchanged. Linux/glibc only. The
measured figures are in the issue-3 notes; this is a lead, not (yet) a library feature.
"""

from __future__ import annotations

import ctypes
import os
import runpy
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def install_trim() -> None:
    from reformer import reversible

    libc = ctypes.CDLL("libc.so.6")
    for owner, name in ((reversible.AttentionHalf, "backward_"),
                        (reversible.ReversibleBlock, "forward_")):
        original = getattr(owner, name)

        def trimmed(self, *args, _original=original, **kwargs):
            out = _original(self, *args, **kwargs)
            libc.malloc_trim(0)
            return out

        setattr(owner, name, trimmed)


if __name__ == "__main__":
    sys.path.insert(0, str(HERE))
    if os.environ.get("TRIM") == "1":
        install_trim()
    sys.argv = [str(HERE / "train_step.py"), *sys.argv[1:]]
    runpy.run_path(str(HERE / "train_step.py"), run_name="__main__")
