"""Does the encoder-decoder learn? Reversing random sequences of symbols (issue 24, item 3).

The source is ``--length`` symbols drawn uniformly from ``--symbols`` (token ids 1..symbols);
the target is the source reversed, after a start token (id 0): decoder_input_ids = labels =
[0, y_1, ..., y_L], y_t = x_{L+1-t}. To get y_t right the decoder's cross-attention must find
source position L+1-t, anywhere in the sequence: a test of the dense cross-attention and of
the positions, not of local context.

The model (``reformer.ReformerEncoderDecoder``) trains with AdamW, linear warm-up and cosine
decay, on fresh random batches (so there is no over-fitting to measure); evaluation
decodes ``--eval-sequences`` held-out sources greedily with the caches
(``generate``) and reports the per-token accuracy and the exact-match rate (every token of a
sequence right), plus the teacher-forced per-token accuracy. On CPU. Run:

    .venv/bin/python benchmarks/seq2seq_reverse.py --length 64 --max-minutes 3 \
        --out benchmarks/results/seq2seq-reverse-64.json

and ``--length 1024`` (the default) for the long version. Writes one JSON object to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import time
from pathlib import Path

import torch

from reformer import ReformerConfig
from reformer.encoder_decoder import ReformerEncoderDecoder

BOS = 0


def build(args: argparse.Namespace) -> ReformerEncoderDecoder:
    shape = dict(vocab_size=args.symbols + 1, d_model=args.d_model, n_heads=args.heads,
                 d_ff=args.d_ff, n_layers=args.layers, chunk_length=args.chunk,
                 local_chunk_length=args.chunk, n_hashes=2, pos_embedding=args.pos,
                 attn_head_chunk_size=args.heads, dropout=0.0)
    encoder = ReformerConfig(**shape, attn_layers=tuple(args.encoder_attn.split(",")),
                             causal=False, n_chunks_after=1, max_seq_len=args.length)
    decoder = ReformerConfig(**shape, attn_layers=tuple(args.decoder_attn.split(",")),
                             max_seq_len=args.length + 1)
    return ReformerEncoderDecoder(encoder, decoder, cross_chunk_size=args.cross_chunk)


def sample(n: int, args: argparse.Namespace, g: torch.Generator, real: int | None = None
           ) -> tuple:
    """n sources (n, L), their decoder inputs = labels (n, real+1) and the source mask.

    With ``real`` < L only the last ``real`` source positions hold symbols (the rest is
    masked padding), so target token t still comes from source position L+1-t whatever the
    length: what a short sequence teaches holds for the long ones (the length curriculum)."""
    real = args.length if real is None else real
    src = torch.randint(1, args.symbols + 1, (n, args.length), generator=g)
    mask = torch.arange(args.length) >= args.length - real  # (L,)
    src = src * mask
    tgt = torch.cat([torch.full((n, 1), BOS, dtype=torch.long), src.flip(1)[:, :real]], dim=1)
    return src, tgt, None if real == args.length else mask.expand(n, -1)


class Curriculum:
    """The training source length: ``--curriculum-start`` symbols growing to ``--length``,
    linearly over the first ``--curriculum-share`` of the budget, or, with ``--grow-below X``,
    by a quarter each time the mean loss of the last 50 steps at the current length falls
    below X."""

    WINDOW = 50

    def __init__(self, args: argparse.Namespace) -> None:
        self.args, self.length, self.since = args, args.curriculum_start or args.length, 0

    def __call__(self, step: int, elapsed: float, losses: list[float]) -> int:
        """The length for ``step``, given every step's loss so far."""
        args = self.args
        if not args.curriculum_start or self.length == args.length:
            return args.length
        if args.grow_below:
            recent = losses[max(self.since, len(losses) - self.WINDOW):]
            if len(recent) == self.WINDOW and sum(recent) / self.WINDOW < args.grow_below:
                self.length, self.since = min(args.length, round(1.25 * self.length)), step
            return self.length
        grown = min(1.0, budget_done(args, step, elapsed) / args.curriculum_share)
        return round(args.curriculum_start + grown * (args.length - args.curriculum_start))


@torch.no_grad()
def evaluate(model: ReformerEncoderDecoder, src: torch.Tensor, tgt: torch.Tensor,
             mask: torch.Tensor | None, batch: int) -> dict:
    model.eval()
    right, exact, forced = 0, 0, 0
    for i in range(0, src.shape[0], batch):
        s, t = src[i:i + batch], tgt[i:i + batch]
        m = None if mask is None else mask[i:i + batch]
        out = model.generate(s, t.shape[1] - 1, bos_id=BOS, attention_mask=m)  # (b, L)
        right += int((out == t[:, 1:]).sum())
        exact += int((out == t[:, 1:]).all(dim=1).sum())
        # teacher forcing: position t predicts y_{t+1}
        logits = model(s, t, attention_mask=m).logits[:, :-1]
        forced += int((logits.argmax(-1) == t[:, 1:]).sum())
    model.train()
    n, tokens = src.shape[0], tgt[:, 1:].numel()
    return {"token_accuracy": right / tokens, "exact_match": exact / n,
            "teacher_forced_token_accuracy": forced / tokens}


