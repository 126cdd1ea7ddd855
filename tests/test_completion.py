"""Image completion: the kept rows stay byte-identical, the grid has the promised layout."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from reformer import ReformerConfig, ReformerLM
from reformer.completion import GREY, complete_image, completion_grid, fragment

SIZE, CHANNELS = 4, 3
CONFIG = ReformerConfig(vocab_size=256, d_model=16, n_heads=2, d_ff=32, n_layers=2,
                        attn_layers=("local", "lsh"), n_hashes=2, chunk_length=8,
                        local_chunk_length=8, max_seq_len=SIZE * SIZE * CHANNELS,
                        axial_pos_shape=(SIZE, SIZE, CHANNELS))


def picture(seed=0):
    return np.random.default_rng(seed).integers(0, 256, (SIZE, SIZE, CHANNELS), dtype=np.uint8)


@pytest.mark.parametrize("keep", [1, 3])
def test_completion_keeps_the_given_rows_and_fills_the_rest(keep):
    torch.manual_seed(0)
    model = ReformerLM(CONFIG)
    image = picture()
    out = complete_image(model, image, keep, generator=torch.Generator().manual_seed(1))
    assert out.shape == image.shape and out.dtype == np.uint8
    assert np.array_equal(out[:keep], image[:keep])
    again = complete_image(model, image, keep, generator=torch.Generator().manual_seed(1))
    assert np.array_equal(out, again)  # seeded sampling is reproducible
    other = complete_image(model, image, keep, generator=torch.Generator().manual_seed(2))
    assert not np.array_equal(out[keep:], other[keep:])  # the rest is sampled


def test_completion_rejects_bad_rows_and_sizes():
    model = ReformerLM(CONFIG)
    with pytest.raises(ValueError, match="keep_rows"):
        complete_image(model, picture(), SIZE)
    big = np.zeros((8, 8, 3), dtype=np.uint8)
    with pytest.raises(ValueError, match="max_seq_len"):
        complete_image(model, big, 2)


def test_fragment_greys_the_unknown_rows():
    image = picture()
    out = fragment(image, 2)
    assert np.array_equal(out[:2], image[:2]) and (out[2:] == GREY).all()


@pytest.mark.parametrize("channels", [1, 3])
def test_grid_layout(channels):
    originals = [np.full((SIZE, SIZE, channels), 10 * i, dtype=np.uint8) for i in range(3)]
    completions = [[np.full((SIZE, SIZE, channels), 100 + 10 * i + j, dtype=np.uint8)
                    for j in range(2)] for i in range(3)]
    scale, gap = 2, 1
    grid = completion_grid(originals, 1, completions, scale=scale, gap=gap)
    cell = SIZE * scale
    assert grid.shape == (3 * (cell + gap) + gap, 4 * (cell + gap) + gap, 3)
    assert (grid[0] == 255).all() and (grid[:, 0] == 255).all()  # white border

    def block(i, j):
        top, left = gap + i * (cell + gap), gap + j * (cell + gap)
        return grid[top:top + cell, left:left + cell]

    for i in range(3):
        assert (block(i, 0) == 10 * i).all()  # original
        frag = block(i, 1)
        assert (frag[:scale] == 10 * i).all() and (frag[scale:] == GREY).all()  # fragment
        for j in range(2):
            assert (block(i, 2 + j) == 100 + 10 * i + j).all()  # completions in order
    with pytest.raises(ValueError, match="same number"):
        completion_grid(originals, 1, [completions[0][:1], *completions[1:]])
