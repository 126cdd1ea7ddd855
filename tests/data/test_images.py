"""Images as token sequences: codec, crops and resizing, sources, splits, bits per dimension."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image

from reformer import ReformerConfig, ReformerLM
from reformer.data import images
from reformer.training.config import TrainConfig, resolve_run_config
from reformer.training.metrics import evaluate_sequences


@pytest.mark.parametrize("channels", [1, 3])
def test_codec_round_trip_is_exact_and_raster_ordered(channels):
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (5, 5, channels), dtype=np.uint8)
    tokens = images.image_to_tokens(image)
    assert tokens.shape == (75 if channels == 3 else 25,) and tokens.dtype == torch.long
    assert np.array_equal(images.tokens_to_image(tokens, 5, channels), image)
    # raster order: row, then column, then channel
    assert tokens[channels * (2 * 5 + 3) + channels - 1] == image[2, 3, channels - 1]


def test_codec_rejects_bad_input():
    with pytest.raises(ValueError, match="uint8"):
        images.image_to_tokens(np.zeros((4, 4, 3), dtype=np.float32))
    with pytest.raises(ValueError, match="cannot form"):
        images.tokens_to_image(torch.zeros(10, dtype=torch.long), 4, 3)
    with pytest.raises(ValueError, match="0..255"):
        images.tokens_to_image(torch.full((48,), 300), 4, 3)


@pytest.mark.parametrize(("w", "h", "size", "channels"), [(40, 30, 16, 3), (30, 40, 8, 1),
                                                            (10, 10, 32, 3)])
def test_square_resize_centre_crops_and_resizes(w, h, size, channels):
    picture = Image.new("RGB", (w, h), (200, 10, 10))
    out = images.square_resize(picture, size, channels)
    assert out.shape == (size, size, channels) and out.dtype == np.uint8


def test_centre_crop_keeps_the_middle():
    array = np.zeros((10, 30, 3), dtype=np.uint8)
    array[:, 10:20] = 255  # the centre square of a 30x10 picture is white
    out = images.square_resize(Image.fromarray(array), 10, 3)
    assert (out == 255).all()


def write_pictures(folder, n, size=(20, 12)):
    folder.mkdir()
    for i in range(n):
        Image.new("RGB", size, (i * 20, 100, 50)).save(folder / f"p{i:02d}.png")
    (folder / "notes.txt").write_text("not an image")
    return folder


def test_folder_source_splits_the_sorted_files(tmp_path):
    folder = write_pictures(tmp_path / "pics", 10)
    cfg = TrainConfig(task="images", data=(str(folder),), image_size=8, seq_len=192,
                      val_fraction=0.2)
    train, val, _ = images.load_image_splits(cfg.task_spec())
    assert (len(train), len(val)) == (8, 2)
    assert [p.name for p in val.paths] == ["p08.png", "p09.png"]
    assert train[0].shape == (8, 8, 3) and train[0][0, 0, 0] == 0


def test_unreadable_or_missing_images_give_clear_errors(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no image files"):
        images.image_paths([tmp_path / "empty"])
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not a png")
    with pytest.raises(ValueError, match="cannot read image"):
        images.ImageFiles([bad], 8, 3)[0]


def test_default_crops_come_from_disjoint_parts_of_the_photographs():
    photo = np.zeros((100, 120, 3), dtype=np.uint8)
    photo[80:] = 255  # the held-out bottom fifth is white, the rest black
    train = images.photo_crops([photo], 20, 8, held_out=False, seed=0)
    val = images.photo_crops([photo], 20, 8, held_out=True, seed=0)
    assert train.shape == (20, 8, 8, 3) and (train == 0).all()
    assert (val == 255).all()
    big = images.photo_crops([photo], 3, 64, held_out=True, seed=0)  # the strip is 20 rows
    assert big.shape == (3, 64, 64, 3) and (big == 255).all()


def test_image_task_batches_and_resume(tmp_path):
    folder = write_pictures(tmp_path / "pics", 6)
    cfg = TrainConfig(task="images", data=(str(folder),), image_size=4, image_channels=1,
                      seq_len=16, batch_size=3, eval_windows=5, val_fraction=0.3)
    task = images.ImageTask(cfg.task_spec())
    x, y = task.next_batch()
    assert x.shape == (3, 16) and torch.equal(x, y)
    assert task.eval_set()[0].shape == (2, 16)  # only 2 held-out pictures exist
    state = task.state_dict()
    expected = task.next_batch()[0]
    task.load_state_dict(state)
    assert torch.equal(task.next_batch()[0], expected)


def test_run_config_shapes_the_model_like_the_image():
    run = resolve_run_config("images-cpu", image_size=16)
    assert run.training.seq_len == 16 * 16 * 3 == run.model.max_seq_len
    assert run.model.axial_pos_shape == (16, 16, 3)
    gray = resolve_run_config("images-cpu", image_size=8, image_channels=1)
    assert gray.model.axial_pos_shape == (8, 8) and gray.training.seq_len == 64
    paper = resolve_run_config("imagenet64")  # its own axial dims are kept
    assert paper.model.axial_pos_shape == (64, 64, 3)
    assert paper.model.axial_pos_dims == (384, 384, 256)
    with pytest.raises(ValueError, match="must equal image_size"):
        TrainConfig(task="images", image_size=8, seq_len=100)


def test_bits_per_dim_of_a_known_distribution():
    """A model whose logits ignore the input and equal log p scores the cross-entropy of p."""
    config = ReformerConfig(vocab_size=256, d_model=16, n_heads=2, d_ff=16, n_layers=1,
                            attn_layers=("full",), max_seq_len=48)
    model = ReformerLM(config)
    p = torch.zeros(256)
    p[:4] = torch.tensor([0.5, 0.25, 0.125, 0.125])
    with torch.no_grad():
        model.head.weight.zero_()
        model.head.bias.copy_(torch.log(p.clamp(min=1e-30)))
    pixels = torch.tensor([0, 0, 1, 2, 3, 0, 1, 0] * 6).view(1, 48)
    bits, _ = evaluate_sequences(model, pixels)
    targets = pixels[0, 1:]
    expected = float(-torch.log2(p[targets]).mean())
    assert bits == pytest.approx(expected, abs=1e-5)
    with torch.no_grad():
        model.head.bias.zero_()  # uniform over 256 values: exactly 8 bits per dimension
    assert evaluate_sequences(model, pixels)[0] == pytest.approx(math.log2(256), abs=1e-5)
