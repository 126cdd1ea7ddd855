"""Image completion: keep the top rows of a picture, let the model paint the rest.

The paper's image figure: given the top of an ImageNet-64 picture, the Reformer samples the
remaining sub-pixels one at a time. Here a picture is the raster-order token sequence of
reformer.data.images; the first ``keep_rows * S * C`` tokens are the prompt, and the remaining
ones are sampled with the incremental cache (reformer.generation), one token per step.

Shapes: S side, C channels, K kept rows, N pictures, M completions per picture.

Decision: the grid shows, per picture, the original, the fragment the model saw (unknown rows
flat grey, GREY) and the M completions side by side, each pixel drawn as a ``scale`` x
``scale`` block so that 32 x 32 pictures are visible.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from reformer.data.images import image_to_tokens, tokens_to_image
from reformer.generation import sample
from reformer.model import ReformerLM

GREY = 128


def complete_image(model: ReformerLM, image: np.ndarray, keep_rows: int, *,
                   temperature: float = 1.0, top_k: int | None = None,
                   generator: torch.Generator | None = None) -> np.ndarray:
    """One completion of ``image`` (S, S, C) from its top ``keep_rows`` rows: (S, S, C) uint8.

    The kept rows are returned byte for byte; the others are sampled.
    """
    size, _, channels = image.shape
    if not 1 <= keep_rows < size:
        raise ValueError(f"keep_rows={keep_rows} must lie in [1, {size - 1}] for {size}x{size} "
                         f"images; pass e.g. --keep-rows {size // 2}")
    tokens = image_to_tokens(image)  # (L,)
    if len(tokens) > model.config.max_seq_len:
        raise ValueError(f"a {size}x{size}x{channels} image is {len(tokens)} tokens but the "
                         f"model's max_seq_len is {model.config.max_seq_len}; use the image "
                         "size the model was trained on")
    prompt = tokens[: keep_rows * size * channels]
    new = list(sample(model, prompt, len(tokens) - len(prompt), temperature=temperature,
                      top_k=top_k, context=len(tokens), generator=generator))
    return tokens_to_image(torch.cat([prompt, torch.tensor(new)]), size, channels)


def fragment(image: np.ndarray, keep_rows: int) -> np.ndarray:
    """``image`` with every row from ``keep_rows`` on replaced by flat grey."""
    out = image.copy()
    out[keep_rows:] = GREY
    return out


def completion_grid(originals: Sequence[np.ndarray], keep_rows: int,
                    completions: Sequence[Sequence[np.ndarray]], scale: int = 4,
                    gap: int = 2) -> np.ndarray:
    """The figure: one row per picture -- original, fragment, then its completions.

    Args:
        originals: N pictures (S, S, C); completions: for each, M pictures (S, S, C).

    Returns:
        (N * (S*scale + gap) + gap, (2 + M) * (S*scale + gap) + gap, 3) uint8, white gaps.
    """
    if len(originals) != len(completions) or len({len(c) for c in completions}) != 1:
        raise ValueError("need the same number of completions for every picture")
    rows = [[o, fragment(o, keep_rows), *c] for o, c in zip(originals, completions, strict=True)]
    cell = originals[0].shape[0] * scale
    grid = np.full((len(rows) * (cell + gap) + gap, len(rows[0]) * (cell + gap) + gap, 3), 255,
                   dtype=np.uint8)
    for i, row in enumerate(rows):
        for j, picture in enumerate(row):
            rgb = np.repeat(picture, 3, axis=2) if picture.shape[2] == 1 else picture
            block = rgb.repeat(scale, axis=0).repeat(scale, axis=1)  # (S*scale, S*scale, 3)
            top, left = gap + i * (cell + gap), gap + j * (cell + gap)
            grid[top:top + cell, left:left + cell] = block
    return grid
