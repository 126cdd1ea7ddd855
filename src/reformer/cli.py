"""The ``reformer`` command line (also ``python -m reformer``).

Each subcommand is a thin wrapper over importable functions (reformer.training,
reformer.generation); this is the only module that prints. A user's mistake (a ValueError from
the library, a missing file) becomes one line on stderr and exit code 2, never a traceback.

Subcommands:
    train     train a byte-level model on text files (default: Shakespeare), with checkpoints
    generate  stream text sampled from a trained run
    complete  complete held-out pictures from their top rows (image runs)
    eval      held-out bits per token, optionally for several numbers of hash rounds
    synthetic the paper's duplication task: ``synthetic train`` and ``synthetic eval``
    demo      train the default preset for a few minutes, evaluate, and print a sample
"""

from __future__ import annotations

import argparse
import codecs
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from reformer.config import ReformerConfig
from reformer.data import text
from reformer.data.task import TASKS, UNITS
from reformer.generation import sample
from reformer.model import ReformerLM
from reformer.presets import DEFAULT_PRESET, PRESETS
from reformer.training import checkpoint as ckpt
from reformer.training.checkpoint import with_attention
from reformer.training.config import RunConfig, resolve_run_config
from reformer.training.evaluate import evaluate_attentions, evaluate_run
from reformer.training.metrics import evaluate_sequences
from reformer.training.trainer import (
    Callback,
    EvalReport,
    RunResult,
    StepReport,
    Trainer,
    resolve_device,
)

# Flags whose argparse dest is the TrainConfig field of the same name.
TRAIN_FIELDS = ("task", "data", "val_data", "val_fraction", "seq_len", "image_size",
                "image_channels", "steps", "max_minutes",
                "batch_size", "grad_accum", "lr", "warmup_steps", "weight_decay", "grad_clip",
                "precision", "eval_every", "eval_windows", "eval_n_hashes", "checkpoint_every",
                "seed", "device")
EXIT_CODES = {"SIGINT": 130, "SIGTERM": 143}
TASK_PRESETS = {"text": DEFAULT_PRESET, "images": "images-cpu", "synthetic": "synthetic"}


# ----------------------------------------------------------------------------- train
class ProgressBar(Callback):
    """A tqdm bar with loss, bits per character, tokens/s and ETA; eval lines above it.

    The bar shows the run's progress (by steps, or by time under --max-minutes, whichever is
    further along), so a time-bounded run fills it too.
    """

    RESOLUTION = 1000

    def __init__(self, trainer: Trainer) -> None:
        self.steps = trainer.run.training.steps
        self.bits = bits_label(trainer.task.unit)
        self.bar = tqdm(total=self.RESOLUTION, desc="train", dynamic_ncols=True,
                        bar_format="{desc} {percentage:3.0f}%|{bar}| [{elapsed}{postfix}]")
        self.bar.set_postfix_str(f"step {trainer.step}/{self.steps}")

    def on_step(self, trainer: Trainer, report: StepReport) -> None:
        self.bar.n = int(report.progress * self.RESOLUTION)
        self.bar.set_postfix_str(f"step {report.step}/{self.steps}, loss {report.loss:.3f}, "
                                 f"{self.bits} {report.bpc:.3f}, "
                                 f"{report.tokens_per_s:,.0f} tok/s, "
                                 f"ETA {_clock(report.eta_s)}", refresh=True)

    def on_eval(self, trainer: Trainer, report: EvalReport) -> None:
        extra = "".join(f", {r} rounds {bpc:.3f}" for r, bpc in report.by_n_hashes.items())
        extra += "".join(f", {k} {100 * v:.1f}%" for k, v in report.metrics.items())
        self.bar.write(f"step {report.step}: validation {self.bits} {report.val_bpc:.3f}{extra}")

    def on_stop_requested(self, trainer: Trainer, reason: str) -> None:
        self.bar.write(f"{reason}: stopping after this step and saving a checkpoint "
                       "(Ctrl-C again quits at once, unsaved)")

    def close(self) -> None:
        self.bar.close()


