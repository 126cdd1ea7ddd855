"""Batched generation against one sequence at a time: tokens/s of ``sample_batch`` over 8
sequences and of 8 ``sample`` calls, the same seeds (the tokens must be equal), median of 3.

    python benchmarks/batched_decode.py [NEW_TOKENS]     # default 128 per sequence

Two workloads per model: one prompt (64 tokens) x 8 samples (one batch), and 4 prompts of
16, 32, 48 and 64 tokens x 2 samples (one batch per prompt length: generation.py).
"""

from __future__ import annotations

import statistics
import sys
import time

import torch

from reformer import ReformerLM
from reformer.generation import sample, sample_batch
from reformer.presets import PRESETS

MODELS = {"tiny preset (local+lsh, d_model 64, 2 layers)": PRESETS["tiny"].model,
          "shakespeare preset shape (d_model 128, 4 layers, max_seq_len 1024)":
              PRESETS["shakespeare"].model.replace(max_seq_len=1024)}
WORKLOADS = (("1 prompt (L=64) x 8 samples", (64,), 8),
             ("4 prompts (L=16,32,48,64) x 2 samples", (16, 32, 48, 64), 2))


def one_at_a_time(model, prompts, n, new, seed=0):
    out = []
    for i, prompt in enumerate(prompts):
        for j in range(n):
            torch.manual_seed(seed)  # rotations, as sample_batch seeds them
            generator = torch.Generator().manual_seed(seed + i * n + j)
            out.append(list(sample(model, prompt, new, generator=generator, top_k=40)))
    return out


def timed(fn, *args, **kwargs):
    times, out = [], None
    for _ in range(3):
        t0 = time.perf_counter()
        out = fn(*args, **kwargs)
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def main() -> int:
    new = int(sys.argv[1]) if len(sys.argv) > 1 else 128
    print(f"threads {torch.get_num_threads()}, {new} new tokens per sequence")
    for name, config in MODELS.items():
        torch.manual_seed(0)
        model = ReformerLM(config).eval()
        g = torch.Generator().manual_seed(1)
        for label, lengths, n in WORKLOADS:
            prompts = [torch.randint(0, 256, (length,), generator=g) for length in lengths]
            single, want = timed(one_at_a_time, model, prompts, n, new)
            batched, got = timed(sample_batch, model, prompts, new, n_per_prompt=n, top_k=40)
            total = len(prompts) * n * new
            print(f"{name} | {label}: one at a time {total / single:.0f} tok/s, batched "
                  f"{total / batched:.0f} tok/s, x{single / batched:.2f}; tokens equal: "
                  f"{got == want}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
