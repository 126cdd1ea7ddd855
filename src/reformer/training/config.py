"""TrainConfig: everything about a training run that is not the architecture.

Like :class:`reformer.ReformerConfig` it is a frozen dataclass validated on creation and saved
into every run directory (``config.json`` holds ``{"model": ..., "training": ...}``).

Decisions:
- ``steps`` and ``max_minutes`` both bound the run; the learning-rate schedule's progress is
  whichever is further along (see :func:`reformer.training.optim.lr_at`), so a time-bounded run
  still decays to its final learning rate by the deadline.
- ``max_minutes`` counts the run's whole wall time, summed over resumed sessions.
- Some fields may change when a run is resumed (:data:`RESUMABLE_FIELDS`: how long to train,
  how often to evaluate or save, where to run); the others would change the loss trajectory,
  so a different value on resume is an error.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any

import torch

from reformer.config import ReformerConfig, is_int, is_real, require
from reformer.data.task import TASKS, TaskSpec
from reformer.heads import POOLINGS
from reformer.parallel.data_parallel import PARALLEL
from reformer.presets import DEFAULT_PRESET, get_preset, with_seq_len

PRECISIONS = ("fp32", "bf16")
DEVICE_TYPES = ("cpu", "cuda", "mps")
RESUMABLE_FIELDS = frozenset({"steps", "max_minutes", "eval_every", "eval_windows",
                              "eval_n_hashes", "checkpoint_every", "device", "parallel"})


@dataclass(frozen=True)
class TrainConfig:
    """A training run: data, optimisation, evaluation and checkpoint schedule."""

    task: str = "text"  # text | images | synthetic | classify | listops | mlm (data.task)
    data: tuple[str, ...] = ()  # files, folders or globs; empty = the task's default data
    val_data: tuple[str, ...] = ()  # held-out files; empty = the tail of ``data``
    val_fraction: float = 0.05
    seq_len: int = 16384  # images: image_size**2 * image_channels; synthetic: 2 * (|w| + 1)
    image_size: int = 32  # images are centre-cropped and resized to image_size**2 pixels
    image_channels: int = 3  # 3 = RGB, 1 = grayscale
    batch_size: int = 1
    grad_accum: int = 1
    steps: int = 1000
    max_minutes: float | None = None
    # AdamW with linear warm-up and cosine decay to min_lr_ratio * lr
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 10
    weight_decay: float = 0.01
    betas: tuple[float, float] = (0.9, 0.98)
    grad_clip: float | None = 1.0
    precision: str = "fp32"
    # evaluation and checkpoints
    eval_every: int = 100
    eval_windows: int = 4
    eval_n_hashes: tuple[int, ...] = ()  # extra LSH rounds to evaluate with, e.g. (8,)
    checkpoint_every: int = 100
    seed: int = 0
    device: str = "auto"
    # the heads' tasks (reformer.data.labelled): classifier pooling, share of tokens masked
    pooling: str = "mean"  # classify, listops: mean (over real tokens), first or ends
    head_hidden: int = 0  # classify, listops: width of a residual ReLU layer (0: none)
    pool_width: int = 1  # classify, listops with pooling "ends": tokens read at each end
    mask_prob: float = 0.15  # mlm
    # a run directory whose newest checkpoint's trunk (every weight but the head's) starts
    # this run's (checkpoint.load_trunk), e.g. a listops-mlm run's for a listops classifier
    init_from: str | None = None
    # under torchrun: ddp (whole model per process), fsdp (sharded per layer) or sequence
    # (each sequence split across the processes; reformer.parallel.sequence)
    parallel: str = "ddp"

    def __post_init__(self) -> None:
        for name in ("data", "val_data", "eval_n_hashes", "betas"):
            value = getattr(self, name)
            if isinstance(value, (str, int, float)):
                value = (value,)
            object.__setattr__(self, name, tuple(value))
        for name in ("seq_len", "batch_size", "grad_accum", "steps", "eval_every",
                     "eval_windows", "checkpoint_every", "image_size"):
            value = getattr(self, name)
            require(is_int(value) and value >= 1, name, value, "must be a positive integer",
                     f"pass e.g. {name}=1")
        if self.seq_len < 2:
            raise ValueError(f"seq_len={self.seq_len} must be at least 2 (one target)")
        self._validate_task()
        self._validate_optimiser()
        require(_is_number(self.val_fraction) and 0 < self.val_fraction < 1, "val_fraction",
                 self.val_fraction, "must lie in (0, 1)", "pass e.g. val_fraction=0.05")
        require(self.max_minutes is None or (_is_number(self.max_minutes)
                                              and self.max_minutes > 0), "max_minutes",
                 self.max_minutes, "must be a finite number > 0, or None for no time limit",
                 "pass e.g. max_minutes=4")
        require(self.precision in PRECISIONS, "precision", self.precision, "is unknown",
                 f"use one of {PRECISIONS}")
        require(all(is_int(r) and r >= 1 for r in self.eval_n_hashes), "eval_n_hashes",
                 self.eval_n_hashes, "must be positive integers", "pass e.g. (8,)")
        require(is_int(self.seed) and self.seed >= 0, "seed", self.seed,
                 "must be a non-negative integer", "pass e.g. seed=0")
        check_device(self.device)
        require(self.pooling in POOLINGS, "pooling", self.pooling, "is unknown",
                 f"use one of {POOLINGS}")
        require(is_int(self.head_hidden) and self.head_hidden >= 0, "head_hidden",
                 self.head_hidden, "must be a non-negative integer",
                 "pass 0 for a linear classifier or e.g. 256")
        require(is_int(self.pool_width) and self.pool_width >= 1, "pool_width",
                self.pool_width, "must be a positive integer", "pass e.g. pool_width=16")
        require(self.pool_width == 1 or self.pooling == "ends", "pool_width", self.pool_width,
                f"applies to pooling='ends' only (pooling={self.pooling!r})",
                "pass pool_width=1 or pooling='ends'")
        require(_is_number(self.mask_prob) and 0 < self.mask_prob <= 1, "mask_prob",
                 self.mask_prob, "must lie in (0, 1]", "pass e.g. mask_prob=0.15")
        require(self.parallel in PARALLEL, "parallel", self.parallel, "is unknown",
                 f"use one of {PARALLEL}")
        require(self.init_from is None or (isinstance(self.init_from, str) and self.init_from),
                 "init_from", self.init_from, "must be a run directory's path or None",
                 "pass e.g. init_from='runs/listops-mlm'")

    def _validate_optimiser(self) -> None:
        require(_is_number(self.lr) and self.lr > 0, "lr", self.lr,
                 "must be a finite number > 0", "pass e.g. lr=3e-3")
        require(_is_number(self.min_lr_ratio) and 0 <= self.min_lr_ratio <= 1, "min_lr_ratio",
                 self.min_lr_ratio, "must lie in [0, 1]", "pass e.g. min_lr_ratio=0.1")
        require(is_int(self.warmup_steps) and self.warmup_steps >= 0, "warmup_steps",
                 self.warmup_steps, "must be a non-negative integer", "pass e.g. warmup_steps=10")
        require(_is_number(self.weight_decay) and self.weight_decay >= 0, "weight_decay",
                 self.weight_decay, "must be a finite number >= 0", "pass e.g. weight_decay=0.01")
        require(len(self.betas) == 2 and all(_is_number(b) and 0 <= b < 1 for b in self.betas),
                 "betas", self.betas, "must be two numbers in [0, 1)", "pass e.g. (0.9, 0.98)")
        require(self.grad_clip is None or (_is_number(self.grad_clip) and self.grad_clip > 0),
                 "grad_clip", self.grad_clip, "must be a finite number > 0, or None for no "
                 "clipping", "pass e.g. grad_clip=1.0")

    def _validate_task(self) -> None:
        if self.task not in TASKS:
            raise ValueError(f"task={self.task!r} is unknown; use one of {TASKS}")
        if self.image_channels not in (1, 3):
            raise ValueError(f"image_channels={self.image_channels} must be 1 (grayscale) or 3 "
                             "(RGB)")
        if self.task == "images" and self.seq_len != self.image_tokens:
            raise ValueError(f"seq_len={self.seq_len} must equal image_size**2 * "
                             f"image_channels = {self.image_tokens} for images; leave --seq-len "
                             "out (it follows --image-size)")
        if self.task == "synthetic":
            if self.seq_len % 2 or self.seq_len < 4:
                raise ValueError(f"seq_len={self.seq_len} must be even and >= 4 for the "
                                 "duplication task 0w0w (seq_len = 2 * (|w| + 1))")
            if self.data or self.val_data:
                raise ValueError("the synthetic task generates its data; drop --data/--val-data")

    @property
    def image_tokens(self) -> int:
        """Tokens of one image: image_size**2 * image_channels."""
        return image_token_count(self.image_size, self.image_channels)

    @property
    def tokens_per_step(self) -> int:
        return self.batch_size * self.grad_accum * self.seq_len

    def task_spec(self, rank: int = 0, world: int = 1) -> TaskSpec:
        """What the task (reformer.data) needs from this run, for data-parallel ``rank`` of
        ``world`` processes; ``batch_size`` stays per rank."""
        shared = {f.name: getattr(self, f.name) for f in fields(TaskSpec)
                  if f.name not in ("rank", "world")}  # TaskSpec's fields are a subset of ours
        return TaskSpec(**shared, rank=rank, world=world)

    def replace(self, **changes: Any) -> TrainConfig:
        return replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown training config keys {unknown}; known keys are "
                             f"{sorted(known)}")
        return cls(**d)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)


@dataclass(frozen=True)
class RunConfig:
    """What a run directory's ``config.json`` holds: the model, the training, the preset."""

    model: ReformerConfig
    training: TrainConfig
    preset: str | None = None

    def __post_init__(self) -> None:
        seq_len, max_seq_len = self.training.seq_len, self.model.max_seq_len
        require(seq_len <= max_seq_len, "seq_len", seq_len,
                 f"exceeds the model's max_seq_len={max_seq_len}",
                 f"train on windows of at most {max_seq_len} tokens or build the model with "
                 f"max_seq_len={seq_len}")

    def to_json(self) -> str:
        return json.dumps({"format": 1, "preset": self.preset, "model": self.model.to_dict(),
                           "training": self.training.to_dict()}, indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> RunConfig:
        d = json.loads(text)
        return cls(model=ReformerConfig.from_dict(d["model"]),
                   training=TrainConfig.from_dict(d.get("training", {})),
                   preset=d.get("preset"))


def resolve_run_config(preset: str | None = None, config_file: str | Path | None = None,
                       **overrides: Any) -> RunConfig:
    """A new run's configuration: a preset or a JSON file, then explicit overrides.

    Args:
        preset: a name from :data:`reformer.presets.PRESETS` (default ``shakespeare``, or none
            when ``config_file`` is given).
        config_file: JSON holding either a ReformerConfig's fields or a run's ``config.json``
            (``{"model": ..., "training": ...}``); it replaces the preset's model, and its
            training section, if any, updates the preset's training defaults.
        overrides: TrainConfig fields; None values are ignored (flags not given).

    The model's ``max_seq_len`` is set to the training ``seq_len``; with a config file and no
    seq_len anywhere, ``seq_len`` defaults to the model's ``max_seq_len``. For images,
    ``seq_len`` follows the image size and the axial positions take the image's shape
    (rows, columns, channels), so that a pixel's row, column and channel each get an embedding.
    """
    if config_file is None or preset is not None:
        chosen = get_preset(preset or DEFAULT_PRESET)
        model, training = chosen.model, dict(chosen.training)
        preset = chosen.name
    else:
        training = {}
    if config_file is not None:
        model, from_file = _read_config_file(Path(config_file))
        training.update(from_file)
        training.setdefault("seq_len", model.max_seq_len)
    training.update({k: v for k, v in overrides.items() if v is not None})
    if training.get("task") == "images" and overrides.get("seq_len") is None:
        training["seq_len"] = image_token_count(
            training.get("image_size", TrainConfig.image_size),
            training.get("image_channels", TrainConfig.image_channels))
    train = TrainConfig.from_dict(training)
    model = with_seq_len(model, train.seq_len)
    if (train.task == "images" and model.pos_embedding == "axial"
            and model.axial_pos_shape != image_axes(train)):
        model = model.replace(axial_pos_shape=image_axes(train), axial_pos_dims=None)
    return RunConfig(model=model, training=train, preset=preset)


def check_device(name: str) -> str:
    """``name`` if it names a device to run on: auto, cpu, cuda, cuda:N or mps; else a
    ValueError. Whether that device exists here is checked when a model is placed on it."""
    try:
        device = torch.device(name) if isinstance(name, str) and name != "auto" else None
    except RuntimeError:
        device = None
    if name != "auto" and (device is None or device.type not in DEVICE_TYPES):
        raise ValueError(f"device={name!r} is not a device; use auto, cpu, cuda, cuda:N "
                         "(e.g. cuda:1) or mps")
    return name


def _is_number(value: Any) -> bool:
    """A finite int or float (not a bool, NaN or infinity)."""
    return is_real(value) and math.isfinite(value)


def image_token_count(size: int, channels: int) -> int:
    """Tokens of one size x size picture with ``channels`` channels (raster order)."""
    return size * size * channels


def image_axes(cfg: TrainConfig) -> tuple[int, ...]:
    """The axial position shape of an image: (rows, columns, channels), or (rows, columns)."""
    size = cfg.image_size
    return (size, size) if cfg.image_channels == 1 else (size, size, cfg.image_channels)


def _read_config_file(path: Path) -> tuple[ReformerConfig, dict[str, Any]]:
    if not path.is_file():
        raise ValueError(f"config file {str(path)!r} does not exist; pass a JSON file")
    try:
        d = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(f"config file {path} is not valid JSON ({err})") from err
    if not isinstance(d, dict):
        raise ValueError(f"config file {path} must hold a JSON object of config fields")
    if "model" in d:
        return ReformerConfig.from_dict(d["model"]), dict(d.get("training", {}))
    return ReformerConfig.from_dict(d), {}