def bits_label(unit: str) -> str:
    """How the bar and summaries name the metric: bpc for text, bits/dim for images, ..."""
    return "bpc" if unit == "char" else f"bits/{unit}"


def _clock(seconds: float) -> str:
    m, s = divmod(int(seconds), 60)
    return f"{m // 60}:{m % 60:02d}:{s:02d}" if m >= 60 else f"{m:02d}:{s:02d}"


def _train_changes(args: argparse.Namespace) -> dict:
    """The TrainConfig fields given on the command line (paths made absolute)."""
    changes = {k: getattr(args, k) for k in TRAIN_FIELDS if getattr(args, k, None) is not None}
    if getattr(args, "images", None) is not None:
        if "data" in changes:
            raise ValueError("pass either --images or --data, not both")
        changes["data"] = args.images
    for k in ("data", "val_data"):
        if k in changes:
            changes[k] = tuple(str(Path(p).absolute()) for p in changes[k])
    if "eval_n_hashes" in changes:
        changes["eval_n_hashes"] = tuple(changes["eval_n_hashes"])
    return changes


def build_trainer(args: argparse.Namespace) -> Trainer:
    changes = _train_changes(args)
    if args.resume:
        if args.out is None:
            raise ValueError("--resume needs --out DIR, the run directory to continue")
        model = None
        if args.preset is not None or args.config is not None:
            model = resolve_run_config(args.preset, args.config, **changes).model
        return Trainer.resume(args.out, model, changes)
    preset = args.preset
    if preset is None and args.config is None:
        preset = TASK_PRESETS[changes.get("task", "text")]
    run = resolve_run_config(preset, args.config, **changes)
    out = args.out or Path("runs") / f"{run.preset or 'custom'}-{time.strftime('%Y%m%d-%H%M%S')}"
    return Trainer.create(out, run)


def describe(trainer: Trainer) -> str:
    cfg, model = trainer.run.training, trainer.run.model
    return (f"run {trainer.run_dir}: {trainer.run.preset or 'custom'} model, "
            f"{trainer.model.num_parameters():,} parameters, {model.n_layers} layers "
            f"{'/'.join(model.attn_layers)}, context {cfg.seq_len:,} tokens, "
            f"{cfg.tokens_per_step:,} tokens/step, {cfg.precision} on {trainer.device}\n"
            f"data: {trainer.task.describe()}"
            + (f"; resuming at step {trainer.step}" if trainer.step else ""))


def run_training(trainer: Trainer) -> RunResult:
    """Train with a progress bar; prints where things are."""
    print(describe(trainer), flush=True)
    bar = ProgressBar(trainer)
    try:
        result = trainer.run_loop(bar, handle_signals=True)
    finally:
        bar.close()
    cfg, d = trainer.run.training, trainer.run_dir
    if result.stop_reason == "steps":
        how = f"finished {cfg.steps} steps"
    elif result.stop_reason == "time":
        how = f"used the {cfg.max_minutes:g}-minute budget"
    else:
        how = f"stopped by {result.stop_reason}"
    print(f"{how} at step {result.step}; checkpoint, metrics and plot in {d}/")
    if result.interrupted:
        print(f"continue with: reformer train --out {d} --resume")
    return result


def cmd_train(args: argparse.Namespace) -> int:
    return train_and_report(build_trainer(args))


def train_and_report(trainer: Trainer) -> int:
    """Run the loop with a progress bar, print the held-out change; the exit code."""
    result = run_training(trainer)
    if len(result.evals) >= 2:
        print(f"validation bits/{trainer.task.unit}: {result.evals[0].val_bpc:.3f} at step "
              f"{result.evals[0].step} -> {result.evals[-1].val_bpc:.3f} at step "
              f"{result.evals[-1].step}")
    return EXIT_CODES.get(result.stop_reason, 0)


