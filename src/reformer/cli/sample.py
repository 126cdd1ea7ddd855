"""``reformer generate`` and ``reformer complete``: sampling from trained runs."""

from __future__ import annotations

import argparse
import codecs
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

from reformer.data import text
from reformer.generation import check_filters, check_sampling, sample, sample_batch
from reformer.model import ReformerLM
from reformer.training import checkpoint as ckpt
from reformer.training.config import TrainConfig, check_device
from reformer.training.metrics import evaluate_sequences
from reformer.training.trainer import resolve_device


# -------------------------------------------------------------------------- generate
def stream_sample(model: ReformerLM, prompt: torch.Tensor, max_new_tokens: int, *,
                  temperature: float, top_k: int | None, top_p: float | None, seed: int,
                  context: int | None = None, highlight: bool = False,
                  max_seconds: float | None = None) -> str:
    """Print sampled text as it is produced (UTF-8 decoded incrementally); returns it.

    Stops early, after whole tokens, once ``max_seconds`` have passed. The arguments are
    checked before anything is printed.
    """
    deadline = None if max_seconds is None else time.monotonic() + max_seconds
    torch.manual_seed(seed)  # LSH rotations of a model without hash_seed
    generator = torch.Generator().manual_seed(seed)
    tokens = sample(model, prompt, max_new_tokens, temperature=temperature, top_k=top_k,
                    top_p=top_p, context=context, generator=generator)  # checks the arguments
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    bold = highlight and sys.stdout.isatty()
    print("\033[1m" if bold else "", end="")
    pieces = []
    for token in tokens:  # ids past the bytes (an imported model's specials) print as U+FFFD
        pieces.append(decoder.decode(bytes([token])) if token < 256 else "\ufffd")
        print(pieces[-1], end="", flush=True)
        if deadline is not None and time.monotonic() > deadline:
            pieces.append(" [... time's up]")
            print(pieces[-1], end="")
            break
    pieces.append(decoder.decode(b"", final=True))
    print(pieces[-1] + ("\033[0m" if bold else ""))
    return "".join(pieces)


def read_prompts(args: argparse.Namespace) -> list[tuple[str | None, torch.Tensor]]:
    """(the text to echo or None, the (L,) byte ids) of each prompt: every --prompt, or the
    --prompt-file's, or a newline (these two not echoed)."""
    if args.prompt is not None and args.prompt_file is not None:
        raise ValueError("pass either --prompt or --prompt-file, not both")
    if args.prompt_file is not None:
        prompt = text.to_ids(np.frombuffer(Path(args.prompt_file).read_bytes(), np.uint8))
        if len(prompt) == 0:
            raise ValueError(f"the prompt file {args.prompt_file} is empty")
        return [(None, prompt)]
    if args.prompt is None:
        return [(None, text.encode("\n"))]
    prompts = [(p, text.encode(p)) for p in args.prompt]
    for i, (_, ids) in enumerate(prompts):
        if len(ids) == 0:
            which = "the prompt" if len(prompts) == 1 else f"--prompt number {i + 1}"
            raise ValueError(f"{which} is empty; pass --prompt with some text")
    return prompts


def decode_bytes(tokens: list[int]) -> str:
    """Byte ids -> text, as :func:`stream_sample` prints it (ids past the bytes as U+FFFD)."""
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    pieces = [decoder.decode(bytes([t])) if t < 256 else "\ufffd" for t in tokens]
    return "".join(pieces) + decoder.decode(b"", final=True)


def print_batch(model: ReformerLM, prompts: list[tuple[str | None, torch.Tensor]],
                args: argparse.Namespace) -> None:
    """--n continuations of each prompt, sampled in one batch (per decoding length), each
    printed under a header line "--- prompt i/P, sample j/N ---".

    Continuation k = (i - 1) * N + (j - 1) draws with the sampling seed --seed + k, and LSH
    rotations (a model without hash_seed) come from --seed for all (:func:`sample_batch`), so
    the first (prompt 1, sample 1) is what ``reformer generate`` prints for prompt 1 alone.
    """
    continuations = sample_batch(
        model, [ids for _, ids in prompts], args.max_new_tokens, n_per_prompt=args.n,
        temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, context=args.context,
        seed=args.seed)
    for k, tokens in enumerate(continuations):
        i, j = divmod(k, args.n)
        echo = prompts[i][0] or ""
        print(f"--- prompt {i + 1}/{len(prompts)}, sample {j + 1}/{args.n} ---")
        print(echo + decode_bytes(tokens), flush=True)


