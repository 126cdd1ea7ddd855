"""Hugging Face Reformer checkpoints: read and write ``ReformerModelWithLMHead`` directories.

A Hugging Face (HF) directory holds ``config.json`` (transformers' ``ReformerConfig``, mapped
by :mod:`reformer.interop.hf_config`) and the weights, ``model.safetensors`` or
``pytorch_model.bin`` (read with ``weights_only=True``: no pickled code runs), possibly sharded
with an ``*.index.json``. :func:`from_hf` turns one, or a live ``ReformerModelWithLMHead``,
into a :class:`reformer.ReformerLM`; :func:`to_hf` writes a directory that
``ReformerModelWithLMHead.from_pretrained`` loads with no missing or unexpected keys. Reading
needs no ``transformers``. The settings that are refused, and why, are listed in
:mod:`reformer.interop.hf_config` (and docs/interop.md).

Semantics are not this package's business: it maps names, shapes and settings, and marks the
imported config ``hf_compat=True``, under which our model computes HF's function (its key
epsilon, circular local windows, padding to the lcm of the chunk lengths, its rotation draws;
DESIGN.md 3.3).

Weights, HF -> ours (per layer i: ``reformer.encoder.layers.{i}.`` -> ``stack.blocks.{i}.``):

    reformer.embeddings.word_embeddings              embed              (V, D)
    reformer.embeddings.position_embeddings          pos                (see below)
    attention.layer_norm                             f.norm             (D,)
    attention.self_attention.query_key (lsh)         f.attn.w_qk        (H*E, D)
    attention.self_attention.query, key (local)      f.attn.w_q, w_k    (H*E, D)
    attention.self_attention.value                   f.attn.w_v         (H*E, D)
    attention.output.dense                           f.attn.w_o         (D, H*E)
    feed_forward.layer_norm                          g.norm             (D,)
    feed_forward.dense.dense                         g.ff.w_in          (F, D), (F,)
    feed_forward.output.dense                        g.ff.w_out         (D, F), (D,)
    reformer.encoder.layer_norm                      norm               (2D,)
    lm_head.decoder                                  head               (V, 2D), (V,)

Axial table k is (1, .., n_k, .., 1, d_k) in HF (n_k on axis k) and (n_k, d_k) here; learned
positions are ``position_embeddings.embedding`` -> ``pos``. Every HF weight must be used and
every one of ours produced: an unknown or a missing name is refused. (Checkpoints of
transformers 3.x also hold each attention layer's mask constants, which are dropped.)

Decision: ``lm_head.bias`` was tied to ``lm_head.decoder.bias`` in transformers 4 (a
safetensors file holds either name); transformers 5 keeps it as a separate parameter that its
forward never reads. Reading takes ``lm_head.decoder.bias`` when both are present; writing
gives both the head's bias, so that transformers 4 and 5 load it with nothing missing.

Shapes: V vocab_size, D d_model, H n_heads, E d_head, F d_ff, n_k x d_k one axial table.
"""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from reformer.config import ReformerConfig, fail
from reformer.heads import ReformerForMaskedLM
from reformer.interop.hf_config import config_from_hf, config_to_hf
from reformer.model import ReformerLM

__all__ = ["config_from_hf", "config_to_hf", "from_hf", "state_from_hf", "state_to_hf", "to_hf"]

# ------------------------------------------------------------------------------ weights
_PER_LAYER = (("attention.layer_norm.weight", "f.norm.weight"),
              ("attention.layer_norm.bias", "f.norm.bias"),
              ("attention.output.dense.weight", "f.attn.w_o.weight"),
              ("feed_forward.layer_norm.weight", "g.norm.weight"),
              ("feed_forward.layer_norm.bias", "g.norm.bias"),
              ("feed_forward.dense.dense.weight", "g.ff.w_in.weight"),
              ("feed_forward.dense.dense.bias", "g.ff.w_in.bias"),
              ("feed_forward.output.dense.weight", "g.ff.w_out.weight"),
              ("feed_forward.output.dense.bias", "g.ff.w_out.bias"))
_PROJECTIONS = {"lsh": (("query_key", "w_qk"), ("value", "w_v")),
                "local": (("query", "w_q"), ("key", "w_k"), ("value", "w_v"))}
_TOP = (("reformer.embeddings.word_embeddings.weight", "embed.weight"),
        ("reformer.encoder.layer_norm.weight", "norm.weight"),
        ("reformer.encoder.layer_norm.bias", "norm.bias"),
        ("lm_head.decoder.weight", "head.weight"), ("lm_head.decoder.bias", "head.bias"))
