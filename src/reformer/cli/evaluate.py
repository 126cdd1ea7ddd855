"""``reformer eval`` and ``reformer synthetic train|eval``: held-out metrics of runs."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from reformer.cli.train import add_train_flags, in_world, resume_dir, train_changes
from reformer.config import ReformerConfig
from reformer.data.task import UNITS, task_head, test_split_tasks
from reformer.training import checkpoint as ckpt
from reformer.training.checkpoint import with_attention
from reformer.training.config import RunConfig, check_device, resolve_run_config
from reformer.training.evaluate import evaluate_attentions, evaluate_head_run, evaluate_run
from reformer.training.trainer import Trainer


# ------------------------------------------------------------------------------ eval
def check_at_least(flag: str, values: int | list[int] | None, minimum: int, what: str) -> None:
    """A ValueError naming ``flag`` and the value unless each given value is >= minimum.

    A flag's 0 is refused rather than read as "not given" (which would use the default).
    """
    for value in [values] if isinstance(values, int) else values or ():
        if value < minimum:
            raise ValueError(f"{flag} {value} must be at least {minimum} ({what}); pass "
                             f"{minimum} or more, or leave {flag} out for the default")


def cmd_eval(args: argparse.Namespace) -> int:
    check_device(args.device)
    check_at_least("--n-hashes", args.n_hashes, 1, "hash rounds")
    check_at_least("--windows", args.windows, 1, "held-out windows")
    check_at_least("--seq-len", args.seq_len, 2, "one token and one target")
    run = ckpt.read_config(args.checkpoint)
    unit = UNITS[run.training.task]
    if task_head(run.training.task) != "lm":
        if args.data or args.seq_len is not None:
            raise ValueError(f"--data and --seq-len apply to language-model runs; "
                             f"{args.checkpoint} is a {run.training.task} run (evaluate other "
                             "data by training with it as --val-data)")
        scores = evaluate_head_run(args.checkpoint, args.split, args.n_hashes or (None,),
                                   n_examples=args.windows, device=args.device)
        names = list(next(iter(scores.values()))[1])
        print(f"{args.split} set; hash rounds   bits/{unit}   " + "   ".join(names))
        for rounds, (bits, metrics) in scores.items():
            print(f"{rounds:>11}   {bits:9.4f}   "
                  + "   ".join(f"{100 * metrics[k]:{len(k) - 1}.2f}%" for k in names))
        return 0
    if args.split != "validation":
        raise ValueError(f"--split {args.split} applies to {' and '.join(test_split_tasks())} "
                         f"runs; {args.checkpoint} is a {run.training.task} run (pass --data "
                         "for other held-out text)")
    results = evaluate_run(args.checkpoint, args.data or (), args.n_hashes or (None,),
                           n_windows=args.windows, seq_len=args.seq_len, device=args.device)
    print(f"hash rounds   bits/{unit}")
    for rounds, bpc in results.items():
        print(f"{rounds:>11}   {bpc:9.4f}")
    return 0


# ------------------------------------------------------------------------- synthetic
TABLE2_ATTENTIONS = ("full", "lsh-8", "lsh-4", "lsh-2", "lsh-1")


def cmd_synthetic_train(args: argparse.Namespace) -> int:
    """The duplication task (preset ``synthetic``) with the attention --attention names."""
    changes = train_changes(args)
    check_at_least("--word-length", args.word_length, 1, "symbols per copy")
    if args.word_length is not None:
        changes["seq_len"] = 2 * (args.word_length + 1)
    if args.resume:
        return in_world(args, lambda world: Trainer.resume(resume_dir(args), None, changes,
                                                           world))
    run = resolve_run_config("synthetic", **changes)
    model = with_attention(run.model, args.attention)
    arch = {k: getattr(args, k) for k in ("chunk_length", "n_buckets", "dedup_rounds")
            if getattr(args, k) is not None}
    run = RunConfig(model.replace(**arch), run.training, run.preset)
    out = args.out or Path("runs") / f"synthetic-{args.attention}-{time.strftime('%Y%m%d-%H%M%S')}"
    return in_world(args, lambda world: Trainer.create(out, run, world))


def attention_name(config: ReformerConfig) -> str:
    """The short name of a one-attention model: full, local or lsh-R."""
    kinds = set(config.attn_layers)
    if kinds == {"lsh"}:
        return f"lsh-{config.n_hashes}"
    return "/".join(config.attn_layers)


def cmd_synthetic_eval(args: argparse.Namespace) -> int:
    """Accuracy on held-out 0w0w sequences with each attention: one row of Table 2."""
    check_device(args.device)
    check_at_least("--sequences", args.sequences, 1, "held-out sequences")
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


def add_parsers(sub: argparse._SubParsersAction) -> None:
    ev = sub.add_parser("eval", help="held-out bits per token (character, image dimension)")
    ev.add_argument("--checkpoint", required=True, type=Path, metavar="DIR",
                    help="a run directory of reformer train")
    ev.add_argument("--data", nargs="+", metavar="PATH",
                    help="held-out text (default: the run's held-out split)")
    ev.add_argument("--n-hashes", type=int, nargs="+", metavar="R",
                    help="hash rounds, e.g. 1 2 4 8 for a table (default: the model's)")
    ev.add_argument("--windows", type=int, metavar="N",
                    help="number of windows, or examples for classifiers (default: the run's "
                    "eval_windows)")
    ev.add_argument("--split", choices=("validation", "test"), default="validation",
                    help=f"{' and '.join(test_split_tasks())} runs: the held-out split to "
                    "score (default: %(default)s)")
    ev.add_argument("--seq-len", type=int, metavar="N",
                    help="window length (default: the run's seq_len)")
    ev.add_argument("--device", default="auto",
                    help="auto, cpu, cuda, cuda:1, ... (default: %(default)s)")
    ev.set_defaults(func=cmd_eval)

    syn = sub.add_parser("synthetic", help="the paper's duplication task 0w0w (Table 2)")
    syn_sub = syn.add_subparsers(dest="synthetic_command", required=True)
    train = syn_sub.add_parser("train", help="train the 1-layer model with one attention")
    train.add_argument("--attention", default="lsh-4", metavar="KIND",
                       help="full, or lsh-R with R hash rounds: lsh-1, lsh-2, lsh-4 (default)")
    train.add_argument("--word-length", type=int, metavar="N",
                       help="|w|, symbols per copy (default: 127; the paper's is 511)")
    train.add_argument("--chunk-length", type=int, metavar="M",
                       help="LSH chunk length (default: 32)")
    train.add_argument("--n-buckets", type=int, metavar="NB",
                       help="LSH buckets (default: 2 * length / chunk length)")
    train.add_argument("--dedup-rounds", action=argparse.BooleanOptionalAction,
                       help="discount pairs that several rounds find (the paper's correction; "
                       "default: off)")
    add_train_flags(train, synthetic=True)
    train.set_defaults(func=cmd_synthetic_train)
    ev = syn_sub.add_parser("eval", help="accuracy with full attention and LSH-8/4/2/1")
    ev.add_argument("--checkpoint", required=True, type=Path, metavar="DIR",
                    help="a run directory of reformer synthetic train")
    ev.add_argument("--attentions", nargs="+", default=list(TABLE2_ATTENTIONS), metavar="KIND",
                    help="columns (default: full lsh-8 lsh-4 lsh-2 lsh-1)")
    ev.add_argument("--sequences", type=int, metavar="N",
                    help="held-out sequences (default: the run's eval_windows)")
    ev.add_argument("--dedup-rounds", action=argparse.BooleanOptionalAction,
                    help="evaluate LSH with or without de-duplication (default: as trained)")
    ev.add_argument("--device", default="auto",
                    help="auto, cpu, cuda, cuda:1, ... (default: %(default)s)")
    ev.set_defaults(func=cmd_synthetic_eval)

