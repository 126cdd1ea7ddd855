"""The targets of issue 3, evaluated from benchmark records: PASS, FAIL or not measured.

Rules (ratios within one run of the harness):
- speed ratios use step times; a competitor stopped for being slow counts with the time it had
  run (a lower bound), one that ran out of memory or failed gives no speed ratio;
- "the plain SDPA Transformer" is the faster of ``sdpa`` and ``sdpa-ckpt`` at that length;
- depth: peak(12 layers) <= 1.1 * peak(2 layers) + 16 bytes * (extra parameters), i.e. weights,
  gradients and two AdamW moments of the 10 extra layers, plus 10%;
- bf16: at 64K, >= 1.8x faster, and the first step's loss (same weights, same tokens) equal
  to 2 decimals (|difference| < 0.005);
- each target is judged only at the length it names (depth and bf16 at 64K, the million-token
  step at 1M), so smoke runs at small lengths leave it "not measured".
"""

from __future__ import annotations

from collections.abc import Callable

from flops import train_step_flops
from results_io import Results, length_label, ok, seconds_lower_bound

NOT_MEASURED = "not measured"
K16, K64, M1 = 2**14, 2**16, 2**20


def verdict(passed: bool) -> str:
    return "PASS" if passed else "FAIL"


def speedup(res: Results, other: str, length: int) -> tuple[float | None, str]:
    """(time(other) / time(ours), how it was obtained) at ``length`` in the lengths sweep."""
    ours, theirs = res.get("lengths", "ours", length), res.get("lengths", other, length)
    if not ok(ours):
        return None, f"ours {ours['status'] if ours else 'missing'}"
    bound = seconds_lower_bound(theirs)
    if bound is None:
        return None, f"{other} {theirs['status'] if theirs else 'missing'}"
    ratio = bound / ours["step_seconds"]
    return ratio, f"{other}/ours {'=' if ok(theirs) else '>='} {ratio:.1f}x"


def sdpa_speedup(res: Results, length: int) -> tuple[float | None, str]:
    """The speed-up over the faster of sdpa and sdpa-ckpt."""
    options = [speedup(res, name, length) for name in ("sdpa", "sdpa-ckpt")]
    measured = [o for o in options if o[0] is not None]
    return min(measured) if measured else options[0]


def check_speed(res: Results, others: tuple[str, ...], lengths: tuple[int, ...],
                factor: float) -> tuple[str, str]:
    verdicts, notes = [], []
    for length in lengths:
        for other in others:
            ratio, note = speedup(res, other, length)
            verdicts.append(None if ratio is None else ratio >= factor)
            if ratio is not None or "ours" not in note:
                notes.append(f"{length_label(length)}: {note}")
        if not ok(res.get("lengths", "ours", length)):
            notes.append(f"{length_label(length)}: no ours")
    return combine(verdicts), "; ".join(notes)


def check_sdpa(res: Results) -> tuple[str, str]:
    # Lengths from 4K where an SDPA variant was run (it is not run after it has stopped).
    lengths = sorted({r["length"] for r in res.sweep("lengths")
                      if r["length"] >= 4096 and r["system"] in ("sdpa", "sdpa-ckpt")})
    verdicts, notes = [], []
    for length in lengths:
        ratio, note = sdpa_speedup(res, length)
        need = 10.0 if length == K64 else 1.0
        notes.append(f"{length_label(length)}: {note} (need {'>=' if need > 1 else '>'} "
                     f"{need:g}x)")
        verdicts.append(None if ratio is None else ratio >= need if need > 1 else ratio > 1)
    if K64 not in lengths:
        verdicts.append(None)
    return combine(verdicts), "; ".join(notes) or "no lengths >= 4K"


def check_memory_vs_hf(res: Results) -> tuple[str, str]:
    ours, hf = res.get("lengths", "ours", K64), res.get("lengths", "hf", K64)
    if not ok(ours) or hf is None or "peak_rss_gib" not in hf:
        return NOT_MEASURED, "needs ours and hf at 64K"
    bound = "=" if ok(hf) else ">="
    note = f"ours {ours['peak_rss_gib']:.2f} GiB, hf {bound} {hf['peak_rss_gib']:.2f} GiB"
    if ok(hf) or ours["peak_rss_gib"] <= hf["peak_rss_gib"] / 3:
        return verdict(ours["peak_rss_gib"] <= hf["peak_rss_gib"] / 3), note
    return NOT_MEASURED, note


