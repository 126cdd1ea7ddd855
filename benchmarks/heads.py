"""Peak memory of a 64K-token training step: the causal LM against the bidirectional
encoder with a classification head (issue 24: within 1.2x), each in a fresh process.

    python benchmarks/heads.py [--length 65536] [--layers 3]

The model is the benchmark shape (systems.py: d256, 4 heads x 64, d_ff 1024, chunk 64,
4 hash rounds, all-LSH); the encoder looks one chunk both ways (n_chunks_after=1), the LM one
chunk back. A step is forward + backward (no optimizer) on random bytes, batch 1; memory is
the process's peak resident set (ru_maxrss) and its growth over the model's construction.
Prints one JSON line per system and the ratio.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

CHILD = """
import json, resource, sys, time, torch
from reformer import ReformerConfig, ReformerLM, ReformerForSequenceClassification
kind, length, layers = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
shape = dict(vocab_size=256, d_model=256, n_heads=4, d_ff=1024, n_layers=layers,
             attn_layers=("lsh",), n_hashes=4, chunk_length=64, max_seq_len=length)
torch.manual_seed(0)
ids = torch.randint(0, 256, (1, length))
if kind == "lm":
    model = ReformerLM(ReformerConfig(**shape))
    step = lambda: model(ids, labels=ids, return_logits=False).loss
else:
    model = ReformerForSequenceClassification(
        ReformerConfig(**shape, causal=False, n_chunks_after=1), n_classes=10)
    step = lambda: model(ids, labels=torch.tensor([3])).loss
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
t0 = time.perf_counter()
step().backward()
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
print(json.dumps({"system": kind, "length": length, "layers": layers, "peak_gib": peak,
                  "base_gib": base, "step_seconds": time.perf_counter() - t0}))
"""


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--length", type=int, default=65536)
    p.add_argument("--layers", type=int, default=3)
    args = p.parse_args()
    results = {}
    for kind in ("lm", "classify"):
        out = subprocess.run([sys.executable, "-c", CHILD, kind, str(args.length),
                              str(args.layers)], capture_output=True, text=True, check=True)
        results[kind] = json.loads(out.stdout.strip().splitlines()[-1])
        print(json.dumps(results[kind]), flush=True)
    ratio = results["classify"]["peak_gib"] / results["lm"]["peak_gib"]
    print(json.dumps({"ratio_peak": ratio, "target": 1.2, "met": ratio <= 1.2,
                      "date": time.strftime("%Y-%m-%dT%H:%M:%S")}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
