"""Images as byte sequences, pixel by pixel (the paper's ImageNet-64 task, section 5).

An S x S picture with C channels is the sequence of its S * S * C sub-pixel values in raster
order -- row, then column, then channel -- each value 0..255 one token (vocabulary 256). At
S = 64, C = 3 that is the paper's 12,288-token ImageNet-64 layout. The metric is bits per
dimension: the mean next-token cross-entropy in bits over every sub-pixel.

Shapes: N images, S side, C channels (3 = RGB, 1 = grayscale), L = S * S * C.

Sources:
- Folders, files or globs of PNG/JPEG pictures (read with Pillow), each centre-cropped to a
  square and resized to S x S. They are decoded when drawn, so a folder larger than RAM works.
  The held-out set is the last ``val_fraction`` of the sorted files, or ``val_data``.
- The default, which works offline: crops of the real photographs that ship inside
  scikit-image (:data:`DEFAULT_PHOTOS`: an astronaut, a cat, coffee, a rocket, ...). Each
  photograph's bottom fifth is held out: evaluation crops come from it and training crops from
  the rest, so no held-out pixel is ever trained on. Crops are square, 12-20% of the shorter
  side, at seeded random places, resized to S x S.

Decision: resizing uses Pillow's area-averaging (``Image.BOX``) when shrinking, the filter
that keeps the statistics of natural images best at these scales.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from reformer.data.task import Task, TaskSpec
from reformer.data.text import resolve_paths

if TYPE_CHECKING:
    from PIL.Image import Image

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")
DEFAULT_PHOTOS = ("astronaut", "chelsea", "coffee", "hubble_deep_field", "immunohistochemistry",
                  "retina", "rocket", "stereo_motorcycle")  # skimage.data functions
HELD_OUT_SHARE = 0.2  # of each default photograph's height, at the bottom
DEFAULT_TRAIN_CROPS = 4096
CROP_SIDE = (0.12, 0.2)  # of the photograph's shorter side
MAX_LISTED = 10  # unreadable pictures named in the error


# ---------------------------------------------------------------------------- the codec
def image_to_tokens(image: np.ndarray) -> torch.Tensor:
    """(S, S, C) or (S, S) uint8 -> (L,) int64 tokens in raster order (row, column, channel)."""
    if image.dtype != np.uint8:
        raise ValueError(f"images must be uint8 (values 0..255), got {image.dtype}")
    return torch.from_numpy(np.ascontiguousarray(image).reshape(-1).astype(np.int64))


def tokens_to_image(tokens: torch.Tensor | Sequence[int], size: int, channels: int) -> np.ndarray:
    """(L,) tokens -> (S, S, C) uint8, the inverse of :func:`image_to_tokens`."""
    values = torch.as_tensor(tokens).reshape(-1)
    if values.numel() != size * size * channels:
        raise ValueError(f"{values.numel()} tokens cannot form a {size}x{size}x{channels} "
                         f"image ({size * size * channels} tokens)")
    if values.min() < 0 or values.max() > 255:
        raise ValueError("image tokens must lie in 0..255")
    return values.to(torch.uint8).numpy().reshape(size, size, channels)


def square_resize(picture: Image, size: int, channels: int) -> np.ndarray:
    """Centre-crop a Pillow image to a square, resize it to size x size: (S, S, C) uint8."""
    from PIL import Image as PILImage

    picture = picture.convert("RGB" if channels == 3 else "L")
    w, h = picture.size
    side = min(w, h)
    left, top = (w - side) // 2, (h - side) // 2
    picture = picture.crop((left, top, left + side, top + side))
    resample = PILImage.Resampling.BOX if side >= size else PILImage.Resampling.BICUBIC
    array = np.asarray(picture.resize((size, size), resample), dtype=np.uint8)
    return array.reshape(size, size, channels)


# ------------------------------------------------------------------------------ sources
class ImageFiles:
    """Pictures on disk, decoded, centre-cropped and resized when read."""

    def __init__(self, paths: Sequence[Path], size: int, channels: int) -> None:
        self.paths, self.size, self.channels = list(paths), size, channels

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> np.ndarray:
        try:
            with open_picture(self.paths[index], self.size) as picture:
                return square_resize(picture, self.size, self.channels)
        except read_errors() as err:
            raise ValueError(f"cannot read image {self.paths[index]} ({err}); remove it or "
                             "convert it to PNG/JPEG") from err


def read_errors() -> tuple[type[Exception], ...]:
    """What Pillow raises for files it cannot decode (DecompressionBombError: a huge picture)."""
    from PIL import Image as PILImage

    return (OSError, SyntaxError, ValueError, EOFError, IndexError, struct.error,
            PILImage.DecompressionBombError)


def open_picture(path: Path, size: int) -> Image:
    """``path`` opened with Pillow, JPEGs set to decode at about 2 * size (faster)."""
    from PIL import Image as PILImage

    picture = PILImage.open(path)
    picture.draft("RGB", (2 * size, 2 * size))
    return picture


def check_pictures(paths: Sequence[Path], size: int) -> None:
    """Decode every picture once; one ValueError naming all that cannot be read.

    A training run draws pictures at random, so a broken file would otherwise stop it at
    whichever step first draws it.
    """
    from PIL import UnidentifiedImageError

    bad = []
    for path in paths:
        try:
            with open_picture(path, size) as picture:
                picture.load()
        except read_errors() as err:
            why = "not a picture" if isinstance(err, UnidentifiedImageError) else str(err)
            bad.append(f"{path} ({why})")
    if bad:
        shown = "; ".join(bad[:MAX_LISTED]) + (f"; and {len(bad) - MAX_LISTED} more"
                                                 if len(bad) > MAX_LISTED else "")
        raise ValueError(f"{len(bad)} of {len(paths)} pictures cannot be read: {shown}; remove "
                         "them or convert them to PNG/JPEG")


class ImageArray:
    """Pictures already in memory as an (N, S, S, C) uint8 array."""

    def __init__(self, images: np.ndarray) -> None:
        self.images = images

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> np.ndarray:
        return self.images[index]


def image_paths(specs: Sequence[str | Path]) -> list[Path]:
    """The image files among files, folders and globs (sorted), or a clear error."""
    try:
        paths = [p for p in resolve_paths(specs) if p.suffix.lower() in IMAGE_SUFFIXES]
    except ValueError:
        paths = []
    if not paths:
        raise ValueError(f"no image files ({', '.join(IMAGE_SUFFIXES)}) found in "
                         f"{[str(s) for s in specs]}; pass folders of PNG or JPEG pictures")
    return paths


def default_photographs(channels: int) -> list[np.ndarray]:
    """scikit-image's bundled photographs as (H, W, C) uint8 arrays (no download)."""
    try:
        import skimage.data
    except ImportError as err:
        raise ValueError("the default images come from scikit-image, which is not installed; "
                         "pip install 'reformer[data]' or pass --images DIR") from err
    from PIL import Image as PILImage

    photos = []
    for name in DEFAULT_PHOTOS:
        array = getattr(skimage.data, name)()
        if name == "stereo_motorcycle":
            array = array[0]  # (left view, right view, disparity): the left photograph
        picture = PILImage.fromarray(array)
        array = np.asarray(picture.convert("RGB" if channels == 3 else "L"), dtype=np.uint8)
        photos.append(array.reshape(array.shape[0], array.shape[1], channels))
    return photos


