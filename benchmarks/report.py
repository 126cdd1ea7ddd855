"""Write docs/benchmarks.md and its log-log plots from run_all.py's JSON lines.

    python benchmarks/report.py benchmarks/results/full.jsonl [--out docs/benchmarks.md]
    python benchmarks/report.py benchmarks/results/gpu.jsonl --out docs/benchmarks-gpu.md

The page holds the machine (recorded by the matmul point of the run), the library versions
(recorded by every point), the dates, one table per sweep, the speed and memory ratios of ours
against the other systems, the issue-3 target checklist evaluated from the data (targets.py),
and two plots: step time and peak memory against sequence length. When
``results/contention.jsonl`` exists (benchmarks/contention.py), the page ends with its newest
run per OpenMP setting: speed idle and beside two busy processes, ours against plain PyTorch.
Records tagged as smoke data (run_all.py --smoke) are marked as such on every table row they
fill. For points run on a GPU (run_all.py --device cuda) memory is the GPU's peak allocated
memory, the plots are named after the page (benchmarks-gpu_time.png) and there is no target
checklist: the targets are for the CPU.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
from pathlib import Path

from flops import train_step_flops
from results_io import BUSY_SHARE, Results, cell, length_label, memory_gib, ok, table
from targets import evaluate, matmul_fraction, speedup

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
SYSTEM_ORDER = ("ours", "hf", "lucidrains", "sdpa", "sdpa-ckpt")
SMOKE = " (smoke)"


def row_label(text: str, records: list[dict | None]) -> str:
    return text + (SMOKE if any(r and r.get("smoke") for r in records) else "")


def lengths_section(res: Results, stem: str) -> list[str]:
    points = res.sweep("lengths")
    if not points:
        return []
    systems = [s for s in SYSTEM_ORDER if any(r["system"] == s for r in points)]
    systems += sorted({r["system"] for r in points} - set(systems))
    lengths = sorted({r["length"] for r in points})
    rows = []
    for length in lengths:
        recs = [res.get("lengths", s, length) for s in systems]
        rows.append([row_label(length_label(length), recs)] + [cell(r) for r in recs])
    out = ["## Train step vs sequence length", "",
           "Forward + backward + AdamW step, batch 1, 6 layers, 4 hash rounds: median step time "
           f"/ {memory_text(res)}. — : not run (a system is not run after its first failure).",
           "", table(["L", *systems], rows), ""]
    others = [s for s in systems if s != "ours"]
    if "ours" in systems and others:
        rows = []
        for length in lengths:
            ours = res.get("lengths", "ours", length)
            row = [row_label(length_label(length), [ours])]
            row += [ratio_text(res, o, length) for o in others]
            if any(busy(res.get("lengths", s, length)) for s in systems):
                row[0] += " ⚠"
            hf = res.get("lengths", "hf", length)
            row.append(f"{memory_gib(ours) / memory_gib(hf):.2f}"
                       if ok(ours) and ok(hf) else "—")
            rows.append(row)
        out += ["Speed-up of ours (their step time / ours; >= when they were stopped for "
                "being slow) and our peak memory as a fraction of HF's:", "",
                table(["L", *[f"vs {o}" for o in others], "memory ours/hf"], rows), "",
                f"![step time vs length]({stem}_time.png)",
                f"![peak memory vs length]({stem}_memory.png)", ""]
    return out


def memory_text(res: Results) -> str:
    return ("peak allocated GPU memory (torch.cuda.max_memory_allocated)" if res.on_gpu()
            else "peak resident memory of the process")


def busy(r: dict | None) -> bool:
    return ok(r) and r.get("cpu_share", 1.0) < BUSY_SHARE


def ratio_text(res: Results, other: str, length: int) -> str:
    """'3.20x', '>= 5.1x' (they were stopped for being slow) or why there is no ratio."""
    ratio, note = speedup(res, other, length)
    if ratio is None:
        return "—"
    return f"{'' if ok(res.get('lengths', other, length)) else '>= '}{ratio:.2f}x"


def simple_section(res: Results, sweep: str, title: str, first: str, value) -> list[str]:
    points = sorted(res.sweep(sweep), key=lambda r: (r["length"], r["n_layers"], r["n_hashes"],
                                                     r["system"]))
    if not points:
        return []
    rows = [[row_label(str(value(r)), [r]), length_label(r["length"]), r["system"], cell(r),
             f"{r['final_loss']:.3f}" if ok(r) else "—"] for r in points]
    return [f"## {title}", "", table([first, "L", "system", "step / peak", "final loss"], rows),
            ""]


def bf16_section(res: Results) -> list[str]:
    rows = []
    for length in sorted({r["length"] for r in res.sweep("bf16")}):
        fp32, bf16 = res.get("bf16", "ours", length), res.get("bf16", "ours-bf16", length)
        speed = f"{fp32['step_seconds'] / bf16['step_seconds']:.2f}x" if ok(fp32) and ok(bf16) \
            else "—"
        losses = [f"{r['losses'][0]:.4f}" if ok(r) else "—" for r in (fp32, bf16)]
        rows.append([row_label(length_label(length), [fp32, bf16]), cell(fp32), cell(bf16),
                     speed, *losses])
    if not rows:
        return []
    return ["## fp32 vs bf16 autocast (ours)", "", table(
        ["L", "fp32", "bf16", "bf16 speed-up", "first-step loss fp32", "bf16"], rows), ""]


def flops_section(res: Results) -> list[str]:
    m = res.matmul
    if m is None:
        return []
    out = ["## Arithmetic rate", "",
           f"Measured matmul rate ({m['size']}x{m['size']} torch.mm, median of 5): "
           f"fp32 {m['fp32_gflops']:.0f} GFLOP/s, bf16 {m['bf16_gflops']:.0f} GFLOP/s.", ""]
    rows = []
    for r in sorted(res.sweep("lengths"), key=lambda r: r["length"]):
        if r["system"] == "ours" and ok(r):
            tflop = train_step_flops(r["length"], n_layers=r["n_layers"]) / 1e12
            rows.append([row_label(length_label(r["length"]), [r]), f"{tflop:.3g}",
                         f"{r['step_seconds']:.3g}", f"{tflop * 1e3 / r['step_seconds']:.0f}",
                         f"{100 * matmul_fraction(res, r['length']):.0f}%"])
    if rows:
        out += ["Our step's analytic FLOPs (benchmarks/README.md gives the formula) over its "
                "time, as a fraction of the fp32 rate:", "",
                table(["L", "TFLOP/step", "step s", "GFLOP/s", "of fp32 matmul"], rows), ""]
    return out


def header(res: Results) -> list[str]:
    m = (res.matmul or {}).get("machine", {})
    dates = sorted(r["date"] for r in res.records if "date" in r)
    versions = {}
    for r in res.records:
        if r.get("version") and r.get("base") in ("ours", "hf", "lucidrains"):
            versions[r["base"]] = r["version"]
        versions.setdefault("torch", r.get("torch"))
    names = {"ours": "reformer (ours)", "hf": "transformers", "lucidrains": "reformer-pytorch",
             "torch": "torch"}
    commits = sorted({r["commit"] for r in res.records if "commit" in r})
    out = ["# Benchmarks" + (" on a GPU" if res.on_gpu() else ""), "",
           f"Generated by `benchmarks/report.py` on {dt.date.today()} from "
           + ", ".join(f"`{p.relative_to(ROOT) if p.is_relative_to(ROOT) else p}`"
                       for p in res.paths) + "; how to reproduce: `benchmarks/README.md`.", ""]
    if res.any_smoke():
        out += ["> **Smoke data.** Rows marked (smoke) come from short runs at small lengths "
                "that prove the pipeline; target verdicts drawn from them are provisional. The "
                "machine was shared with other jobs while they were measured.", ""]
    n_busy = sum(busy(r) for r in res.points.values())
    if n_busy:
        out += [f"> ⚠ marks {n_busy} point(s), and the ratios built on them, whose process got "
                f"less than {BUSY_SHARE:.0%} of its CPUs during its steps (other jobs were "
                "running): their times are not comparable with the others.", ""]
    if m.get("gpu"):
        out += [f"- GPU: {m['gpu']}; memory below is its peak allocated memory "
                "(`torch.cuda.max_memory_allocated`), the host's RSS is in the JSON lines"]
    out += [f"- {'Host' if m.get('gpu') else 'Machine'}: {m.get('cpu', 'unknown CPU')}, "
            f"{m.get('cpus', '?')} logical CPUs, "
            f"{m.get('ram_gib', 0):.1f} GiB RAM; bf16 matmul features: "
            f"{', '.join(m.get('bf16_features', [])) or 'none (bf16 is emulated)'}",
            "- Versions: " + ", ".join(f"{names[k]} {v}" for k, v in versions.items() if v),
            f"- Commit of this repository: {', '.join(commits) or 'unknown'}",
            f"- Measured: {dates[0] if dates else '?'} to {dates[-1] if dates else '?'}", ""]
    return out


def checklist(res: Results) -> list[str]:
    rows = [[name, f"**{v}**", notes] for name, v, notes in evaluate(res)]
    return ["## Targets (issue 3)", "", table(["target", "verdict", "numbers"], rows), ""]


def plots(res: Results, out_dir: Path, stem: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    lengths = sorted({r["length"] for r in res.sweep("lengths")})
    memory = "peak GPU memory, GiB" if res.on_gpu() else "peak resident memory, GiB"
    for value, ylabel, name in ((lambda r: r["step_seconds"], "seconds per train step", "time"),
                                (memory_gib, memory, "memory")):
        fig, ax = plt.subplots(figsize=(6.4, 4.4))
        for system in SYSTEM_ORDER:
            pts = sorted((r["length"], value(r)) for r in res.sweep("lengths")
                         if r["system"] == system and ok(r))
            if pts:
                ax.plot(*zip(*pts, strict=True), marker="o", label=system)
        ax.set(xscale="log", yscale="log", xlabel="sequence length L (tokens)", ylabel=ylabel,
               title=f"Train step {name} (6 layers, 4 hash rounds)"
               + (f", {res.matmul['machine']['gpu']}" if res.on_gpu() and res.matmul else "")
               + (", smoke data" if res.any_smoke() else ""))
        ax.set_xticks(lengths, [length_label(n) for n in lengths])
        ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
        ax.yaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
        ax.yaxis.set_minor_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
        fig.tight_layout()
        fig.savefig(out_dir / f"{stem}_{name}.png", dpi=110)
        plt.close(fig)


def contention_section(path: Path) -> list[str]:
    """The newest run of benchmarks/contention.py for each OpenMP setting it was run with."""
    if not path.exists():
        return []
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    newest: dict[str, str] = {}
    for r in rows:  # run ids are start times: the last seen per setting is the newest
        newest[json.dumps(r.get("env", {}), sort_keys=True)] = r.get("run", r["date"])
    out = ["## On a busy machine (issue 20)", "",
           "Each workload idle and beside two processes spinning on the two cores "
           "(`benchmarks/contention.py`); ours and plain PyTorch alternate call by call, so both "
           "see the same load. Loaded/idle is the slowdown; the target is ours <= 1.5x plain "
           "PyTorch's. The OpenMP setting applies to both (one process); `reformer` commands "
           "set GOMP_SPINCOUNT=3000 unless the user set a policy (`src/reformer/cli/__init__.py`"
           "), and cached decoding steps run on one thread (`src/reformer/_threads.py`) in "
           "every run below.", ""]
    for env, run in newest.items():
        part = [r for r in rows if r.get("run", r["date"]) == run]
        first = part[0]
        setting = ", ".join(f"{k}={v}" for k, v in json.loads(env).items()) or "OpenMP defaults"
        out += [f"{first['date']}, {first['cpu']}, {first['threads']} threads, {setting}, "
                f"medians of {first['repeats']}:", ""]
        table_rows = []
        for r in part:
            plain = next((p for p in part if p["workload"] == r["workload"]
                          and p["system"] == "plain"), None)
            rel = (f"{r['ratio'] / plain['ratio']:.2f}x" if plain and r["system"] == "ours"
                   else "")
            table_rows.append([r["workload"], r["system"], f"{r['units_per_s_idle']:,.0f}",
                               f"{r['units_per_s_loaded']:,.0f}", f"{r['ratio']:.2f}x", rel])
        out += [table(["workload", "system", "idle tok/s", "loaded tok/s", "loaded/idle",
                       "ours / plain"], table_rows), ""]
    return out


def render(res: Results, stem: str) -> str:
    # the targets are ratios on the 2-core CPU: a GPU page only reports
    parts = header(res) + ([] if res.on_gpu() else checklist(res)) + lengths_section(res, stem)
    parts += simple_section(res, "depth", "Depth sweep (ours)", "layers", lambda r: r["n_layers"])
    parts += simple_section(res, "hashes", "Hash-round sweep (ours)", "hash rounds",
                            lambda r: r["n_hashes"])
    parts += bf16_section(res) + flops_section(res)
    parts += simple_section(res, "million", "One million tokens (ours)", "layers",
                            lambda r: r["n_layers"])
    if not res.on_gpu():
        parts += contention_section(HERE / "results" / "contention.jsonl")
    return "\n".join(parts).rstrip() + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("results", nargs="*", type=Path,
                   default=[HERE / "results" / "full.jsonl"], help="JSONL files from run_all.py")
    p.add_argument("--out", type=Path, default=ROOT / "docs" / "benchmarks.md")
    args = p.parse_args(argv)
    missing = [str(path) for path in args.results if not path.exists()]
    if missing:
        print(f"report: {', '.join(missing)} not found; run benchmarks/run_all.py first",
              file=sys.stderr)
        return 2
    res = Results([path.resolve() for path in args.results])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(render(res, args.out.stem))
    if res.sweep("lengths"):
        plots(res, args.out.parent, args.out.stem)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
