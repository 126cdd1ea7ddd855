"""Run the benchmark sweeps of issue 3, one fresh process per point, into a JSONL file.

    python benchmarks/run_all.py                          # everything (hours; see README)
    python benchmarks/run_all.py --name smoke --smoke --only matmul,lengths \\
        --systems ours,hf --max-length 4096               # a few minutes

Sweeps (``--only``, comma-separated; default all, in this order):
    matmul   the machine's fp32 / bf16 torch.mm rate (for the FLOP fraction)
    lengths  every system at 1K .. 1M (6 layers, 4 hash rounds); a system stops after its first
             failure (out of memory, error, or a step over --max-seconds)
    depth    ours at 64K with 2, 6, 12 layers
    hashes   ours at 16K with 1, 2, 4, 8 hash rounds
    bf16     ours in fp32 and under bf16 autocast at 64K
    million  ours at 1M tokens with 3 layers (one timed step)
    launches what one layer of ours issues per training step at 4K, 16K, 64K (--launch-lengths):
             GPU kernel launches, or on the CPU the cuda plan's operators

Each point runs ``train_step.py`` in a fresh interpreter (the anchors' venv by default) under a
watchdog that kills it when its resident memory passes --max-gib (status ``oom``) or a step
runs past --max-seconds (status ``timeout``). Every point, failed or not, is appended as one
JSON line to benchmarks/results/<name>.jsonl with the sweep, the run name and the date.
``--device cuda`` runs every point on the GPU instead (benchmarks/README.md, "On a GPU").
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import json
import queue
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from results_io import BUSY_SHARE

HERE = Path(__file__).resolve().parent
ANCHORS_PYTHON = HERE / ".venv-anchors" / "bin" / "python"
SWEEPS = ("matmul", "lengths", "depth", "hashes", "bf16", "million", "launches")
SYSTEMS = "ours,hf,lucidrains,sdpa,sdpa-ckpt"
GRACE_SECONDS = 30.0


def parse_length(text: str) -> int:
    """'4K' -> 4096, '1M' -> 1048576, '1000' -> 1000."""
    text = text.strip().upper()
    scale = {"K": 2**10, "M": 2**20}.get(text[-1:], 1)
    return int(text[:-1] if scale > 1 else text) * scale


def int_list(text: str) -> list[int]:
    return [parse_length(t) for t in text.split(",") if t.strip()]


def rss_gib(pid: int) -> float:
    """Current resident set of ``pid`` in GiB (0 when it has gone)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 2**20
    except OSError:
        pass
    return 0.0


def run_point(cmd: list[str], max_seconds: float, max_gib: float) -> dict:
    """Run one train_step.py command under the watchdog; return its result record."""
    lines: queue.Queue[str | None] = queue.Queue()
    start = time.monotonic()
    with tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, text=True, cwd=HERE)

        def read() -> None:
            for line in proc.stdout:
                lines.put(line)
            lines.put(None)

        threading.Thread(target=read, daemon=True).start()
        try:
            result, killed, watched_gib = watch(proc, lines, max_seconds, max_gib)
        finally:  # also on Ctrl-C or SIGTERM: never leave a point running
            if proc.poll() is None:
                proc.kill()
        rc = proc.wait()
        err.seek(0)
        stderr_tail = err.read()[-2000:]
    if result is not None:
        return result
    status = killed or ("oom" if rc == -9 else "error")
    return {"event": "result", "status": status, "returncode": rc,
            "seconds_before_stop": time.monotonic() - start,
            "peak_rss_gib": watched_gib, "stderr_tail": stderr_tail}


def watch(proc: subprocess.Popen, lines: queue.Queue, max_seconds: float,
          max_gib: float) -> tuple[dict | None, str | None, float]:
    """Read the child's JSON lines until it ends; kill it when it passes ``max_gib`` of
    resident memory or goes ``max_seconds`` + grace without finishing a step.

    Returns (result record or None, 'oom' | 'timeout' | None, the largest RSS seen in GiB).
    """
    result, killed, watched_gib = None, None, 0.0
    last_event = time.monotonic()
    while True:
        try:
            line = lines.get(timeout=0.5)
            if line is None:
                return result, killed, watched_gib
            record = json.loads(line)
            last_event = time.monotonic()
            if record.get("event") == "result":
                result = record
        except queue.Empty:
            pass
        except json.JSONDecodeError:
            continue
        watched_gib = max(watched_gib, rss_gib(proc.pid))
        if killed is None and watched_gib > max_gib:
            killed = "oom"
        elif killed is None and time.monotonic() - last_event > max_seconds + GRACE_SECONDS:
            killed = "timeout"
        if killed is not None and proc.poll() is None:
            proc.kill()


