"""``reformer generate`` and ``reformer complete``: sampling from trained runs."""

from __future__ import annotations

import argparse
import codecs
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

from reformer.data import text
from reformer.generation import sample
from reformer.model import ReformerLM
from reformer.training import checkpoint as ckpt
from reformer.training.metrics import evaluate_sequences
from reformer.training.trainer import (
    resolve_device,
)


# -------------------------------------------------------------------------- generate
def stream_sample(model: ReformerLM, prompt: torch.Tensor, max_new_tokens: int, *,
                  temperature: float, top_k: int | None, top_p: float | None, seed: int,
                  context: int | None = None, highlight: bool = False,
                  max_seconds: float | None = None) -> str:
    """Print sampled text as it is produced (UTF-8 decoded incrementally); returns it.

    Stops early, after whole tokens, once ``max_seconds`` have passed.
    """
    deadline = None if max_seconds is None else time.monotonic() + max_seconds
    torch.manual_seed(seed)  # LSH rotations of a model without hash_seed
    generator = torch.Generator().manual_seed(seed)
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    bold = highlight and sys.stdout.isatty()
    print("\033[1m" if bold else "", end="")
    pieces = []
    for token in sample(model, prompt, max_new_tokens, temperature=temperature, top_k=top_k,
                        top_p=top_p, context=context, generator=generator):
        pieces.append(decoder.decode(bytes([token])))
        print(pieces[-1], end="", flush=True)
        if deadline is not None and time.monotonic() > deadline:
            pieces.append(" [... time's up]")
            print(pieces[-1], end="")
            break
    pieces.append(decoder.decode(b"", final=True))
    print(pieces[-1] + ("\033[0m" if bold else ""))
    return "".join(pieces)


def cmd_generate(args: argparse.Namespace) -> int:
    if args.prompt is not None and args.prompt_file is not None:
        raise ValueError("pass either --prompt or --prompt-file, not both")
    model, run = ckpt.load_model(args.checkpoint, resolve_device(args.device), args.n_hashes)
    if run.training.task != "text":
        hint = "reformer complete" if run.training.task == "images" else "reformer synthetic eval"
        raise ValueError(f"{args.checkpoint} is a {run.training.task} run, not a text model; "
                         f"use {hint}")
    if args.prompt_file is not None:
        prompt = text.to_ids(np.frombuffer(Path(args.prompt_file).read_bytes(), np.uint8))
        if len(prompt) == 0:
            raise ValueError(f"the prompt file {args.prompt_file} is empty")
    else:
        prompt = text.encode(args.prompt if args.prompt is not None else "\n")
        if len(prompt) == 0:
            raise ValueError("the prompt is empty; pass --prompt with some text")
        print(args.prompt or "", end="", flush=True)
    stream_sample(model, prompt, args.max_new_tokens, temperature=args.temperature,
                  top_k=args.top_k, top_p=args.top_p, seed=args.seed, context=args.context)
    return 0


# -------------------------------------------------------------------------- complete
def cmd_complete(args: argparse.Namespace) -> int:
    """Keep the top rows of held-out pictures, sample the rest, write the grid, time it."""
    from PIL import Image

    from reformer.completion import complete_image, completion_grid
    from reformer.data import images

    model, run = ckpt.load_model(args.checkpoint, resolve_device(args.device), args.n_hashes)
    cfg = run.training
    if cfg.task != "images":
        raise ValueError(f"{args.checkpoint} is a {cfg.task} run; complete needs a run trained "
                         "with --task images")
    if args.n < 1 or args.samples < 1:
        raise ValueError(f"--n {args.n} and --samples {args.samples} must both be >= 1")
    if args.images:
        source = images.ImageFiles(images.image_paths(args.images), cfg.image_size,
                                   cfg.image_channels)
    else:
        source = images.load_image_splits(cfg.replace(eval_windows=max(args.n,
                                                                       cfg.eval_windows)))[1]
    pictures = [source[i] for i in range(min(args.n, len(source)))]
    keep = args.keep_rows if args.keep_rows is not None else cfg.image_size // 2
    tokens = torch.stack([images.image_to_tokens(p) for p in pictures])  # (N, L)
    bits = [evaluate_sequences(model, t[None], seed=cfg.seed)[0] for t in tokens]
    print(f"{len(pictures)} held-out {cfg.image_size}x{cfg.image_size}x{cfg.image_channels} "
          f"images: {sum(bits) / len(bits):.3f} bits/dim; keeping the top {keep} rows, "
          f"sampling {tokens.shape[1] - keep * cfg.image_size * cfg.image_channels} tokens "
          f"for each of {args.samples} completion(s)", flush=True)
    torch.manual_seed(args.seed)  # LSH rotations of a model without hash_seed
    generator = torch.Generator().manual_seed(args.seed)
    completions, times = [], []
    for i, picture in enumerate(pictures):
        t0 = time.perf_counter()
        completions.append([complete_image(model, picture, keep, temperature=args.temperature,
                                           top_k=args.top_k, generator=generator)
                            for _ in range(args.samples)])
        times.append((time.perf_counter() - t0) / args.samples)
        print(f"image {i + 1}: {bits[i]:.3f} bits/dim, {times[-1]:.1f} s per completion",
              flush=True)
    out = args.out or Path(args.checkpoint) / "completions.png"
    Image.fromarray(completion_grid(pictures, keep, completions)).save(out)
    print(f"median {statistics.median(times):.1f} s per completed image; grid "
          f"(original | fragment | completions) in {out}")
    return 0


def add_parsers(sub: argparse._SubParsersAction) -> None:
    gen = sub.add_parser("generate", help="sample text from a trained run")
    gen.add_argument("--checkpoint", required=True, type=Path, metavar="DIR")
    gen.add_argument("--prompt", help="text to continue (default: a newline)")
    gen.add_argument("--prompt-file", type=Path, metavar="FILE")
    gen.add_argument("--max-new-tokens", type=int, default=500)
    gen.add_argument("--temperature", type=float, default=0.8)
    gen.add_argument("--top-k", type=int)
    gen.add_argument("--top-p", type=float)
    gen.add_argument("--n-hashes", type=int, help="LSH rounds (default: the model's)")
    gen.add_argument("--context", type=int, help="tokens the model sees (max_seq_len)")
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--device", default="auto")
    gen.set_defaults(func=cmd_generate)

    comp = sub.add_parser("complete", help="complete held-out pictures from their top rows")
    comp.add_argument("--checkpoint", required=True, type=Path, metavar="DIR")
    comp.add_argument("--images", nargs="+", metavar="PATH",
                      help="pictures to complete (default: the run's held-out images)")
    comp.add_argument("--keep-rows", type=int, metavar="K", help="rows kept (half the image)")
    comp.add_argument("--n", type=int, default=4, metavar="N", help="pictures (4)")
    comp.add_argument("--samples", type=int, default=2, metavar="M",
                      help="completions per picture (2)")
    comp.add_argument("--temperature", type=float, default=1.0)
    comp.add_argument("--top-k", type=int)
    comp.add_argument("--n-hashes", type=int, help="LSH rounds (default: the model's)")
    comp.add_argument("--out", type=Path, metavar="FILE.png",
                      help="the grid (default: DIR/completions.png)")
    comp.add_argument("--seed", type=int, default=0)
    comp.add_argument("--device", default="auto")
    comp.set_defaults(func=cmd_complete)
