"""The ``reformer`` command line (also ``python -m reformer``).

Each subcommand is a thin wrapper over importable functions (reformer.training,
reformer.generation, reformer.completion); this package is the only code that prints. Its
modules: ``train`` (train, demo), ``sample`` (generate, complete), ``evaluate`` (eval,
synthetic). A user's mistake (a ValueError from the library, a missing file) becomes one line
on stderr and exit code 2, never a traceback.

Subcommands:
    train     train on text (default: Shakespeare), pictures or the synthetic task, with
              checkpoints
    generate  stream text sampled from a trained run
    complete  complete held-out pictures from their top rows (image runs)
    eval      held-out bits per token, optionally for several numbers of hash rounds
    synthetic the paper's duplication task: ``synthetic train`` and ``synthetic eval``
    demo      train the default preset for a few minutes, evaluate, and print a sample
    build-kernels  build the native CPU kernels ahead of their first use
    import-hf a Hugging Face Reformer directory as a run (generate, eval, fine-tune)
    export-hf a run's weights as a Hugging Face Reformer directory

The library's notes (the ``reformer`` logger: a kernel build starting and ending) are
printed on stderr above any progress bar.

Before PyTorch loads, the command line shortens OpenMP's spin-wait (``GOMP_SPINCOUNT``, see
:func:`_brief_spin_wait`) unless the user set ``OMP_WAIT_POLICY`` or ``GOMP_SPINCOUNT``.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

# libgomp's spins before a thread that finished a parallel region sleeps (default 300,000)
SPIN_COUNT = "3000"


class _NoteHandler(logging.Handler):
    """The library's log lines on stderr, written through tqdm so that a bar stays whole."""

    def emit(self, record: logging.LogRecord) -> None:
        from tqdm import tqdm

        tqdm.write(self.format(record), file=sys.stderr)


def _show_library_notes() -> None:
    logger = logging.getLogger("reformer")
    if not any(isinstance(h, _NoteHandler) for h in logger.handlers):  # main may run again
        logger.addHandler(_NoteHandler())
        logger.setLevel(logging.INFO)
        logger.propagate = False


def _brief_spin_wait() -> None:
    """Let OpenMP's idle threads sleep after SPIN_COUNT spins instead of libgomp's 300,000.

    PyTorch's threads spin after every parallel region, waiting for the next one, and a 16K
    training step of ours opens about 2,900 of them (0.4 ms apart). On a machine that other
    jobs keep busy the spinning threads take the cores that those jobs, and our own
    descheduled threads, need. benchmarks/contention.py on this 2-core machine beside two busy
    processes (medians of 5, docs/benchmarks.md): the 16K step slowed 2.37x with 3,000 spins
    against 4.40x with the default (plain PyTorch: 2.0x), the tiny preset 2.65x against 4.11x,
    for no loss idle (16K: 13.6K against 12.8K tokens/s). 30,000 spins still cover the gaps
    between regions: the 16K step slowed 5.56x. Only possible before libgomp loads (it reads
    the variable once), so library users set it themselves (README).
    """
    if ("torch" not in sys.modules and "OMP_WAIT_POLICY" not in os.environ
            and "GOMP_SPINCOUNT" not in os.environ):
        os.environ["GOMP_SPINCOUNT"] = SPIN_COUNT


def build_parser() -> argparse.ArgumentParser:
    from reformer.cli import evaluate, interop, kernels, sample, train  # PyTorch: see main

    parser = argparse.ArgumentParser(
        prog="reformer", description="Train Reformer models on text, pictures or the paper's "
        "synthetic task; sample from them and evaluate them.")
    sub = parser.add_subparsers(dest="command", required=True)
    train.add_parsers(sub)
    sample.add_parsers(sub)
    evaluate.add_parsers(sub)
    kernels.add_parsers(sub)
    interop.add_parsers(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    # Everything, the import of PyTorch (1.5 s) included, runs inside the handlers below, so
    # that Ctrl-C at any moment of start-up ends in one line and exit code 130.
    command = (argv if argv is not None else sys.argv[1:])[:1] or [""]
    name = f"reformer {command[0]}".rstrip()
    _brief_spin_wait()
    _show_library_notes()
    try:
        args = build_parser().parse_args(argv)
        return args.func(args)
    except BrokenPipeError:  # e.g. `reformer generate ... | head`
        sys.stdout = open(os.devnull, "w")  # silence the flush at exit
        return 0
    except (ValueError, OSError) as err:
        message = str(err).splitlines()[0] if str(err) else type(err).__name__
        print(f"{name}: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"\n{name}: interrupted", file=sys.stderr)
        return 130
