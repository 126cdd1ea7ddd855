"""The ListOps generator (reformer.data.listops): the operators' values by hand, examples
inside the LRA specification, determinism per (seed, split, index), padding."""

from __future__ import annotations

import collections

import pytest
import torch

from reformer.data.listops import (
    N_CLASSES,
    VOCAB,
    ListOpsSpec,
    batch,
    evaluate,
    example,
    parse,
    tokens,
)


@pytest.mark.parametrize("text,value", [
    ("[MAX 4 3 1 0 ]", 4), ("[MIN 4 3 1 0 ]", 0), ("[MED 1 5 8 ]", 5),
    ("[MED 1 5 8 9 ]", 6),  # even count: (5 + 8) // 2
    ("[SM 9 8 7 ]", 4), ("[MAX 4 3 [MIN 2 3 ] 1 0 [MED 1 5 8 9 2 ] ]", 5),
    ("[SM [MAX 9 ] [MIN 9 8 ] ]", 7), ("[MED 3 ]", 3)])
def test_values_by_hand(text, value):
    tree = parse(text.split())
    assert evaluate(tree) == value
    assert tokens(tree) == text.split()


@pytest.mark.parametrize("bad", ["[MAX 1", "1 ]", "[MAX 1 ] ]", "[MAX 12 ]", "[POW 2 ]"])
def test_parse_refuses_malformed_sequences(bad):
    with pytest.raises(ValueError):
        parse(bad.split())


def depth_and_width(tree) -> tuple[int, int]:
    if isinstance(tree, int):
        return 0, 0
    inner = [depth_and_width(a) for a in tree[1]]
    return 1 + max(d for d, _ in inner), max([len(tree[1])] + [w for _, w in inner])


def test_examples_follow_the_specification():
    spec = ListOpsSpec()
    classes = collections.Counter()
    for i in range(150):
        symbols, value = example(7, "train", i)
        assert spec.min_length <= len(symbols) <= spec.max_length
        depth, width = depth_and_width(parse(symbols))
        assert depth <= spec.max_depth and width <= spec.max_args
        assert value == evaluate(parse(symbols)) and 0 <= value < N_CLASSES
        classes[value] += 1
    assert len(classes) == N_CLASSES  # every class occurs


def test_examples_are_fixed_by_seed_split_and_index():
    assert example(0, "test", 3) == example(0, "test", 3)
    firsts = {split: example(0, split, 0)[0] for split in ("train", "validation", "test")}
    assert len({tuple(s) for s in firsts.values()}) == 3
    assert example(1, "train", 0) != example(0, "train", 0)


def test_batch_pads_and_masks():
    spec = ListOpsSpec(min_length=20, max_length=60, max_depth=4)
    ids, mask, labels = batch(0, "validation", [0, 1, 2], spec)
    assert ids.shape == (3, 60) and mask.shape == (3, 60) and labels.shape == (3,)
    for row in range(3):
        symbols, value = example(0, "validation", row, spec)
        assert [VOCAB[t] for t in ids[row, :len(symbols)].tolist()] == symbols
        assert mask[row].sum() == len(symbols) and not ids[row, len(symbols):].any()
        assert labels[row] == value
    assert torch.equal(mask, ids != 0)


@pytest.mark.parametrize("kwargs,match", [({"max_depth": 0}, "max_depth=0"),
                                          ({"min_length": 10, "max_length": 5}, "min_length"),
                                          ({"p_branch": 1.0}, "p_branch=1.0")])
def test_bad_specifications_are_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ListOpsSpec(**kwargs)
    with pytest.raises(ValueError, match="split='dev'"):
        example(0, "dev", 0)