def print_translations(prompts: list[tuple[str | None, torch.Tensor]],
                       args: argparse.Namespace) -> int:
    """A seq2seq run: --n targets for each prompt as the source, until the end token or
    --max-new-tokens (at most the decoder's max_seq_len), each under a header "--- source
    i/P, sample j/N ---"; greedy with --temperature 0."""
    from reformer.data.pairs import BOS, EOS
    from reformer.encoder_decoder import translate_batch
    if args.context is not None:
        raise ValueError("--context applies to language models; a seq2seq run reads the whole "
                         "prompt as its source")
    greedy = args.temperature == 0
    model, run = ckpt.load_model(args.checkpoint, resolve_device(args.device), args.n_hashes)
    longest = min(args.max_new_tokens, run.model.max_seq_len)  # the decoder's positions
    targets = translate_batch(model, [ids for _, ids in prompts], longest, BOS,
                              EOS, n_per_source=args.n, greedy=greedy,
                              temperature=1.0 if greedy else args.temperature, top_k=args.top_k,
                              top_p=args.top_p, seed=args.seed)
    for k, tokens in enumerate(targets):
        i, j = divmod(k, args.n)
        print(f"--- source {i + 1}/{len(prompts)}, sample {j + 1}/{args.n} ---")
        print(decode_bytes(tokens), flush=True)
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    # Everything is checked before the prompt is echoed, so that an error is all one sees.
    check_device(args.device)
    if args.n < 1:
        raise ValueError(f"--n {args.n} must be >= 1 (continuations of each prompt)")
    prompts = read_prompts(args)
    run = ckpt.read_config(args.checkpoint)
    if run.training.task == "seq2seq":
        return print_translations(prompts, args)
    if run.training.task != "text":
        hint = {"images": "reformer complete", "synthetic": "reformer synthetic eval"}.get(
            run.training.task, "reformer eval")
        raise ValueError(f"{args.checkpoint} is a {run.training.task} run, not a text model; "
                         f"use {hint}")
    check_sampling(run.model, args.max_new_tokens, temperature=args.temperature,
                   top_k=args.top_k, top_p=args.top_p, context=args.context)
    model, run = ckpt.load_model(args.checkpoint, resolve_device(args.device),
                                 args.n_hashes, language_model=True)
    if len(prompts) > 1 or args.n > 1:
        print_batch(model, prompts, args)
        return 0
    echo, prompt = prompts[0]
    print(echo or "", end="", flush=True)
    stream_sample(model, prompt, args.max_new_tokens, temperature=args.temperature,
                  top_k=args.top_k, top_p=args.top_p, seed=args.seed, context=args.context)
    return 0


# -------------------------------------------------------------------------- complete
def check_output_file(out: Path) -> None:
    """A ValueError unless a picture can be written to ``out`` (checked before any work)."""
    from PIL import Image

    folder = out.parent
    if out.is_dir():
        raise ValueError(f"--out {out} is a folder; pass a file name, e.g. "
                         f"{out / 'completions.png'}")
    if not folder.is_dir():
        raise ValueError(f"cannot write {out}: the folder {folder} does not exist; create it "
                         "or pass another --out")
    if not os.access(folder, os.W_OK):
        raise ValueError(f"cannot write {out}: the folder {folder} is not writable; pass "
                         "another --out")
    Image.init()
    if Image.registered_extensions().get(out.suffix.lower()) not in Image.SAVE:
        raise ValueError(f"cannot write {out}: {out.suffix or 'no extension'!r} is not a "
                         "picture format Pillow writes; use e.g. .png")


def held_out_pictures(args: argparse.Namespace, cfg: TrainConfig) -> list[np.ndarray]:
    """Up to --n pictures to complete, with a note on stderr when there are fewer."""
    from reformer.data import images

    if args.images:
        source = images.ImageFiles(images.image_paths(args.images), cfg.image_size,
                                   cfg.image_channels)
        where = "given with --images"
    else:
        spec = cfg.replace(eval_windows=max(args.n, cfg.eval_windows)).task_spec()
        source = images.load_image_splits(spec)[1]
        where = "held-out"
    if len(source) < args.n:
        print(f"reformer complete: note: {len(source)} {where} picture(s), fewer than --n "
              f"{args.n}; completing {len(source)}", file=sys.stderr, flush=True)
    return [source[i] for i in range(min(args.n, len(source)))]


