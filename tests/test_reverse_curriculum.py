"""The reversal benchmark's length curriculum (benchmarks/seq2seq_reverse.py): a short
training sequence must pose the same alignment as a whole-length one, target token t from
source position L+1-t, or what it teaches would not carry over."""

import argparse
import importlib.util
from pathlib import Path

import torch

_PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "seq2seq_reverse.py"
_SPEC = importlib.util.spec_from_file_location("seq2seq_reverse", _PATH)
reverse = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(reverse)


def _args(**kw) -> argparse.Namespace:
    base = dict(length=12, symbols=5, curriculum_start=4, curriculum_share=0.5,
                grow_below=0.0, max_minutes=None, steps=100)
    return argparse.Namespace(**{**base, **kw})


def test_short_sources_are_right_aligned_and_reversed_as_whole_ones() -> None:
    args = _args()
    src, tgt, mask = reverse.sample(3, args, torch.Generator().manual_seed(0), real=5)
    assert src.shape == (3, 12) and tgt.shape == (3, 6) and mask.shape == (3, 12)
    assert mask[:, -5:].all() and not mask[:, :-5].any()
    assert (src[:, :-5] == 0).all() and (src[:, -5:] >= 1).all()
    assert (tgt[:, 0] == reverse.BOS).all()
    for t in range(1, 6):  # 1-based target position t <- source position L + 1 - t
        assert torch.equal(tgt[:, t], src[:, 12 - t])
    whole_src, whole_tgt, whole_mask = reverse.sample(2, args, torch.Generator().manual_seed(1))
    assert whole_mask is None and torch.equal(whole_tgt[:, 1:], whole_src.flip(1))


def test_curriculum_grows_linearly_or_when_the_loss_falls() -> None:
    linear = reverse.Curriculum(_args())
    assert [linear(s, 0, []) for s in (0, 25, 50, 99)] == [4, 8, 12, 12]
    assert reverse.Curriculum(_args(curriculum_start=0))(0, 0, []) == 12
    adaptive = reverse.Curriculum(_args(grow_below=0.1))
    assert adaptive(60, 0, [1.0] * 60) == 4  # the loss is still high: no growth
    losses = [1.0] * 10 + [0.05] * 50
    assert adaptive(60, 0, losses) == 5  # round(1.25 * 4)
    losses += [0.0] * 49  # only 49 steps at the new length: the old ones do not count
    assert adaptive(109, 0, losses) == 5
    assert adaptive(110, 0, losses + [0.0]) == 6
    adaptive.length = 11
    assert adaptive(200, 0, [0.0] * 200) == 12 and adaptive(201, 0, [0.0] * 201) == 12


class _Oracle(torch.nn.Module):
    """Decodes every target right (it is handed them): accuracies must be exactly 1."""

    def __init__(self, tgt: torch.Tensor, vocab: int) -> None:
        super().__init__()
        self.tgt, self.vocab, self.offset = tgt, vocab, 0

    def generate(self, src, n, bos_id, attention_mask=None):
        return self.tgt[self.offset:self.offset + src.shape[0], 1:n + 1]

    def forward(self, src, tgt, attention_mask=None):
        nxt = torch.cat([tgt[:, 1:], tgt[:, :1]], dim=1)  # position t predicts y_{t+1}
        self.offset += src.shape[0]
        return argparse.Namespace(logits=torch.nn.functional.one_hot(nxt, self.vocab).float())


def test_held_out_accuracy_counts_the_target_tokens_of_short_sources() -> None:
    args = _args()
    src, tgt, mask = reverse.sample(3, args, torch.Generator().manual_seed(0), real=5)
    scores = reverse.evaluate(_Oracle(tgt, args.symbols + 1), src, tgt, mask, batch=2)
    assert scores == {"token_accuracy": 1.0, "exact_match": 1.0,
                      "teacher_forced_token_accuracy": 1.0}
