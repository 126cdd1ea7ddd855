"""Reading benchmark records (JSON lines written by run_all.py) and formatting their values.

A record is one point: ``sweep`` (matmul, lengths, depth, hashes, bf16, million), ``system``,
``length``, ``n_layers``, ``n_hashes``, ``status`` (ok, too_slow, timeout, oom, error) and, when
ok, ``step_seconds`` (median), ``peak_rss_gib``, ``losses``; points run on a GPU add
``peak_device_gib``. When a point was measured more than once, the last record wins.
"""

from __future__ import annotations

import contextlib
import json
import platform
from pathlib import Path

# A point whose process got less than this share of its CPUs ran on a busy machine.
BUSY_SHARE = 0.8
Key = tuple[str, str, int, int, int]  # (sweep, system, length, n_layers, n_hashes)


class Results:
    """The records of one or more JSONL files, indexed by (sweep, system, L, layers, R)."""

    def __init__(self, paths: list[Path]) -> None:
        self.paths = paths
        self.records: list[dict] = []
        for path in paths:
            with path.open() as f:
                self.records += [json.loads(line) for line in f if line.strip()]
        self.points: dict[Key, dict] = {}
        self.matmul: dict | None = None
        for r in self.records:
            if r.get("mode") == "matmul":
                self.matmul = r if r.get("status") == "ok" else self.matmul
            else:
                self.points[key(r)] = r

    def get(self, sweep: str, system: str, length: int, layers: int = 6,
            hashes: int = 4) -> dict | None:
        return self.points.get((sweep, system, length, layers, hashes))

    def sweep(self, name: str) -> list[dict]:
        return [r for k, r in self.points.items() if k[0] == name]

    def any_smoke(self) -> bool:
        return any(r.get("smoke") for r in self.records)

    def on_gpu(self) -> bool:
        return any(r.get("device", "cpu") != "cpu" for r in self.records)


def key(r: dict) -> Key:
    return (r["sweep"], r["system"], r["length"], r["n_layers"], r["n_hashes"])


def ok(r: dict | None) -> bool:
    return r is not None and r.get("status") == "ok"


def seconds_lower_bound(r: dict | None) -> float | None:
    """A step time we know the point took at least: its time, or when it was stopped for being
    slow, the time it had run."""
    if r is None:
        return None
    if r["status"] in ("ok", "too_slow"):
        return r["step_seconds"]
    if r["status"] == "timeout":
        return r.get("seconds_before_stop")
    return None


def memory_gib(r: dict) -> float:
    """The point's peak memory: allocated GPU memory on a GPU, else the process's RSS."""
    return r.get("peak_device_gib", r.get("peak_rss_gib", 0.0))


def length_label(n: int) -> str:
    """1024 -> '1K', 1048576 -> '1M', 1000 -> '1000'."""
    for unit, scale in (("M", 2**20), ("K", 2**10)):
        if n % scale == 0:
            return f"{n // scale}{unit}"
    return str(n)


def cell(r: dict | None) -> str:
    """'12.3 s / 1.42 GiB', or what stopped the point."""
    if r is None:
        return "—"
    status = r["status"]
    if status == "ok":
        busy = " ⚠" if r.get("cpu_share", 1.0) < BUSY_SHARE else ""
        return f"{r['step_seconds']:.3g} s / {memory_gib(r):.2f} GiB{busy}"
    if status == "too_slow":
        return f"too slow ({r['step_seconds']:.0f} s step)"
    if status == "timeout":
        return f"timeout (> {r.get('seconds_before_stop', 0):.0f} s)"
    if status == "oom":
        return f"out of memory (> {memory_gib(r):.1f} GiB)"
    return status


def table(header: list[str], rows: list[list[str]]) -> str:
    """A Markdown table."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def cpu_model() -> str:
    """The CPU's model name (recorded with every result: machines differ between runs)."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor()
