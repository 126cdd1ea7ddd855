"""``reformer train`` and ``reformer demo``: the training run with a progress bar.

The flags map one to one onto :class:`reformer.training.TrainConfig` fields (TRAIN_FIELDS);
a run without ``--preset`` or ``--config`` takes its task's preset (TASK_PRESETS).

Under ``torchrun`` (``torchrun --nproc_per_node=P -m reformer train ...``) every process joins
the process group and trains its share (reformer.parallel, reformer.training.trainer); rank 0
alone prints and draws the bar.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from pathlib import Path

from tqdm import tqdm

from reformer.cli.sample import stream_sample
from reformer.data import text
from reformer.data.task import TASKS
from reformer.heads import POOLINGS
from reformer.parallel.data_parallel import PARALLEL
from reformer.parallel.world import World, close_world, init_world
from reformer.presets import DEFAULT_PRESET, PRESETS
from reformer.training import checkpoint as ckpt
from reformer.training.config import TrainConfig, resolve_run_config
from reformer.training.metrics import precision_warning
from reformer.training.trainer import (
    Callback,
    EvalReport,
    RunResult,
    StepReport,
    Trainer,
)

# Flags whose argparse dest is the TrainConfig field of the same name.
TRAIN_FIELDS = ("task", "data", "val_data", "val_fraction", "seq_len", "image_size",
                "image_channels", "steps", "max_minutes",
                "batch_size", "grad_accum", "lr", "warmup_steps", "weight_decay", "grad_clip",
                "precision", "eval_every", "eval_windows", "eval_n_hashes", "checkpoint_every",
                "seed", "device", "parallel", "pooling", "head_hidden", "pool_width",
                "mask_prob", "init_from")
EXIT_CODES = {"SIGINT": 130, "SIGTERM": 143}
TASK_PRESETS = {"text": DEFAULT_PRESET, "images": "images-cpu", "synthetic": "synthetic",
                "classify": "classify", "listops": "listops", "mlm": "mlm",
                "listops-mlm": "listops-mlm", "seq2seq": "seq2seq"}


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


def train_changes(args: argparse.Namespace) -> dict:
    """The TrainConfig fields given on the command line (paths made absolute)."""
    changes = {k: getattr(args, k) for k in TRAIN_FIELDS if getattr(args, k, None) is not None}
    if getattr(args, "images", None) is not None:
        if "data" in changes:
            raise ValueError("pass either --images or --data, not both")
        changes["data"] = args.images
    for k in ("data", "val_data"):
        if k in changes:
            changes[k] = tuple(str(Path(p).absolute()) for p in changes[k])
    if "init_from" in changes:
        changes["init_from"] = str(Path(changes["init_from"]).absolute())
    if getattr(args, "sequence_parallel", False):
        if changes.get("parallel", "sequence") != "sequence":
            raise ValueError(f"--sequence-parallel and --parallel {changes['parallel']} "
                             "contradict each other; pass one")
        changes["parallel"] = "sequence"
    if "eval_n_hashes" in changes:
        changes["eval_n_hashes"] = tuple(changes["eval_n_hashes"])
    return changes


def build_trainer(args: argparse.Namespace, world: World | None = None) -> Trainer:
    changes = train_changes(args)
    if args.resume:
        model = None
        if args.preset is not None or args.config is not None:
            model = resolve_run_config(args.preset, args.config, **changes).model
        return Trainer.resume(resume_dir(args), model, changes, world)
    preset = args.preset
    if preset is None and args.config is None:
        preset = TASK_PRESETS[changes.get("task", "text")]
    run = resolve_run_config(preset, args.config, **changes)
    out = args.out or Path("runs") / f"{run.preset or 'custom'}-{time.strftime('%Y%m%d-%H%M%S')}"
    if world is not None and world.distributed and args.out is None:
        raise ValueError("under torchrun, pass --out DIR: every process must name the same run "
                         "directory (a default name carries each process's start time)")
    return Trainer.create(out, run, world)


def resume_dir(args: argparse.Namespace) -> Path:
    if args.out is None:
        raise ValueError("--resume needs --out DIR, the run directory to continue")
    return args.out


def in_world(args: argparse.Namespace, make: Callable[[World], Trainer]) -> int:
    """Join torchrun's process group, if launched by it, train the run ``make`` builds, leave.

    The process group's backend follows the run's device (gloo on the CPU, NCCL on CUDA).
    """
    device = getattr(args, "device", None)
    if device is None and args.resume:
        device = ckpt.read_config(resume_dir(args)).training.device
    world = init_world(device or "auto")
    finished = False
    try:
        code = train_and_report(make(world))
        finished = True
        return code
    finally:
        close_world(world, wait=finished)


def describe(trainer: Trainer) -> str:
    cfg, model, world = trainer.run.training, trainer.run.model, trainer.world
    where = f"{trainer.device}" if not world.distributed else \
        f"{world.size} processes ({cfg.parallel}, {trainer.device.type})"
    return (f"run {trainer.run_dir}: {trainer.run.preset or 'custom'} model, "
            f"{trainer.module.num_parameters():,} parameters, {model.n_layers} layers "
            f"{'/'.join(model.attn_layers)}, context {cfg.seq_len:,} tokens, "
            f"{trainer.tokens_per_step:,} tokens/step, {cfg.precision} on {where}\n"
            f"data: {trainer.task.describe()}"
            + (f"; resuming at step {trainer.step}" if trainer.step else "")
            + (f"\ntrunk from {cfg.init_from} (step {trainer.init_step})"
               if trainer.init_step is not None else "")
            + (f"\n{warning}" if (warning := precision_warning(trainer.device, cfg.precision))
               else ""))


def run_training(trainer: Trainer) -> RunResult:
    """Train with a progress bar; prints where things are (rank 0 only under torchrun)."""
    if not trainer.world.is_main:
        return trainer.run_loop(handle_signals=True)
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
    return in_world(args, lambda world: build_trainer(args, world))


def train_and_report(trainer: Trainer) -> int:
    """Run the loop with a progress bar, print the held-out change; the exit code."""
    result = run_training(trainer)
    if len(result.evals) >= 2 and trainer.world.is_main:
        print(f"validation bits/{trainer.task.unit}: {result.evals[0].val_bpc:.3f} at step "
              f"{result.evals[0].step} -> {result.evals[-1].val_bpc:.3f} at step "
              f"{result.evals[-1].step}")
    return EXIT_CODES.get(result.stop_reason, 0)



# ------------------------------------------------------------------------------ demo
def cmd_demo(args: argparse.Namespace) -> int:
    """train (default preset, time-bounded) -> evaluate -> sample after a held-out prompt."""
    if args.prompt_chars < 1 or args.sample_chars < 0 or not args.sample_seconds > 0:
        raise ValueError(f"--prompt-chars {args.prompt_chars}, --sample-chars "
                         f"{args.sample_chars} and --sample-seconds {args.sample_seconds:g} must "
                         "be >= 1, >= 0 and > 0; pass e.g. 1024, 300 and 45")
    changes = train_changes(args)
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
                  context=min(max(2, len(prompt_ids) + args.sample_chars), run.model.max_seq_len),
                  highlight=True, max_seconds=args.sample_seconds)
    print(f"\nmore: reformer generate --checkpoint {trainer.run_dir} --prompt 'ROMEO:'")
    return 0


def preset_default(field: str, preset: str, fixed: bool = False) -> str:
    """How --help states a training flag's default: the preset's value, or TrainConfig's.

    ``fixed``: the command always uses ``preset`` (no --preset to choose another).
    """
    value = PRESETS[preset].training.get(field)
    if value is not None:
        return f"(default: the preset's, {value} for {preset})"
    value = getattr(TrainConfig, field)
    text = "none" if value is None else str(value)
    if not fixed and any(field in p.training for p in PRESETS.values()):
        text += ", or the chosen preset's"
    return f"(default: {text})"


def add_train_flags(p: argparse.ArgumentParser, demo: bool = False,
                    synthetic: bool = False) -> None:
    preset = "synthetic" if synthetic else DEFAULT_PRESET

    def default(field: str) -> str:
        return preset_default(field, preset, fixed=synthetic or demo)

    if not synthetic:
        p.add_argument("--data", nargs="+", metavar="PATH",
                       help="text files, folders or globs, read as bytes (default: Shakespeare)")
        p.add_argument("--val-data", nargs="+", metavar="PATH",
                       help="held-out text (default: the last --val-fraction of --data)")
        p.add_argument("--val-fraction", type=float, metavar="X",
                       help=f"held-out share of the data, 0 < X < 1 {default('val_fraction')}")
        p.add_argument("--seq-len", type=int, metavar="N",
                       help=f"context length in bytes {default('seq_len')}")
    if not synthetic and not demo:
        p.add_argument("--task", choices=TASKS,
                       help="text (default), images, the synthetic duplication task, classify "
                       "(labelled text: --data FOLDER of class folders, or FILE.jsonl of "
                       '{"text", "label"} lines), listops (Long Range Arena, generated), mlm '
                       "(masked language modelling of text), listops-mlm (masked language "
                       "modelling of ListOps's inputs, to pre-train a trunk for --init-from) "
                       "or seq2seq (the encoder-decoder on "
                       '--data FILE.jsonl of {"source", "target"} lines)')
        p.add_argument("--pooling", choices=POOLINGS,
                       help="classify, listops: the classifier reads the mean of the real "
                       "tokens' states, the first token's, or both ends' (the first and the "
                       "last real token's; default: the preset's, ends for listops, else mean)")
        p.add_argument("--head-hidden", type=int, metavar="N",
                       help="classify, listops: a residual ReLU layer of N units before the "
                       "classifier, 0 for none (default: 0)")
        p.add_argument("--pool-width", type=int, metavar="K",
                       help="classify, listops with --pooling ends: the classifier reads the "
                       "first K and the last K real tokens' states (default: 1)")
        p.add_argument("--mask-prob", type=float, metavar="X",
                       help="mlm, listops-mlm: share of tokens masked and predicted "
                       "(default: 0.15)")
        p.add_argument("--init-from", metavar="RUN",
                       help="start the model's trunk (every weight but the head's) from the "
                       "newest checkpoint of run directory RUN, e.g. a listops-mlm run for a "
                       "listops classifier; the models must share d_model, layers and "
                       "vocabulary (default: fresh weights)")
        p.add_argument("--images", nargs="+", metavar="PATH",
                       help="folders, files or globs of PNG/JPEG pictures (default: crops of "
                       "scikit-image's photographs)")
        p.add_argument("--image-size", type=int, metavar="S",
                       help="pictures are centre-cropped and resized to S x S "
                       f"{preset_default('image_size', TASK_PRESETS['images'])}")
        p.add_argument("--image-channels", type=int, choices=(1, 3),
                       help="3 = RGB, 1 = grayscale "
                       f"{preset_default('image_channels', TASK_PRESETS['images'])}")
    p.add_argument("--steps", type=int, metavar="N", help=f"optimiser steps {default('steps')}")
    p.add_argument("--max-minutes", type=float, metavar="X",
                   help="wall-clock budget for the whole run "
                   + ("(default: 3.0)" if demo else default("max_minutes")))
    p.add_argument("--batch-size", type=int, metavar="N",
                   help=f"windows per micro-batch {default('batch_size')}")
    p.add_argument("--grad-accum", type=int, metavar="N",
                   help=f"micro-batches per step {default('grad_accum')}")
    p.add_argument("--lr", type=float, metavar="X", help=f"peak learning rate {default('lr')}")
    p.add_argument("--warmup-steps", type=int, metavar="N",
                   help=f"steps of linear learning-rate warm-up {default('warmup_steps')}")
    p.add_argument("--weight-decay", type=float, metavar="X",
                   help=f"AdamW weight decay {default('weight_decay')}")
    p.add_argument("--grad-clip", type=float, metavar="X",
                   help=f"max global gradient norm {default('grad_clip')}")
    p.add_argument("--precision", choices=("fp32", "bf16"),
                   help=f"bf16 = autocast {default('precision')}")
    p.add_argument("--eval-every", type=int, metavar="N",
                   help=f"evaluate every N steps {default('eval_every')}")
    p.add_argument("--eval-windows", type=int, metavar="N",
                   help=f"held-out windows per evaluation {default('eval_windows')}")
    p.add_argument("--eval-n-hashes", type=int, nargs="+", metavar="R",
                   help="also evaluate with R hash rounds, e.g. 8 (default: none)")
    p.add_argument("--checkpoint-every", type=int, metavar="N",
                   help=f"save every N steps {default('checkpoint_every')}")
    p.add_argument("--seed", type=int, metavar="N",
                   help=f"seeds the weights, the data order and dropout {default('seed')}")
    p.add_argument("--device", help="auto, cpu, cuda, cuda:1, ... (default: auto; under "
                   "torchrun, cuda is each process's own GPU)")
    if not demo:
        p.add_argument("--parallel", choices=PARALLEL,
                       help="under torchrun: ddp (each process holds the whole model), fsdp "
                       "(weights, gradients and AdamW moments sharded per layer) or sequence "
                       "(each sequence split across the processes) (default: ddp)")
        p.add_argument("--sequence-parallel", action="store_true",
                       help="the same as --parallel sequence")
    p.add_argument("--out", type=Path, metavar="DIR",
                   help="run directory (default: runs/NAME-TIME)")
    if synthetic:
        p.add_argument("--resume", action="store_true", help="continue the run in --out")
        return
    if demo:
        p.add_argument("--prompt-chars", type=int, metavar="N", default=1024,
                       help="held-out bytes before the sample (default: %(default)s)")
        p.add_argument("--sample-chars", type=int, metavar="N", default=300,
                       help="bytes to sample (default: %(default)s)")
        p.add_argument("--sample-seconds", type=float, metavar="X", default=45.0,
                       help="stop sampling after this long (default: %(default)s)")
        return
    p.add_argument("--preset", choices=sorted(PRESETS),
                   help=f"model and training defaults (default: {DEFAULT_PRESET} for text, "
                   f"{TASK_PRESETS['images']} for images, synthetic for the synthetic task)")
    p.add_argument("--config", type=Path, metavar="FILE.json",
                   help="model config JSON (a ReformerConfig or a run's config.json)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out")


def add_parsers(sub: argparse._SubParsersAction) -> None:
    train = sub.add_parser("train", help="train on text files, pictures or the synthetic task")
    add_train_flags(train)
    train.set_defaults(func=cmd_train)
    demo = sub.add_parser("demo", help=f"train the {DEFAULT_PRESET} preset for minutes, "
                          "evaluate, sample")
    add_train_flags(demo, demo=True)
    demo.set_defaults(func=cmd_demo, max_minutes=3.0)