def check_million(res: Results) -> tuple[str, str]:
    runs = [r for r in res.sweep("million") if r["length"] >= M1]
    if not runs:
        return NOT_MEASURED, "needs the million sweep at 1M tokens"
    r = runs[-1]
    if not ok(r):
        return "FAIL", f"{r['status']} at {r.get('peak_rss_gib', 0):.2f} GiB"
    return (verdict(r["peak_rss_gib"] <= 8.0),
            f"{r['n_layers']} layers, {r['step_seconds']:.0f} s, {r['peak_rss_gib']:.2f} GiB")


def check_depth(res: Results) -> tuple[str, str]:
    two, twelve = res.get("depth", "ours", K64, 2), res.get("depth", "ours", K64, 12)
    if not (ok(two) and ok(twelve)):
        return NOT_MEASURED, "needs ours at 64K with 2 and 12 layers"
    extra = 16 * (twelve["n_params"] - two["n_params"]) / 2**30
    limit = 1.1 * two["peak_rss_gib"] + extra
    return (verdict(twelve["peak_rss_gib"] <= limit),
            f"12 layers {twelve['peak_rss_gib']:.2f} GiB, limit {limit:.2f} GiB "
            f"(2 layers {two['peak_rss_gib']:.2f} GiB)")


def matmul_fraction(res: Results, length: int) -> float | None:
    r = res.get("lengths", "ours", length) or res.get("bf16", "ours", length)
    if not ok(r) or res.matmul is None:
        return None
    achieved = train_step_flops(length, n_layers=r["n_layers"], n_hashes=r["n_hashes"])
    return achieved / r["step_seconds"] / 1e9 / res.matmul["fp32_gflops"]


def check_flops(res: Results) -> tuple[str, str]:
    fraction = matmul_fraction(res, K64)
    if fraction is None:
        return NOT_MEASURED, "needs ours at 64K and the matmul rate"
    return verdict(fraction >= 0.4), f"{100 * fraction:.0f}% of fp32 matmul rate"


def check_bf16(res: Results) -> tuple[str, str]:
    fp32, bf16 = res.get("bf16", "ours", K64), res.get("bf16", "ours-bf16", K64)
    if not (ok(fp32) and ok(bf16)):
        return NOT_MEASURED, "needs ours and ours-bf16 at 64K"
    speed = fp32["step_seconds"] / bf16["step_seconds"]
    a, b = fp32["losses"][0], bf16["losses"][0]
    return (verdict(speed >= 1.8 and abs(a - b) < 0.005),
            f"{speed:.2f}x, first-step loss {a:.3f} (fp32) vs {b:.3f} (bf16)")


def combine(verdicts: list[bool | None]) -> str:
    if any(v is False for v in verdicts):
        return "FAIL"
    if not verdicts or any(v is None for v in verdicts):
        return NOT_MEASURED
    return "PASS"


TARGETS: list[tuple[str, Callable[[Results], tuple[str, str]]]] = [
    (">= 4x faster than HF and lucidrains at 16K and 64K",
     lambda r: check_speed(r, ("hf", "lucidrains"), (K16, K64), 4.0)),
    ("Faster than the SDPA Transformer from 4K on, >= 10x at 64K", check_sdpa),
    ("Peak memory at 64K <= 1/3 of HF's", check_memory_vs_hf),
    ("1M-token step (3 layers) with peak RSS <= 8 GiB", check_million),
    ("Peak with 12 layers <= peak with 2 + params/optimizer state + 10%", check_depth),
    (">= 40% of the fp32 matmul rate at 64K", check_flops),
    ("bf16 autocast >= 1.8x faster than fp32, same loss to 2 decimals", check_bf16),
]


Targets = list[tuple[str, Callable[[Results], tuple[str, str]]]]


def evaluate(res: Results, targets: Targets | None = None) -> list[tuple[str, str, str]]:
    """[(target, PASS | FAIL | not measured, the numbers behind it)] for ``targets`` (default
    issue 3's)."""
    return [(name, *check(res)) for name, check in (TARGETS if targets is None else targets)]