def check_complete_args(args: argparse.Namespace) -> tuple[TrainConfig, int, Path]:
    """(the run's training config, rows kept, the grid's path), all checked before any work."""
    check_device(args.device)
    cfg = ckpt.read_config(args.checkpoint).training
    if cfg.task != "images":
        raise ValueError(f"{args.checkpoint} is a {cfg.task} run; complete needs a run trained "
                         "with --task images")
    if args.n < 1 or args.samples < 1:
        raise ValueError(f"--n {args.n} and --samples {args.samples} must both be >= 1")
    keep = args.keep_rows if args.keep_rows is not None else cfg.image_size // 2
    if not 1 <= keep < cfg.image_size:
        raise ValueError(f"--keep-rows {keep} must lie in [1, {cfg.image_size - 1}] for "
                         f"{cfg.image_size}x{cfg.image_size} pictures; pass e.g. --keep-rows "
                         f"{cfg.image_size // 2}")
    check_filters(args.temperature, args.top_k)
    out = args.out or Path(args.checkpoint) / "completions.png"
    check_output_file(out)
    return cfg, keep, out


def cmd_complete(args: argparse.Namespace) -> int:
    """Keep the top rows of held-out pictures, sample the rest, write the grid, time it."""
    from PIL import Image

    from reformer.completion import complete_image, completion_grid
    from reformer.data import images

    cfg, keep, out = check_complete_args(args)
    model, _ = ckpt.load_model(args.checkpoint, resolve_device(args.device),
                                 args.n_hashes, language_model=True)
    pictures = held_out_pictures(args, cfg)
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
    Image.fromarray(completion_grid(pictures, keep, completions)).save(out)
    print(f"median {statistics.median(times):.1f} s per completed image; grid "
          f"(original | fragment | completions) in {out}")
    return 0


def add_parsers(sub: argparse._SubParsersAction) -> None:
    gen = sub.add_parser("generate", help="sample text from a trained run")
    gen.add_argument("--checkpoint", required=True, type=Path, metavar="DIR",
                     help="a run directory of reformer train")
    gen.add_argument("--prompt", action="append",
                     help="text to continue (default: a newline); give it again for more "
                     "prompts, sampled together")
    gen.add_argument("--prompt-file", type=Path, metavar="FILE",
                     help="read the prompt from this file instead")
    gen.add_argument("--n", type=int, default=1, metavar="N",
                     help="continuations of each prompt, sampled together in one batch; "
                     "with N > 1 or several prompts each is printed under a header line "
                     "(default: %(default)s)")
    gen.add_argument("--max-new-tokens", type=int, default=500, metavar="N",
                     help="bytes to sample, >= 0 (default: %(default)s)")
    gen.add_argument("--temperature", type=float, default=0.8, metavar="T",
                     help="> 0; lower is more conservative; a seq2seq run decodes greedily "
                     "with 0 (default: %(default)s)")
    gen.add_argument("--top-k", type=int, metavar="K",
                     help="sample among the K most likely bytes, K >= 1 (default: all)")
    gen.add_argument("--top-p", type=float, metavar="P",
                     help="sample among the most likely bytes of total probability P, "
                     "0 < P <= 1 (default: 1, all)")
    gen.add_argument("--n-hashes", type=int, metavar="R",
                     help="LSH rounds (default: the model's)")
    gen.add_argument("--context", type=int, metavar="N",
                     help="tokens the model sees, 2 to max_seq_len (default: max_seq_len)")
    gen.add_argument("--seed", type=int, default=0, metavar="N",
                     help="seeds the sampling (default: %(default)s)")
    gen.add_argument("--device", default="auto",
                     help="auto, cpu, cuda, cuda:1, ... (default: %(default)s)")
    gen.set_defaults(func=cmd_generate)

    comp = sub.add_parser("complete", help="complete held-out pictures from their top rows")
    comp.add_argument("--checkpoint", required=True, type=Path, metavar="DIR",
                      help="a run directory of reformer train --task images")
    comp.add_argument("--images", nargs="+", metavar="PATH",
                      help="pictures to complete (default: the run's held-out images)")
    comp.add_argument("--keep-rows", type=int, metavar="K",
                      help="rows kept (default: half the picture)")
    comp.add_argument("--n", type=int, default=4, metavar="N",
                      help="pictures (default: %(default)s)")
    comp.add_argument("--samples", type=int, default=2, metavar="M",
                      help="completions per picture (default: %(default)s)")
    comp.add_argument("--temperature", type=float, default=1.0, metavar="T",
                      help="> 0 (default: %(default)s)")
    comp.add_argument("--top-k", type=int, metavar="K",
                      help="sample among the K most likely values (default: all)")
    comp.add_argument("--n-hashes", type=int, metavar="R",
                      help="LSH rounds (default: the model's)")
    comp.add_argument("--out", type=Path, metavar="FILE.png",
                      help="the grid (default: DIR/completions.png)")
    comp.add_argument("--seed", type=int, default=0, metavar="N",
                      help="seeds the sampling (default: %(default)s)")
    comp.add_argument("--device", default="auto",
                      help="auto, cpu, cuda, cuda:1, ... (default: %(default)s)")
    comp.set_defaults(func=cmd_complete)
