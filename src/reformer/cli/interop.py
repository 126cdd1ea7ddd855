"""``reformer import-hf`` and ``reformer export-hf``: Hugging Face Reformer checkpoints as runs.

``reformer import-hf DIR --out RUN`` reads a Hugging Face (HF) directory
(reformer.interop.hf) and makes RUN an ordinary run directory at step 0: ``config.json`` (the
imported model, with ``hf_compat`` on, and a training config) and a step-0 checkpoint (the
weights, a fresh AdamW state, the data position): what a new ``reformer train`` run would save
before its first step. Then:

    reformer generate --checkpoint RUN --prompt "..."    sample from it
    reformer eval --checkpoint RUN                       its held-out bits per byte
    reformer train --out RUN --resume --steps N          fine-tune it

A resumed run may change only how long and where it trains (steps, max_minutes, the eval and
checkpoint schedule, device), so the settings that shape the loss (data, seq_len, batch size,
learning rate, ...) are chosen at import, with train's flags. Their defaults are train's,
except lr (1e-4: the model is trained already) and seq_len (16384, or the model's max_seq_len
if shorter).

Our runs read text as bytes (ids 0-255), so a model with a smaller vocabulary cannot become a
run. One trained on other ids imports (google/reformer-enwik8 numbers byte b as b + 2), but
its prompts, samples and figures then read ids as bytes.

``reformer export-hf RUN --out DIR`` writes the run's newest weights as an HF directory
(config.json, model.safetensors) into a new or empty folder.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from reformer.cli.train import train_changes
from reformer.heads import ReformerForMaskedLM
from reformer.interop.hf import from_hf, to_hf
from reformer.model import ReformerLM
from reformer.training import checkpoint as ckpt
from reformer.training.config import RunConfig, TrainConfig
from reformer.training.trainer import Trainer

FINE_TUNE = {"lr": 1e-4}  # training defaults that differ from a new run's
BYTES = 256  # the text task's vocabulary


# --------------------------------------------------------------------------- import-hf
def import_run(source: str | Path, run_dir: str | Path, changes: dict | None = None
               ) -> RunConfig:
    """Make ``run_dir`` a run at step 0 holding the HF model in ``source``; returns its config.

    Args:
        changes: TrainConfig fields (default: train's, with :data:`FINE_TUNE`).
    """
    if ckpt.has_checkpoint(run_dir):
        raise ValueError(f"{run_dir} already holds a run; choose another --out (continue that "
                         f"run with: reformer train --out {run_dir} --resume)")
    model = from_hf(source, dtype=torch.float32)  # runs train in float32 (bf16 by autocast)
    config = model.config
    if not config.causal:
        raise ValueError("the model is a masked language model (is_decoder false), and runs "
                         "train language models only for now; use it from Python "
                         "(reformer.interop.hf.from_hf gives a ReformerForMaskedLM)")
    if config.vocab_size < BYTES:
        raise ValueError(f"the model's vocab_size={config.vocab_size} is smaller than the "
                         f"{BYTES} byte values a run reads; use it from Python "
                         "(reformer.interop.hf.from_hf) instead of as a run")
    training = {**FINE_TUNE, "seq_len": min(TrainConfig.seq_len, config.max_seq_len),
                **(changes or {})}
    run = RunConfig(config, TrainConfig.from_dict(training))
    trainer = Trainer.create(run_dir, run)  # refuses a folder of other files or a trained run
    try:
        trainer.module.load_state_dict(model.state_dict())
        trainer.save_checkpoint(reason="import")
    finally:
        trainer.close()
    return run


def cmd_import_hf(args: argparse.Namespace) -> int:
    run = import_run(args.source, args.out, train_changes(args))
    kinds = "/".join(run.model.attn_layers)
    print(f"imported {args.source} into the run {args.out} at step 0: {run.model.n_layers} "
          f"layers {kinds}, d_model {run.model.d_model}, context {run.model.max_seq_len:,}; "
          f"training context {run.training.seq_len:,}, lr {run.training.lr:g}")
    print(f"next: reformer generate --checkpoint {args.out} --prompt TEXT, reformer eval "
          f"--checkpoint {args.out}, or fine-tune with reformer train --out {args.out} "
          "--resume --steps N")
    return 0


# --------------------------------------------------------------------------- export-hf
def export_run(run_dir: str | Path, directory: str | Path, hf_compat: bool = False) -> Path:
    """Write the newest weights of ``run_dir`` as an HF directory; returns it.

    Args:
        hf_compat: export a model trained without ``hf_compat`` by switching it on (HF's model
            computes that variant, so the exported model's outputs differ slightly).
    """
    directory = Path(directory)
    if directory.exists() and (not directory.is_dir() or any(directory.iterdir())):
        raise ValueError(f"{directory} is not an empty folder; choose a new or empty folder "
                         "for the Hugging Face directory")
    model, run = ckpt.load_model(run_dir)
    if not isinstance(model, (ReformerLM, ReformerForMaskedLM)):
        raise ValueError(f"{run_dir} trained a {run.training.task} model, which has no Hugging "
                         "Face export here; export-hf writes language models (and mlm runs)")
    if not run.model.hf_compat:
        if not hf_compat:
            raise ValueError(f"{run_dir} was trained without hf_compat, and Hugging Face's "
                             "Reformer computes the hf_compat variant (key epsilon, circular "
                             "windows, padding); pass --hf-compat to export it anyway, then "
                             "check the exported model")
        switched = type(model)(run.model.replace(hf_compat=True))
        switched.load_state_dict(model.state_dict())
        model = switched
    return to_hf(model, directory)


def cmd_export_hf(args: argparse.Namespace) -> int:
    out = export_run(args.run, args.out, args.hf_compat)
    print(f"exported {args.run} to {out} (config.json, model.safetensors); load it with "
          f"transformers.ReformerModelWithLMHead.from_pretrained({str(out)!r})")
    return 0


# ----------------------------------------------------------------------------- parsers
def _add_training_flags(p: argparse.ArgumentParser) -> None:
    """The flags of train that fix a run's loss (a resumed run cannot change them)."""
    p.add_argument("--data", nargs="+", metavar="PATH",
                   help="text files, folders or globs to fine-tune on (default: Shakespeare)")
    p.add_argument("--val-data", nargs="+", metavar="PATH",
                   help="held-out text (default: the last --val-fraction of --data)")
    p.add_argument("--val-fraction", type=float, metavar="X", help="held-out share of --data")
    p.add_argument("--seq-len", type=int, metavar="N",
                   help="training context in bytes (default: 16384 or the model's maximum)")
    for flag, kind, what in (("--batch-size", int, "windows per micro-batch"),
                             ("--grad-accum", int, "micro-batches per step"),
                             ("--lr", float, f"peak learning rate (default: {FINE_TUNE['lr']})"),
                             ("--warmup-steps", int, "steps of learning-rate warm-up"),
                             ("--weight-decay", float, "AdamW weight decay"),
                             ("--grad-clip", float, "max global gradient norm"),
                             ("--steps", int, "optimiser steps (may change on resume)"),
                             ("--seed", int, "seeds the data order and dropout")):
        p.add_argument(flag, type=kind, metavar="N" if kind is int else "X", help=what)
    p.add_argument("--precision", choices=("fp32", "bf16"), help="bf16 = autocast")
    p.add_argument("--device", help="auto, cpu, cuda, ... (default: auto)")


def add_parsers(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("import-hf", help="make a run of a Hugging Face Reformer directory",
                       description="Make a run at step 0 of a Hugging Face Reformer "
                       "directory; generate, eval and train --resume (fine-tuning) then work "
                       "on it. The training flags fix what a resumed run cannot change.")
    p.add_argument("source", metavar="DIR",
                   help="a Hugging Face directory: config.json and model.safetensors or "
                   "pytorch_model.bin")
    p.add_argument("--out", type=Path, metavar="RUN", required=True,
                   help="the run directory to create (new or empty)")
    _add_training_flags(p)
    p.set_defaults(func=cmd_import_hf)
    p = sub.add_parser("export-hf", help="write a run's weights as a Hugging Face directory")
    p.add_argument("run", metavar="RUN", help="a run directory")
    p.add_argument("--out", type=Path, metavar="DIR", required=True,
                   help="the Hugging Face directory to write (new or empty)")
    p.add_argument("--hf-compat", action="store_true",
                   help="export a run trained without hf_compat (HF computes that variant, so "
                   "outputs change slightly)")
    p.set_defaults(func=cmd_export_hf)
