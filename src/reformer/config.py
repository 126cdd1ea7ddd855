"""ReformerConfig: the architecture of a Reformer language model, validated on creation.

Reference: Kitaev, Kaiser, Levskaya, "Reformer: The Efficient Transformer" (ICLR 2020).

The config is a frozen dataclass. Derived values (``d_head`` when omitted, the default axial
shape and dims) are filled in ``__post_init__`` and validated there, so a config that exists is
a config that works; it is saved into every checkpoint as JSON.

Decisions:
- ``n_buckets`` may be ``None``: the number of buckets is then chosen per call from the padded
  length L as ``2 * L / chunk_length`` (the paper's choice: a chunk holds about two buckets) and
  factorised into two even factors once it exceeds ``AUTO_FACTORISE_ABOVE``, which keeps hashing
  cheap at a million tokens. See :func:`resolve_n_buckets`.
- ``attn_layers`` cycles over the layers: ``("local", "lsh")`` with 6 layers is
  local, lsh, local, lsh, local, lsh.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, fields, replace
from typing import Any

ATTENTION_KINDS = ("lsh", "local", "full")
POS_EMBEDDINGS = ("axial", "learned", "sinusoidal", "none")
ACTIVATIONS = ("relu", "gelu")
AUTO_FACTORISE_ABOVE = 64


def fail(name: str, value: Any, rule: str, fix: str) -> None:
    """The error for a user's mistake: the value, the rule and the fix."""
    raise ValueError(f"{name}={value!r} {rule}; {fix}")


def require(ok: bool, name: str, value: Any, rule: str, fix: str) -> None:
    """:func:`fail` unless ``ok``."""
    if not ok:
        fail(name, value, rule, fix)


def is_int(value: Any) -> bool:
    """An int that is not a bool (True would otherwise pass for 1)."""
    return isinstance(value, int) and not isinstance(value, bool)