def git_commit() -> str:
    """HEAD, and when src/ has uncommitted changes '+dirty:' and a digest of src/'s files, so
    that points measured on different working trees can be told apart."""
    def git(*cmd: str) -> str:
        return subprocess.run(["git", *cmd], cwd=HERE, capture_output=True, text=True).stdout
    head = git("rev-parse", "--short", "HEAD").strip() or "unknown"
    if not git("status", "--porcelain", "--", "../src").strip():
        return head
    digest = hashlib.sha1()
    for path in sorted((HERE.parent / "src").rglob("*.py")):
        digest.update(path.read_bytes())
    return f"{head}+dirty:{digest.hexdigest()[:8]}"


class Runner:
    """Builds train_step.py commands, runs them and appends their records to the JSONL file."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.out = HERE / "results" / f"{args.name}.jsonl"
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self.commit = git_commit()

    def point(self, sweep: str, system: str = "ours", length: int = 4096, layers: int = 6,
              hashes: int = 4, *, mode: str = "step", max_seconds: float | None = None,
              steps: int | None = None) -> dict:
        """Run one point in a fresh process and append its record (also on failure)."""
        a = self.args
        max_seconds = max_seconds or a.max_seconds
        what = {"mode": mode} if mode == "matmul" else {
            "mode": mode, "system": system, "length": length, "n_layers": layers,
            "n_hashes": hashes}
        cmd = [a.python, str(HERE / "train_step.py"), "--mode", mode, "--device", a.device]
        if mode == "launches":
            cmd += ["--length", str(length), "--hashes", str(hashes)]
        if mode == "step":
            cmd += ["--system", system, "--length", str(length), "--layers", str(layers),
                    "--hashes", str(hashes), "--steps", str(steps or a.steps),
                    "--warmup", str(a.warmup), "--max-seconds", str(max_seconds),
                    "--budget-seconds", str(a.budget_seconds)]
        if a.dry_run:
            print(" ".join(cmd))
            return {"status": "dry-run"}
        for attempt in range(1 + a.retry_busy):
            record = {**what, **run_point(cmd, max_seconds, a.max_gib), "attempts": attempt + 1}
            if record.get("cpu_share", 1.0) >= BUSY_SHARE or attempt == a.retry_busy:
                break
            print(f"  busy machine (cpu share {record['cpu_share']:.2f}); measuring again",
                  flush=True)
        record.update(sweep=sweep, run=a.name, smoke=a.smoke, commit=self.commit,
                      date=dt.datetime.now().isoformat(timespec="seconds"),
                      command=" ".join(cmd[1:]).replace(str(HERE) + "/", "benchmarks/"))
        with self.out.open("a") as f:
            f.write(json.dumps(record) + "\n")
        print(summary(record), flush=True)
        return record


def summary(r: dict) -> str:
    if r.get("mode") == "launches" and r["status"] == "ok":
        return f"[{r['sweep']}] L={r['length']}: {r['per_layer']} {r['counted']} per layer"
    if r.get("mode") == "matmul":
        return f"[{r['sweep']}] fp32 {r['fp32_gflops']:.0f} / bf16 {r['bf16_gflops']:.0f} GFLOP/s"
    what = f"{r.get('system', '?')} L={r.get('length', '?')} layers={r.get('n_layers', '?')} " \
           f"R={r.get('n_hashes', '?')}"
    if r["status"] == "ok":
        return (f"[{r['sweep']}] {what}: {r['step_seconds']:.2f} s, "
                f"{r['peak_rss_gib']:.2f} GiB, loss {r['final_loss']:.3f}")
    return f"[{r['sweep']}] {what}: {r['status'].upper()} ({r.get('peak_rss_gib', 0):.2f} GiB)"


def sweep_lengths(run: Runner, systems: list[str], lengths: list[int]) -> None:
    alive = list(systems)
    for length in lengths:  # length-major, so that ratios at one L are measured close in time
        for system in list(alive):
            r = run.point("lengths", system, length)
            if r["status"] not in ("ok", "dry-run"):
                alive.remove(system)


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    if not Path(a.python).exists():
        print(f"run_all: {a.python} not found; run `bash benchmarks/setup_anchors.sh` or pass "
              "--python", file=sys.stderr)
        return 2
    only = a.only.split(",")
    unknown = sorted(set(only) - set(SWEEPS))
    if unknown:
        print(f"run_all: unknown sweeps {unknown}; use some of {SWEEPS}", file=sys.stderr)
        return 2
    run = Runner(a)
    lengths = [n for n in int_list(a.lengths) if n <= a.max_length]
    if "matmul" in only:
        run.point("matmul", mode="matmul")
    if "lengths" in only:
        sweep_lengths(run, a.systems.split(","), lengths)
    if "depth" in only:
        for layers in int_list(a.depths):
            run.point("depth", "ours", a.depth_length, layers=layers)
    if "hashes" in only:
        for rounds in int_list(a.hash_rounds):
            run.point("hashes", "ours", a.hash_length, hashes=rounds)
    if "bf16" in only:
        for length in int_list(a.bf16_lengths):
            for system in ("ours", "ours-bf16"):
                run.point("bf16", system, length)
    if "million" in only:
        run.point("million", "ours", a.million_length, layers=a.million_layers,
                  max_seconds=a.million_max_seconds, steps=1)
    if "launches" in only:
        for length in int_list(a.launch_lengths):
            run.point("launches", length=length, mode="launches")
    print(f"results in {run.out}")
    return 0


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--name", default="full", help="results/<name>.jsonl (appended)")
    p.add_argument("--only", default=",".join(SWEEPS), help=f"sweeps among {SWEEPS}")
    p.add_argument("--systems", default=SYSTEMS, help="systems of the lengths sweep")
    p.add_argument("--lengths", default="1K,4K,16K,64K,256K,1M")
    p.add_argument("--max-length", type=parse_length, default=2**20,
                   help="drop lengths above this from the lengths sweep")
    p.add_argument("--depths", default="2,6,12")
    p.add_argument("--depth-length", type=parse_length, default=2**16)
    p.add_argument("--hash-rounds", default="1,2,4,8")
    p.add_argument("--hash-length", type=parse_length, default=2**14)
    p.add_argument("--bf16-lengths", default="64K")
    p.add_argument("--million-length", type=parse_length, default=2**20)
    p.add_argument("--million-layers", type=int, default=3)
    p.add_argument("--million-max-seconds", type=float, default=3600.0)
    p.add_argument("--launch-lengths", default="4K,16K,64K")
    p.add_argument("--steps", type=int, default=3, help="timed steps per point (median)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--max-seconds", type=float, default=300.0,
                   help="a step slower than this stops the system")
    p.add_argument("--budget-seconds", type=float, default=900.0,
                   help="time for a point's timed steps; fewer (>= 1) when exceeded")
    p.add_argument("--max-gib", type=float, default=20.0,
                   help="kill a point whose resident memory passes this (status oom)")
    p.add_argument("--retry-busy", type=int, default=1,
                   help="measure a point again (up to this many times) when its process got "
                        f"less than {round(BUSY_SHARE * 100)}%% of its CPUs")
    p.add_argument("--device", default="cpu",
                   help="where the points run: cpu (default) or cuda (GPU memory is then "
                        "recorded as peak_device_gib; --max-gib still watches host memory)")
    p.add_argument("--smoke", action="store_true", help="tag the records as smoke-test data")
    p.add_argument("--dry-run", action="store_true", help="print the commands only")
    p.add_argument("--python", default=str(ANCHORS_PYTHON if ANCHORS_PYTHON.exists()
                                           else sys.executable),
                   help="interpreter for the points (default: the anchors' venv)")
    return p.parse_args(argv)


if __name__ == "__main__":
    # SIGTERM unwinds like Ctrl-C, so that the running point is killed too.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    sys.exit(main())