_POSITIONS = "reformer.embeddings.position_embeddings."
_TIED_BIAS = "lm_head.bias"
# Attention mask values that transformers before 4.x saved as persistent buffers (constants,
# not weights: -1e3, -1e5, -1e4, -1e9); old checkpoints hold them, and they are dropped.
_MASK_CONSTANTS = ("self_mask_value_float16", "self_mask_value_float32", "mask_value_float16",
                   "mask_value_float32")
Shapes = tuple[tuple[int, ...], tuple[int, ...]]  # (from, to) of a tensor that changes shape
Move = tuple[str, str, Shapes | None]  # (from name, to name, shapes)


def _moves(cfg: ReformerConfig) -> list[Move]:
    """Every tensor of the model: HF name, our name, and the reshape between them."""
    moves: list[Move] = [(hf, ours, None) for hf, ours in _TOP]  # HF -> ours
    if cfg.pos_embedding == "learned":
        moves.append((_POSITIONS + "embedding.weight", "pos.weight", None))
    elif cfg.pos_embedding == "axial":
        shape, dims = cfg.axial_pos_shape, cfg.axial_pos_dims
        for k, (n, d) in enumerate(zip(shape, dims, strict=True)):
            hf_shape = tuple(n if j == k else 1 for j in range(len(shape))) + (d,)
            moves.append((f"{_POSITIONS}weights.{k}", f"pos.weights.{k}", (hf_shape, (n, d))))
    for i in range(cfg.n_layers):
        hf, ours, kind = f"reformer.encoder.layers.{i}.", f"stack.blocks.{i}.", cfg.layer_kind(i)
        if kind not in _PROJECTIONS:
            fail("attn_layers", cfg.attn_layers, f"has {kind!r} attention, which HF's "
                 "Reformer lacks", "use lsh and local layers")
        moves += [(hf + a, ours + b, None) for a, b in _PER_LAYER]
        moves += [(f"{hf}attention.self_attention.{a}.weight", f"{ours}f.attn.{b}.weight", None)
                  for a, b in _PROJECTIONS[kind]]
    return moves


def _move(src: dict[str, torch.Tensor], pairs: list[Move], what: str
          ) -> dict[str, torch.Tensor]:
    """``src`` renamed by ``pairs`` and reshaped where they give shapes; every pair must find
    its tensor and every tensor of ``src`` must be used."""
    left = dict(src)
    missing = [frm for frm, _, _ in pairs if frm not in left]
    if missing:
        raise ValueError(f"the {what} weights lack {_few(missing)}; they are not those of "
                         "this config's model (another architecture or a damaged file)")
    out = {}
    for frm, to, shapes in pairs:
        t = left.pop(frm)
        if shapes is not None:
            if tuple(t.shape) != shapes[0]:
                raise ValueError(f"{what} weight {frm} has shape {tuple(t.shape)}, not "
                                 f"{shapes[0]} as the config's axial_pos_shape implies")
            t = t.reshape(shapes[1])
        out[to] = t
    if left:
        raise ValueError(f"unknown {what} weights {_few(sorted(left))}; they belong to no "
                         "part of a Reformer language model, so they are refused")
    return out


def _few(names: list[str]) -> str:
    return ", ".join(names[:4]) + (f" and {len(names) - 4} more" if len(names) > 4 else "")


def state_from_hf(hf_state: dict[str, torch.Tensor], cfg: ReformerConfig
                  ) -> dict[str, torch.Tensor]:
    """A ``ReformerLM`` state dict from a ``ReformerModelWithLMHead`` one (tensors shared)."""
    hf = {k: v for k, v in hf_state.items()
          if not (".self_attention." in k and k.rsplit(".", 1)[1] in _MASK_CONSTANTS)}
    tied = hf.pop(_TIED_BIAS, None)  # see the module docstring
    if tied is not None and "lm_head.decoder.bias" not in hf:
        hf["lm_head.decoder.bias"] = tied
    return _move(hf, _moves(cfg), "Hugging Face")


def state_to_hf(state: dict[str, torch.Tensor], cfg: ReformerConfig
                ) -> dict[str, torch.Tensor]:
    """A ``ReformerModelWithLMHead`` state dict from a ``ReformerLM`` one."""
    moves = [(ours, hf, None if s is None else s[::-1]) for hf, ours, s in _moves(cfg)]
    out = _move(state, moves, "Reformer")
    out[_TIED_BIAS] = out["lm_head.decoder.bias"].clone()  # its own storage (safetensors)
    return out