def is_real(value: Any) -> bool:
    """An int or float that is not a bool; NaN and infinities included (compare them)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def check_positive_int(name: str, value: Any) -> None:
    """A ValueError naming ``name`` unless ``value`` is an integer >= 1 (not a bool)."""
    if not is_int(value) or value < 1:
        fail(name, value, "must be a positive integer", f"pass e.g. {name}=1 or more")


@dataclass(frozen=True)
class ReformerConfig:
    """Architecture of a :class:`reformer.ReformerLM`.

    Shapes: L sequence length, D ``d_model``, H ``n_heads``, E ``d_head``, R ``n_hashes``,
    NB ``n_buckets``, M ``chunk_length``.
    """

    vocab_size: int = 256
    d_model: int = 256
    n_heads: int = 4
    d_head: int | None = None  # default d_model // n_heads
    d_ff: int = 1024
    n_layers: int = 6
    attn_layers: tuple[str, ...] = ("local", "lsh")
    # LSH attention
    n_hashes: int = 2
    n_buckets: int | tuple[int, ...] | None = None
    chunk_length: int = 64
    n_chunks_before: int = 1
    n_chunks_after: int = 0
    dedup_rounds: bool = False
    hash_seed: int | None = None
    # local attention (neighbour chunks: the LSH layers' unless set)
    local_chunk_length: int = 128
    local_n_chunks_before: int | None = None
    local_n_chunks_after: int | None = None
    causal: bool = True
    # positions
    max_seq_len: int = 16384
    pos_embedding: str = "axial"
    axial_pos_shape: tuple[int, ...] | None = None
    axial_pos_dims: tuple[int, ...] | None = None
    # feed-forward, regularisation
    ff_activation: str = "relu"
    dropout: float = 0.0
    attention_dropout: float = 0.0
    layer_norm_eps: float = 1e-5
    # memory discipline
    reversible: bool = True
    ff_chunk_size: int = 4096
    loss_chunk_size: int = 4096
    attn_head_chunk_size: int = 1
    init_std: float = 0.02
    # the token embedding's initial std (None: init_std). Sinusoidal positions have unit
    # amplitude, so at 0.02 a token's identity is ~3% of its input vector: ListOps's
    # classifier then never learned which digits its root holds (docs/lra.md, tenth run)
    embed_init_std: float | None = None
    # Hugging Face's Reformer function exactly (interop/hf.py; DESIGN.md 3.3): keys
    # x / sqrt(|x|^2 + E*1e-6), circular local windows, padding to the lcm of the chunk
    # lengths with pad_token_id, HF's rotation draw for a hash_seed and bucket count
    hf_compat: bool = False
    pad_token_id: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "_derived", set())
        # Lists from JSON become tuples so that the config stays hashable and comparable.
        for name in ("attn_layers", "axial_pos_shape", "axial_pos_dims"):
            value = getattr(self, name)
            if isinstance(value, list):
                object.__setattr__(self, name, tuple(value))
        if isinstance(self.attn_layers, str):
            object.__setattr__(self, "attn_layers", (self.attn_layers,))
        if isinstance(self.n_buckets, list):
            object.__setattr__(self, "n_buckets", tuple(self.n_buckets))
        for name in ("vocab_size", "d_model", "n_heads", "d_ff", "n_layers", "n_hashes",
                     "chunk_length", "local_chunk_length", "max_seq_len", "ff_chunk_size",
                     "loss_chunk_size", "attn_head_chunk_size"):
            check_positive_int(name, getattr(self, name))
        if self.d_head is None:
            if self.d_model % self.n_heads:
                fail("d_model", self.d_model, f"is not divisible by n_heads={self.n_heads}",
                      "pass d_head explicitly or choose n_heads that divides d_model")
            self._derive("d_head", self.d_model // self.n_heads)
        elif not is_int(self.d_head) or self.d_head < 1:
            fail("d_head", self.d_head, "must be a positive integer", "pass e.g. d_head=64")
        self._validate_choices()
        self._validate_numbers()
        self._validate_buckets()
        self._fill_axial()

    def _validate_choices(self) -> None:
        if not self.attn_layers:
            fail("attn_layers", self.attn_layers, "is empty", 'pass e.g. ("local", "lsh")')
        for kind in self.attn_layers:
            if kind not in ATTENTION_KINDS:
                fail("attn_layers", self.attn_layers, f"contains unknown kind {kind!r}",
                      f"use only {ATTENTION_KINDS}")
        if self.pos_embedding not in POS_EMBEDDINGS:
            fail("pos_embedding", self.pos_embedding, "is unknown", f"use one of {POS_EMBEDDINGS}")
        if self.pos_embedding == "sinusoidal" and self.d_model % 2:
            fail("d_model", self.d_model, "must be even for sinusoidal positions (a sine and a "
                 "cosine per frequency)", "use an even d_model or pos_embedding='learned'")
        if self.ff_activation not in ACTIVATIONS:
            fail("ff_activation", self.ff_activation, "is unknown", f"use one of {ACTIVATIONS}")
        for name in ("causal", "reversible", "dedup_rounds", "hf_compat"):
            if not isinstance(getattr(self, name), bool):
                fail(name, getattr(self, name), "must be True or False", f"pass {name}=True")
        for name in ("n_chunks_after", "local_n_chunks_after"):
            if self.causal and getattr(self, name):
                fail(name, getattr(self, name),
                      "must be 0 for a causal model (later chunks are all masked)",
                      f"pass {name}=0 or causal=False")
        if self.hf_compat and is_int(self.pad_token_id) and self.pad_token_id >= self.vocab_size:
            fail("pad_token_id", self.pad_token_id, f"is not below vocab_size={self.vocab_size} "
                 "(hf_compat pads inputs with it)", "pass a token id of the vocabulary")
        if self.hash_seed is not None and not is_int(self.hash_seed):
            fail("hash_seed", self.hash_seed, "must be an integer or None", "pass e.g. 0")

    def _validate_numbers(self) -> None:
        for name in ("dropout", "attention_dropout"):
            value = getattr(self, name)
            if not is_real(value) or not 0.0 <= value < 1.0:
                fail(name, value, "must lie in [0, 1)", f"pass e.g. {name}=0.1")
        for name, example in (("layer_norm_eps", 1e-5), ("init_std", 0.02)):
            value = getattr(self, name)
            if not is_real(value) or not 0.0 < value < math.inf:
                fail(name, value, "must be a finite number > 0", f"pass e.g. {name}={example}")
        if self.embed_init_std is not None and not (
                is_real(self.embed_init_std) and 0.0 < self.embed_init_std < math.inf):
            fail("embed_init_std", self.embed_init_std, "must be a finite number > 0 or None",
                 "pass e.g. embed_init_std=0.7, or None for init_std")
        for name in ("n_chunks_before", "n_chunks_after", "local_n_chunks_before",
                     "local_n_chunks_after", "pad_token_id"):
            value = getattr(self, name)
            if (value is not None or not name.startswith("local")) and (
                    not is_int(value) or value < 0):
                fail(name, value, "must be a non-negative integer", f"pass e.g. {name}=1")

    def _validate_buckets(self) -> None:
        nb = self.n_buckets
        if nb is None:
            return
        factors = nb if isinstance(nb, tuple) else (nb,)
        for f in factors:
            if not is_int(f) or f < 2 or f % 2:
                fail("n_buckets", nb, "must be even integers >= 2 (each factor is hashed by "
                      "argmax over [xR, -xR])", "pass e.g. n_buckets=64 or (32, 64), or None")

    def _fill_axial(self) -> None:
        if self.pos_embedding != "axial":
            return
        shape = self.axial_pos_shape
        if shape is None:
            side = math.isqrt(self.max_seq_len - 1) + 1  # ceil(sqrt(max_seq_len))
            shape = (side, -(-self.max_seq_len // side))
            self._derive("axial_pos_shape", shape)
        if any(not is_int(s) or s < 1 for s in shape):
            fail("axial_pos_shape", shape, "must hold positive integers", "pass e.g. (128, 128)")
        if math.prod(shape) < self.max_seq_len:
            fail("axial_pos_shape", shape, f"covers {math.prod(shape)} positions, fewer than "
                  f"max_seq_len={self.max_seq_len}", "make the product >= max_seq_len")
        dims = self.axial_pos_dims
        if dims is None:
            base, rest = divmod(self.d_model, len(shape))
            dims = tuple(base + (1 if i < rest else 0) for i in range(len(shape)))
            self._derive("axial_pos_dims", dims)
        if len(dims) != len(shape) or sum(dims) != self.d_model:
            fail("axial_pos_dims", dims, f"must have one entry per axis of axial_pos_shape="
                  f"{shape} and sum to d_model={self.d_model}", "e.g. (d_model//2, d_model//2)")

    def _derive(self, name: str, value: Any) -> None:
        """Fill a field the user left as None, remembering that it was derived."""
        object.__setattr__(self, name, value)
        self._derived.add(name)

    # ----------------------------------------------------------------- derived helpers
    def local_neighbours(self) -> tuple[int, int]:
        """(chunks before, chunks after) of a local layer's window."""
        before, after = self.local_n_chunks_before, self.local_n_chunks_after
        return (self.n_chunks_before if before is None else before,
                self.n_chunks_after if after is None else after)

    def layer_kind(self, index: int) -> str:
        """The attention kind of layer ``index`` (``attn_layers`` cycles)."""
        return self.attn_layers[index % len(self.attn_layers)]

    def replace(self, **changes: Any) -> ReformerConfig:
        """A copy with ``changes`` applied and validated, as if built with them afresh.

        Derived fields (``d_head``, axial shape and dims left as None) are derived again.
        """
        reset = {name: None for name in self._derived if name not in changes}
        return replace(self, **reset, **changes)

    # ------------------------------------------------------------------- serialisation
    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ReformerConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown config keys {unknown}; known keys are {sorted(known)}")
        return cls(**d)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> ReformerConfig:
        return cls.from_dict(json.loads(text))


def resolve_n_buckets(n_buckets: int | tuple[int, ...] | None, seq_len: int,
                      chunk_length: int) -> int | tuple[int, ...]:
    """The bucket count (or factors) used for a padded length ``seq_len``.

    ``None`` means automatic: NB = 2 * seq_len / chunk_length (at least 2), split into two even
    factors near sqrt(NB) when NB > AUTO_FACTORISE_ABOVE and such a split exists.
    """
    if n_buckets is not None:
        return n_buckets
    nb = max(2, 2 * (seq_len // chunk_length))
    if nb <= AUTO_FACTORISE_ABOVE:
        return nb
    for f1 in range(math.isqrt(nb), 1, -1):
        if nb % f1 == 0 and f1 % 2 == 0 and (nb // f1) % 2 == 0:
            return (f1, nb // f1)
    return nb