def budget_done(args: argparse.Namespace, step: int, elapsed: float) -> float:
    """The share of the budget (steps or minutes, whichever runs out first) used so far."""
    done = step / args.steps
    return max(done, elapsed / (60 * args.max_minutes)) if args.max_minutes else done


def lr_at(args: argparse.Namespace, step: int, elapsed: float) -> float:
    done = budget_done(args, step, elapsed)
    warm = min(1.0, (step + 1) / args.warmup)
    return args.lr * warm * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, done))))


def train(args: argparse.Namespace) -> dict:
    torch.manual_seed(args.seed)
    model = build(args)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
    g_train = torch.Generator().manual_seed(args.seed)
    held_out = sample(args.eval_sequences, args, torch.Generator().manual_seed(10_000 + args.seed))
    history, losses, start, step = [], [], time.perf_counter(), 0
    curriculum = Curriculum(args)
    while step < args.steps:
        elapsed = time.perf_counter() - start
        if args.max_minutes and elapsed > 60 * args.max_minutes:
            break
        for group in optimizer.param_groups:
            group["lr"] = lr_at(args, step, elapsed)
        real = curriculum(step, elapsed, losses)
        src, tgt, mask = sample(args.batch_size, args, g_train, real)
        loss = model(src, tgt, attention_mask=mask, labels=tgt, return_logits=False).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        losses.append(loss.item())
        step += 1
        if step % args.log_every == 0:
            recent = sum(losses[-args.log_every:]) / args.log_every
            row = {"step": step, "loss": round(recent, 4), "length": real,
                   "minutes": round((time.perf_counter() - start) / 60, 2)}
            if args.eval_every and step % args.eval_every == 0:
                row.update(evaluate(model, *held_out, args.batch_size))
            history.append(row)
            print(json.dumps(row), flush=True)
    train_minutes = (time.perf_counter() - start) / 60
    final = evaluate(model, *held_out, args.batch_size)
    return {"steps": step, "train_minutes": round(train_minutes, 2),
            "final_loss": round(sum(losses[-20:]) / max(1, len(losses[-20:])), 4),
            "parameters": model.num_parameters(), "held_out": final, "history": history}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--length", type=int, default=1024, help="source (and target) length")
    p.add_argument("--symbols", type=int, default=8, help="alphabet size")
    p.add_argument("--steps", type=int, default=100_000)
    p.add_argument("--max-minutes", type=float, default=None, help="stop training after this")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--warmup", type=int, default=50)
    p.add_argument("--d-model", type=int, default=64)
    p.add_argument("--d-ff", type=int, default=128)
    p.add_argument("--heads", type=int, default=2)
    p.add_argument("--layers", type=int, default=1, help="encoder and decoder layers each")
    p.add_argument("--chunk", type=int, default=64, help="LSH and local chunk length")
    p.add_argument("--cross-chunk", type=int, default=256, help="cross-attention chunk")
    p.add_argument("--encoder-attn", default="local", help="comma-separated kinds")
    p.add_argument("--decoder-attn", default="local", help="comma-separated kinds")
    p.add_argument("--pos", default="learned", choices=["axial", "learned", "sinusoidal"])
    p.add_argument("--curriculum-start", type=int, default=0,
                   help="train from sources of this many symbols (right-aligned, the rest "
                   "masked) growing to --length (0: always --length)")
    p.add_argument("--curriculum-share", type=float, default=0.5,
                   help="share of the budget over which the curriculum grows")
    p.add_argument("--grow-below", type=float, default=0.0,
                   help="grow the curriculum by a quarter whenever the last 50 steps' mean "
                   "loss is below this (0: grow linearly in time)")
    p.add_argument("--eval-sequences", type=int, default=64)
    p.add_argument("--eval-every", type=int, default=0, help="steps (0: only at the end)")
    p.add_argument("--log-every", type=int, default=25)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    p.add_argument("--out", required=True, help="JSON result path")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    result = train(args)
    record = {"benchmark": "seq2seq_reverse", "args": vars(args), **result,
              "date": time.strftime("%Y-%m-%dT%H:%M:%S"), "torch": torch.__version__,
              "machine": platform.processor() or platform.machine()}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(record, indent=2) + "\n")
    print(json.dumps({"held_out": result["held_out"], "steps": result["steps"],
                      "train_minutes": result["train_minutes"]}), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