# ---------------------------------------------------------------------------- models
def from_hf(source: str | os.PathLike | Any, dtype: torch.dtype | None = None
            ) -> ReformerLM | ReformerForMaskedLM:
    """Our model, in eval mode on the CPU, with the weights of an HF Reformer: a
    ``ReformerLM`` for a causal one (``ReformerModelWithLMHead``), a
    :class:`reformer.heads.ReformerForMaskedLM` for a bidirectional one (HF's
    ``ReformerForMaskedLM``: the same weights, ``is_decoder`` false).

    Args:
        source: a directory (config.json and model.safetensors or pytorch_model.bin) or a
            live ``transformers`` model of either class.
        dtype: the model's dtype (default: that of the HF word embeddings).
    """
    if isinstance(source, (str, os.PathLike)):
        hf_config, hf_state = _read_directory(Path(source))
    elif callable(getattr(getattr(source, "config", None), "to_dict", None)) \
            and callable(getattr(source, "state_dict", None)):
        hf_config, hf_state = source.config.to_dict(), source.state_dict()
    else:
        raise ValueError(f"cannot read an HF Reformer from a {type(source).__name__}; pass a "
                         "directory saved with save_pretrained or a ReformerModelWithLMHead")
    config = config_from_hf(hf_config)
    state = state_from_hf(hf_state, config)
    dtype = dtype or state["embed.weight"].dtype
    cls = ReformerLM if config.causal else ReformerForMaskedLM
    with torch.random.fork_rng(devices=[]):  # building draws weights: leave the caller's RNG
        model = cls(config).to(dtype)
    for name, target in model.state_dict().items():
        if name not in state:
            raise ValueError(f"our model has {name}, which no HF weight maps to; this "
                             "reader does not know the model's current layout")
        if state[name].shape != target.shape:
            raise ValueError(f"HF weight for {name} has shape {tuple(state[name].shape)}, but "
                             f"the config implies {tuple(target.shape)}; config.json and the "
                             "weights do not belong together")
    model.load_state_dict(state, strict=True)  # copies: nothing is shared with the source
    return model.eval()


def _read_directory(path: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    config_file = path / "config.json"
    if not config_file.is_file():
        raise ValueError(f"{path} is not an HF model directory (no config.json); pass the "
                         "folder that save_pretrained wrote")
    try:
        hf_config = json.loads(config_file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(f"{config_file} is not valid JSON ({err})") from err
    for name in ("model.safetensors", "pytorch_model.bin"):
        index = path / f"{name}.index.json"
        if index.is_file():  # sharded: the index names the files
            files = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"]
                               .values()))
        elif (path / name).is_file():
            files = [name]
        else:
            continue
        state: dict[str, torch.Tensor] = {}
        for file in files:
            state.update(_load_weights(path / file))
        return hf_config, state
    raise ValueError(f"{path} holds no model.safetensors or pytorch_model.bin; download the "
                     "weights next to config.json")


def _load_weights(file: Path) -> dict[str, torch.Tensor]:
    try:
        if file.suffix == ".safetensors":
            return load_file(file)
        return torch.load(file, map_location="cpu", weights_only=True)  # no pickled code
    except (SafetensorError, RuntimeError, EOFError, pickle.UnpicklingError, OSError) as err:
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise ValueError(f"{file} is not a readable weights file ({reason}); download it "
                         "again") from err


def to_hf(model: ReformerLM | ReformerForMaskedLM, directory: str | os.PathLike) -> Path:
    """Write ``model`` as an HF directory: config.json and model.safetensors; returns it
    (a ``ReformerModelWithLMHead``, or a ``ReformerForMaskedLM`` for ours).

    Files of the same names in ``directory`` are replaced.
    """
    if not isinstance(model, (ReformerLM, ReformerForMaskedLM)):
        raise ValueError(f"a {type(model).__name__} has no Hugging Face export here; "
                         "export-hf writes language models and masked language models")
    config = config_to_hf(model.config, masked_lm=isinstance(model, ReformerForMaskedLM))
    weights = state_to_hf(model.state_dict(), model.config)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in weights.items()}
    config["dtype"] = str(tensors["lm_head.decoder.weight"].dtype).removeprefix("torch.")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    save_file(tensors, directory / "model.safetensors", metadata={"format": "pt"})
    (directory / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n",
                                           encoding="utf-8")
    return directory