def photo_crops(photos: Sequence[np.ndarray], n: int, size: int, held_out: bool,
                seed: int) -> np.ndarray:
    """(n, S, S, C) square crops at seeded random places, resized to S x S.

    Crops of ``held_out`` come from the bottom HELD_OUT_SHARE of each photograph, the others
    from the rest; photographs take turns.
    """
    from PIL import Image as PILImage

    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        photo = photos[i % len(photos)]
        h, w = photo.shape[:2]
        cut = int(h * (1 - HELD_OUT_SHARE))
        top_lo, top_hi = (cut, h) if held_out else (0, cut)
        side = int(min(h, w) * rng.uniform(*CROP_SIDE))
        side = max(1, min(side, top_hi - top_lo, w))  # smaller than S: upsampled
        top = int(rng.integers(top_lo, top_hi - side + 1))
        left = int(rng.integers(0, w - side + 1))
        region = photo[top:top + side, left:left + side]  # (side, side, C)
        crop = PILImage.fromarray(region[..., 0] if region.shape[2] == 1 else region)
        out.append(square_resize(crop, size, photo.shape[2]))
    return np.stack(out)


def load_image_splits(spec: TaskSpec) -> tuple[ImageFiles | ImageArray,
                                                ImageFiles | ImageArray, str]:
    """(training images, held-out images, a description) for a run's data."""
    size, channels = spec.image_size, spec.image_channels
    if not spec.data:
        photos = default_photographs(channels)
        train = photo_crops(photos, DEFAULT_TRAIN_CROPS, size, held_out=False, seed=spec.seed)
        val = photo_crops(photos, max(spec.eval_windows, 1), size, held_out=True,
                          seed=spec.seed)
        return ImageArray(train), ImageArray(val), (
            f"{len(train):,} crops of {len(photos)} scikit-image photographs for training, "
            f"{len(val)} held-out crops from their bottom fifths")
    paths = image_paths(spec.data)
    if spec.val_data:
        val_paths = image_paths(spec.val_data)
    else:
        n_val = max(1, int(round(len(paths) * spec.val_fraction)))
        if n_val >= len(paths):
            raise ValueError(f"{len(paths)} image(s) are too few for a training and a held-out "
                             "part; add images or pass --val-data")
        paths, val_paths = paths[:-n_val], paths[-n_val:]
    return ImageFiles(paths, size, channels), ImageFiles(val_paths, size, channels), (
        f"{len(paths):,} images for training, {len(val_paths):,} held out")


class ImageTask(Task):
    """Whole images as sequences; every sub-pixel carries a loss (bits per dimension)."""

    name, vocab_size = "images", 256

    def __init__(self, spec: TaskSpec) -> None:
        self.size, self.channels = spec.image_size, spec.image_channels
        self.global_batch, self.rank_rows = spec.global_batch, spec.rank_rows
        self.train, self.val, self.description = load_image_splits(spec)
        if isinstance(self.train, ImageFiles):  # every picture now, not at a later step
            check_pictures([*self.train.paths, *self.val.paths], self.size)
        self.generator = torch.Generator().manual_seed(spec.seed)
        n_eval = min(spec.eval_windows, len(self.val))
        self.eval_inputs = torch.stack([image_to_tokens(self.val[i]) for i in range(n_eval)])

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's (B, L) rows of a global micro-batch; only they are decoded."""
        picks = torch.randint(0, len(self.train), (self.global_batch,),
                              generator=self.generator)  # (world * B,): every rank's
        mine = picks[self.rank_rows].tolist()
        batch = torch.stack([image_to_tokens(self.train[i]) for i in mine])  # (B, L)
        return batch, batch

    def eval_set(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.eval_inputs, self.eval_inputs

    def state_dict(self) -> dict[str, Any]:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.generator.set_state(state["generator"])

    def fingerprint(self) -> dict[str, int]:
        return {"train_images": len(self.train), "val_images": len(self.val),
                "image_size": self.size, "image_channels": self.channels}

    def describe(self) -> str:
        return (f"{self.size}x{self.size}x{self.channels} images: {self.description} "
                f"({len(self.eval_inputs)} evaluation images)")