# ------------------------------------------------------------------------- synthetic
TABLE2_ATTENTIONS = ("full", "lsh-8", "lsh-4", "lsh-2", "lsh-1")


def cmd_synthetic_train(args: argparse.Namespace) -> int:
    """The duplication task (preset ``synthetic``) with the attention --attention names."""
    changes = _train_changes(args)
    if args.word_length is not None:
        changes["seq_len"] = 2 * (args.word_length + 1)
    if args.resume:
        if args.out is None:
            raise ValueError("--resume needs --out DIR, the run directory to continue")
        return train_and_report(Trainer.resume(args.out, None, changes))
    run = resolve_run_config("synthetic", **changes)
    model = with_attention(run.model, args.attention)
    arch = {k: getattr(args, k) for k in ("chunk_length", "n_buckets", "dedup_rounds")
            if getattr(args, k) is not None}
    run = RunConfig(model.replace(**arch), run.training, run.preset)
    out = args.out or Path("runs") / f"synthetic-{args.attention}-{time.strftime('%Y%m%d-%H%M%S')}"
    return train_and_report(Trainer.create(out, run))


def attention_name(config: ReformerConfig) -> str:
    """The short name of a one-attention model: full, local or lsh-R."""
    kinds = set(config.attn_layers)
    if kinds == {"lsh"}:
        return f"lsh-{config.n_hashes}"
    return "/".join(config.attn_layers)


def cmd_synthetic_eval(args: argparse.Namespace) -> int:
    """Accuracy on held-out 0w0w sequences with each attention: one row of Table 2."""
    run = ckpt.read_config(args.checkpoint)
    if run.training.task != "synthetic":
        raise ValueError(f"{args.checkpoint} is a {run.training.task} run; synthetic eval needs "
                         "a run of `reformer synthetic train`")
    results = evaluate_attentions(args.checkpoint, args.attentions, args.device, args.sequences,
                                  args.dedup_rounds)
    names = list(results)
    print("train \\ eval".ljust(14) + "".join(f"{n:>9}" for n in names))
    print(f"{attention_name(run.model):<14}"
          + "".join(f"{100 * results[n][1]['accuracy']:8.1f}%" for n in names))
    print(f"{'bits/symbol':<14}" + "".join(f"{results[n][0]:9.3f}" for n in names))
    return 0


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
    model, _ = ckpt.load_model(args.checkpoint, resolve_device(args.device), args.n_hashes)
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
    print(f"median {sorted(times)[len(times) // 2]:.1f} s per completed image; grid "
          f"(original | fragment | completions) in {out}")
    return 0


# ------------------------------------------------------------------------------ eval
def cmd_eval(args: argparse.Namespace) -> int:
    results = evaluate_run(args.checkpoint, args.data or (), args.n_hashes or (None,),
                           n_windows=args.windows, seq_len=args.seq_len, device=args.device)
    unit = UNITS[ckpt.read_config(args.checkpoint).training.task]
    print(f"hash rounds   bits/{unit}")
    for rounds, bpc in results.items():
        print(f"{rounds:>11}   {bpc:9.4f}")
    return 0


# ------------------------------------------------------------------------------ demo
def cmd_demo(args: argparse.Namespace) -> int:
    """train (default preset, time-bounded) -> evaluate -> sample after a held-out prompt."""
    changes = _train_changes(args)
    run = resolve_run_config(DEFAULT_PRESET, **changes)
    out = args.out or Path("runs") / f"demo-{time.strftime('%Y%m%d-%H%M%S')}"
    trainer = Trainer.create(out, run)
    result = run_training(trainer)
    if result.interrupted:
        return EXIT_CODES.get(result.stop_reason, 130)
    first, last = result.evals[0], result.evals[-1]
    print(f"validation bits/char: {first.val_bpc:.3f} before -> {last.val_bpc:.3f} after "
          f"{result.step} steps; plot: {trainer.run_dir / ckpt.PLOT_FILE}")
    val_text = trainer.task.val_text
    prompt = val_text.read(0, min(args.prompt_chars, len(val_text)))
    prompt_ids = text.encode(text.decode(prompt.tolist()))  # whole characters
    print(f"\n--- sample: {args.sample_chars} bytes after a {len(prompt_ids)}-byte held-out "
          "prompt (its end shown) ---")
    print(text.decode(prompt_ids[-200:]), end="", flush=True)
    stream_sample(trainer.model.eval(), prompt_ids, args.sample_chars, temperature=0.8,
                  top_k=40, top_p=None, seed=run.training.seed,
                  context=len(prompt_ids) + args.sample_chars, highlight=True,
                  max_seconds=args.sample_seconds)
    print(f"\nmore: reformer generate --checkpoint {trainer.run_dir} --prompt 'ROMEO:'")
    return 0


