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
    assert [linear(0, s) for s in (0, 25, 50, 99)] == [4, 8, 12, 12]
    assert reverse.Curriculum(_args(curriculum_start=0))(0, 0) == 12
    adaptive = reverse.Curriculum(_args(grow_below=0.1))
    adaptive.losses = [1.0] * 60
    assert adaptive(0, 60) == 4  # the loss is still high: no growth
    adaptive.losses = [1.0] * 10 + [0.05] * 50
    assert adaptive(0, 60) == 5 and adaptive.losses == []  # round(1.25 * 4)
    adaptive.length = 11
    adaptive.losses = [0.0] * 50
    assert adaptive(0, 200) == 12 and adaptive(0, 201) == 12  # capped at --length
