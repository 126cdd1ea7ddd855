"""The GPU targets of issue 23, evaluated from the records of run_gpu.sh: PASS, FAIL or not
measured.

Rules: every ratio within one run on one GPU; memory is the GPU's peak allocated memory
(``peak_device_gib``); a target is judged only at the length it names. The shape is the
benchmark's (6 layers, d256, 4 heads x 64, 4 rounds, chunk 64, batch 1); the million-token
step has 3 layers.
"""

from __future__ import annotations

from collections.abc import Callable

from results_io import Results, length_label, ok
from targets import NOT_MEASURED, combine, verdict

K16, K64, M1 = 2**14, 2**16, 2**20


def _pair(res: Results, length: int) -> tuple[dict | None, dict | None]:
    return res.get("lengths", "ours", length), res.get("lengths", "hf", length)


def check_time(res: Results, length: int, seconds: float | None) -> tuple[str, str]:
    """Ours at ``length`` in at most ``seconds`` (None: at most HF's time there)."""
    ours, hf = _pair(res, length)
    if not ok(ours) or (seconds is None and not ok(hf)):
        return NOT_MEASURED, f"needs ours{'' if seconds else ' and hf'} at {length_label(length)}"
    limit = seconds if seconds is not None else hf["step_seconds"]
    note = f"ours {ours['step_seconds']:.3f} s" + (f", hf {hf['step_seconds']:.3f} s" if ok(hf)
                                                  else "")
    return verdict(ours["step_seconds"] <= limit), note


def check_memory(res: Results) -> tuple[str, str]:
    ours, hf = _pair(res, K64)
    if not (ok(ours) and ok(hf)):
        return NOT_MEASURED, "needs ours and hf at 64K"
    a, b = ours["peak_device_gib"], hf["peak_device_gib"]
    return verdict(a <= 0.5 * b), f"ours {a:.2f} GiB, hf {b:.2f} GiB ({a / b:.2f}x)"


def check_bf16(res: Results) -> tuple[str, str]:
    fp32, bf16 = res.get("bf16", "ours", K64), res.get("bf16", "ours-bf16", K64)
    if not (ok(fp32) and ok(bf16)):
        return NOT_MEASURED, "needs ours and ours-bf16 at 64K"
    speed = fp32["step_seconds"] / bf16["step_seconds"]
    a, b = fp32["losses"][0], bf16["losses"][0]
    return (verdict(speed >= 1.5 and abs(a - b) <= 0.02),
            f"{speed:.2f}x, first-step loss {a:.4f} (fp32) vs {b:.4f} (bf16)")


def check_million(res: Results) -> tuple[str, str]:
    r = res.get("million", "ours", M1, 3)
    if r is None:
        return NOT_MEASURED, "needs the million sweep at 1M tokens"
    if not ok(r):
        return "FAIL", r["status"]
    return (verdict(r["step_seconds"] <= 5.0 and r["peak_device_gib"] <= 8.0),
            f"{r['step_seconds']:.1f} s, {r['peak_device_gib']:.2f} GiB")


def check_launches(res: Results) -> tuple[str, str]:
    points = sorted((r for r in res.sweep("launches") if r.get("device") == "cuda"),
                    key=lambda r: r["length"])
    counts = {length_label(r["length"]): r["per_layer"] for r in points if ok(r)}
    if not {"4K", "16K", "64K"} <= counts.keys():
        return NOT_MEASURED, "needs kernel launches on a GPU at 4K, 16K and 64K"
    same = len({counts[k] for k in ("4K", "16K", "64K")}) == 1
    return (combine([same, max(counts.values()) <= 300]),
            ", ".join(f"{k}: {v}" for k, v in counts.items()))


GPU_TARGETS: list[tuple[str, Callable[[Results], tuple[str, str]]]] = [
    ("64K step <= 0.20 s (HF 0.241 s on the H200)", lambda r: check_time(r, K64, 0.20)),
    ("64K step <= 0.12 s (stretch)", lambda r: check_time(r, K64, 0.12)),
    ("16K step <= HF's", lambda r: check_time(r, K16, None)),
    ("Peak memory at 64K <= 0.5x HF's", check_memory),
    ("bf16 autocast >= 1.5x faster than fp32, first-step loss within 0.02", check_bf16),
    ("1M tokens, 3 layers: <= 5 s a step in <= 8 GiB", check_million),
    ("Kernel launches per layer <= 300, the same at 4K, 16K, 64K", check_launches),
]