# ---------------------------------------------------------------------------- parser
def _add_train_flags(p: argparse.ArgumentParser, demo: bool = False,
                     synthetic: bool = False) -> None:
    if not synthetic:
        p.add_argument("--data", nargs="+", metavar="PATH",
                       help="text files, folders or globs, read as bytes (default: Shakespeare)")
        p.add_argument("--val-data", nargs="+", metavar="PATH",
                       help="held-out text (default: the last --val-fraction of --data)")
        p.add_argument("--val-fraction", type=float, metavar="X",
                       help="held-out share of the data (0.05)")
        p.add_argument("--seq-len", type=int, metavar="N",
                       help="context length in bytes (the preset's)")
    if not synthetic and not demo:
        p.add_argument("--task", choices=TASKS,
                       help="text (default), images, or the synthetic duplication task")
        p.add_argument("--images", nargs="+", metavar="PATH",
                       help="folders, files or globs of PNG/JPEG pictures (default: crops of "
                       "scikit-image's photographs)")
        p.add_argument("--image-size", type=int, metavar="S",
                       help="pictures are centre-cropped and resized to S x S (the preset's)")
        p.add_argument("--image-channels", type=int, choices=(1, 3),
                       help="3 = RGB (default), 1 = grayscale")
    p.add_argument("--steps", type=int, metavar="N", help="optimiser steps")
    p.add_argument("--max-minutes", type=float, metavar="X",
                   help="wall-clock budget for the whole run")
    p.add_argument("--batch-size", type=int, metavar="N", help="windows per micro-batch")
    p.add_argument("--grad-accum", type=int, metavar="N", help="micro-batches per step")
    p.add_argument("--lr", type=float, metavar="X", help="peak learning rate")
    p.add_argument("--warmup-steps", type=int, metavar="N")
    p.add_argument("--weight-decay", type=float, metavar="X")
    p.add_argument("--grad-clip", type=float, metavar="X", help="max global gradient norm")
    p.add_argument("--precision", choices=("fp32", "bf16"), help="bf16 = autocast")
    p.add_argument("--eval-every", type=int, metavar="N", help="evaluate every N steps")
    p.add_argument("--eval-windows", type=int, metavar="N", help="held-out windows per evaluation")
    p.add_argument("--eval-n-hashes", type=int, nargs="+", metavar="R",
                   help="also evaluate with R hash rounds, e.g. 8")
    p.add_argument("--checkpoint-every", type=int, metavar="N", help="save every N steps")
    p.add_argument("--seed", type=int, metavar="N")
    p.add_argument("--device", help="auto (default), cpu, cuda, cuda:1, ...")
    p.add_argument("--out", type=Path, metavar="DIR",
                   help="run directory (default: runs/NAME-TIME)")
    if synthetic:
        p.add_argument("--resume", action="store_true", help="continue the run in --out")
        return
    if demo:
        p.add_argument("--prompt-chars", type=int, metavar="N", default=1024)
        p.add_argument("--sample-chars", type=int, metavar="N", default=300)
        p.add_argument("--sample-seconds", type=float, metavar="X", default=45.0,
                       help="stop sampling after this long")
        return
    p.add_argument("--preset", choices=sorted(PRESETS),
                   help=f"model and training defaults (default: {DEFAULT_PRESET} for text, "
                   "images-cpu for images)")
    p.add_argument("--config", type=Path, metavar="FILE.json",
                   help="model config JSON (a ReformerConfig or a run's config.json)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out")


