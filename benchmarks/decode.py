"""Decoding speed: tokens/s after a long prompt, with and without the cache, against HF.

Issue 4's benchmark. For each (system, prompt length) a fresh subprocess builds the same model
shape (2 all-LSH layers, d_model 256, 4 heads x 64, d_ff 1024, 2 hash rounds, chunk 64, byte
vocabulary, random weights), then times ``N`` new tokens and 1 new token after the same
prompt; tokens/s = (N - 1) / (T_N - T_1), so the prompt's one-off forward pass cancels out.
Systems:
- ``ours``: reformer.generation.sample with per-layer caches;
- ``ours-nocache``: the same, recomputing a full forward over the prefix for every token
  (fewer tokens: each costs a whole forward pass);
- ``hf``: transformers' ReformerModelWithLMHead.generate(use_cache=True, do_sample=True).

Run: ``benchmarks/.venv-anchors/bin/python benchmarks/decode.py`` (all points, appends JSON
lines to benchmarks/results/decode.jsonl and prints a Markdown table), or
``--system ours --prompt 1024`` for one point.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results" / "decode.jsonl"
SHAPE = dict(d_model=256, n_heads=4, d_head=64, d_ff=1024, n_layers=2, n_hashes=2,
             chunk_length=64, vocab_size=256)


def axial(length: int) -> tuple[int, int]:
    side = 1 << ((length - 1).bit_length() + 1) // 2
    return side, length // side


def build_ours(max_len: int):
    from reformer import ReformerConfig, ReformerLM
    from reformer.generation import sample

    s = SHAPE
    config = ReformerConfig(vocab_size=s["vocab_size"], d_model=s["d_model"],
                            n_heads=s["n_heads"], d_head=s["d_head"], d_ff=s["d_ff"],
                            n_layers=s["n_layers"], attn_layers=("lsh",),
                            n_hashes=s["n_hashes"], chunk_length=s["chunk_length"],
                            max_seq_len=max_len)
    model = ReformerLM(config).eval()

    def generate(prompt: torch.Tensor, n_new: int, use_cache: bool) -> None:
        gen = torch.Generator().manual_seed(0)
        for _ in sample(model, prompt[0], n_new, generator=gen, use_cache=use_cache):
            pass

    return generate


def build_hf(max_len: int):
    from transformers import ReformerConfig, ReformerModelWithLMHead
    from transformers.utils import logging

    logging.set_verbosity_error()
    s = SHAPE
    config = ReformerConfig(
        vocab_size=s["vocab_size"], hidden_size=s["d_model"], num_attention_heads=s["n_heads"],
        attention_head_size=s["d_head"], feed_forward_size=s["d_ff"], hidden_act="relu",
        attn_layers=["lsh"] * s["n_layers"], num_hashes=s["n_hashes"],
        lsh_attn_chunk_length=s["chunk_length"], lsh_num_chunks_before=1,
        lsh_num_chunks_after=0, axial_pos_shape=list(axial(max_len)),
        axial_pos_embds_dim=[64, s["d_model"] - 64], max_position_embeddings=max_len,
        is_decoder=True, use_cache=True, hidden_dropout_prob=0.0,
        lsh_attention_probs_dropout_prob=0.0, pad_token_id=0, eos_token_id=None)
    model = ReformerModelWithLMHead(config).eval()

    def generate(prompt: torch.Tensor, n_new: int, use_cache: bool) -> None:
        with torch.no_grad():
            model.generate(prompt, max_new_tokens=n_new, min_new_tokens=n_new, do_sample=True,
                           top_k=0, use_cache=use_cache, pad_token_id=0)

    return generate


def measure(system: str, prompt_len: int, n_new: int) -> dict:
    torch.manual_seed(0)
    max_len = 1 << (prompt_len + n_new).bit_length()  # room for the prompt and the tokens
    generate = (build_hf if system == "hf" else build_ours)(max_len)
    use_cache = system != "ours-nocache"
    prompt = torch.randint(0, 256, (1, prompt_len))
    generate(prompt, 2, use_cache)  # warm-up
    times = {}
    for n in (1, n_new):
        runs = []
        for _ in range(2 if n == 1 else 1):
            start = time.perf_counter()
            generate(prompt, n, use_cache)
            runs.append(time.perf_counter() - start)
        times[n] = statistics.median(runs)
    return {"system": system, "prompt": prompt_len, "new_tokens": n_new,
            "prompt_seconds": round(times[1], 3),
            "tokens_per_s": round((n_new - 1) / max(times[n_new] - times[1], 1e-9), 2),
            "threads": torch.get_num_threads(), "torch": torch.__version__}


POINTS = [("ours", 1024, 512), ("ours-nocache", 1024, 32), ("hf", 1024, 512),
          ("ours", 16384, 512), ("ours-nocache", 16384, 8), ("hf", 16384, 512)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--system", choices=["ours", "ours-nocache", "hf"])
    parser.add_argument("--prompt", type=int)
    parser.add_argument("--new-tokens", type=int, default=512)
    parser.add_argument("--max-prompt", type=int, default=16384)
    args = parser.parse_args()
    if args.system:
        print(json.dumps(measure(args.system, args.prompt, args.new_tokens)), flush=True)
        return
    RESULTS.parent.mkdir(exist_ok=True)
    rows = []
    for system, prompt, n_new in POINTS:
        if prompt > args.max_prompt:
            continue
        cmd = [sys.executable, __file__, "--system", system, "--prompt", str(prompt),
               "--new-tokens", str(n_new)]
        out = subprocess.run(cmd, capture_output=True, text=True)
        if out.returncode:
            row = {"system": system, "prompt": prompt, "error": out.stderr.strip()[-300:]}
        else:
            row = json.loads(out.stdout.strip().splitlines()[-1])
        rows.append(row)
        with RESULTS.open("a") as f:
            f.write(json.dumps(row) + "\n")
        print(json.dumps(row), flush=True)
    print("\n| system | prompt | new tokens | tokens/s | prompt pass (s) |\n|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['system']} | {r['prompt']} | {r.get('new_tokens', '')} | "
              f"{r.get('tokens_per_s', r.get('error', ''))} | {r.get('prompt_seconds', '')} |")


if __name__ == "__main__":
    main()