def _add_synthetic_parser(sub: argparse._SubParsersAction) -> None:
    syn = sub.add_parser("synthetic", help="the paper's duplication task 0w0w (Table 2)")
    syn_sub = syn.add_subparsers(dest="synthetic_command", required=True)
    train = syn_sub.add_parser("train", help="train the 1-layer model with one attention")
    train.add_argument("--attention", default="lsh-4", metavar="KIND",
                       help="full, or lsh-R with R hash rounds: lsh-1, lsh-2, lsh-4 (default)")
    train.add_argument("--word-length", type=int, metavar="N",
                       help="|w|, symbols per copy (127; the paper's is 511)")
    train.add_argument("--chunk-length", type=int, metavar="M", help="LSH chunk length (32)")
    train.add_argument("--n-buckets", type=int, metavar="NB",
                       help="LSH buckets (default 2 * length / chunk length)")
    train.add_argument("--dedup-rounds", action=argparse.BooleanOptionalAction,
                       help="discount pairs that several rounds find (the paper's correction)")
    _add_train_flags(train, synthetic=True)
    train.set_defaults(func=cmd_synthetic_train)
    ev = syn_sub.add_parser("eval", help="accuracy with full attention and LSH-8/4/2/1")
    ev.add_argument("--checkpoint", required=True, type=Path, metavar="DIR")
    ev.add_argument("--attentions", nargs="+", default=list(TABLE2_ATTENTIONS), metavar="KIND",
                    help="columns (default: full lsh-8 lsh-4 lsh-2 lsh-1)")
    ev.add_argument("--sequences", type=int, metavar="N",
                    help="held-out sequences (the run's eval_windows)")
    ev.add_argument("--dedup-rounds", action=argparse.BooleanOptionalAction,
                    help="evaluate LSH with or without de-duplication (default: as trained)")
    ev.add_argument("--device", default="auto")
    ev.set_defaults(func=cmd_synthetic_eval)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="reformer", description="Train Reformer language models on text, sample from them "
        "and evaluate them.")
    sub = parser.add_subparsers(dest="command", required=True)
    train = sub.add_parser("train", help="train on text files")
    _add_train_flags(train)
    train.set_defaults(func=cmd_train)

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

    ev = sub.add_parser("eval", help="held-out bits per token (character, image dimension)")
    ev.add_argument("--checkpoint", required=True, type=Path, metavar="DIR")
    ev.add_argument("--data", nargs="+", metavar="PATH",
                    help="held-out text (default: the run's held-out split)")
    ev.add_argument("--n-hashes", type=int, nargs="+", metavar="R",
                    help="hash rounds, e.g. 1 2 4 8 for a table (default: the model's)")
    ev.add_argument("--windows", type=int, help="number of windows (the run's eval_windows)")
    ev.add_argument("--seq-len", type=int, help="window length (the run's seq_len)")
    ev.add_argument("--device", default="auto")
    ev.set_defaults(func=cmd_eval)

    _add_synthetic_parser(sub)

    demo = sub.add_parser("demo", help=f"train the {DEFAULT_PRESET} preset for minutes, "
                          "evaluate, sample")
    _add_train_flags(demo, demo=True)
    demo.set_defaults(func=cmd_demo, max_minutes=3.0)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except BrokenPipeError:  # e.g. `reformer generate ... | head`
        sys.stdout = open(os.devnull, "w")  # silence the flush at exit
        return 0
    except (ValueError, OSError) as err:
        message = str(err).splitlines()[0] if str(err) else type(err).__name__
        print(f"reformer {args.command}: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"\nreformer {args.command}: interrupted", file=sys.stderr)
        return 130

