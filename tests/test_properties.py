"""Properties over random configurations (hypothesis).

- Any valid tiny ReformerConfig -- LSH, local and full layers mixed, 1-3 hash rounds, causal
  or not, reversible or not, chunked or not -- on any length 1..300, with or without a
  padding mask, in float32 or float64: the logits and the loss are finite and correctly
  shaped, and so is every parameter's gradient.
- Any invalid value of a field: a ValueError whose message names the field.

Kept small (about 25 examples each, no deadline) so that the file runs in well under a
minute on a busy 2-core machine.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from reformer import ReformerConfig, ReformerLM

# No example database: nothing is written into the repository.
SETTINGS = settings(max_examples=25, deadline=None, database=None, print_blob=True,
                    suppress_health_check=[HealthCheck.too_slow])


@st.composite
def configs(draw) -> ReformerConfig:
    """A valid tiny config: d_model <= 32, 1-3 layers, every attention kind."""
    n_heads = draw(st.sampled_from([1, 2, 4]))
    causal = draw(st.booleans())
    return ReformerConfig(
        vocab_size=draw(st.integers(2, 40)),
        d_model=n_heads * draw(st.sampled_from([2, 4, 8])),
        n_heads=n_heads,
        d_ff=draw(st.integers(1, 48)),
        n_layers=draw(st.integers(1, 3)),
        attn_layers=tuple(draw(st.lists(st.sampled_from(["lsh", "local", "full"]), min_size=1,
                                         max_size=3))),
        n_hashes=draw(st.integers(1, 3)),
        n_buckets=draw(st.sampled_from([None, 2, 4, 8, (2, 4)])),
        chunk_length=draw(st.sampled_from([1, 2, 4, 8, 16, 64])),
        n_chunks_before=draw(st.integers(0, 2)),
        n_chunks_after=0 if causal else draw(st.integers(0, 1)),
        dedup_rounds=draw(st.booleans()),
        hash_seed=draw(st.sampled_from([None, 0, 7])),
        local_chunk_length=draw(st.sampled_from([1, 3, 8, 32])),
        causal=causal,
        max_seq_len=300,
        pos_embedding=draw(st.sampled_from(["axial", "learned", "sinusoidal", "none"])),
        ff_activation=draw(st.sampled_from(["relu", "gelu"])),
        dropout=draw(st.sampled_from([0.0, 0.1])),
        attention_dropout=draw(st.sampled_from([0.0, 0.1])),
        reversible=draw(st.booleans()),
        ff_chunk_size=draw(st.sampled_from([7, 4096])),
        loss_chunk_size=draw(st.sampled_from([5, 4096])),
        attn_head_chunk_size=draw(st.integers(1, 4)),
    )


@st.composite
def batches(draw, config: ReformerConfig):
    """(ids (B, L), attention mask (B, L) or None) for 1 <= L <= 300; a sequence may be all
    padding."""
    batch, length = draw(st.integers(1, 2)), draw(st.integers(1, 300))
    seed = draw(st.integers(0, 2**16))
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, config.vocab_size, (batch, length), generator=g)
    kind = draw(st.sampled_from(["none", "right padding", "left padding", "random"]))
    if kind == "none":
        return ids, None
    real = torch.randint(0, length + 1, (batch,), generator=g)  # 0: all padding
    positions = torch.arange(length)[None]  # (1, L)
    if kind == "right padding":
        return ids, positions < real[:, None]
    if kind == "left padding":
        return ids, positions >= length - real[:, None]
    return ids, torch.rand(batch, length, generator=g) < draw(st.sampled_from([0.3, 0.9]))


@SETTINGS
@given(data=st.data())
def test_outputs_and_gradients_are_finite_and_shaped(data):
    config = data.draw(configs(), label="config")
    ids, mask = data.draw(batches(config), label="batch")
    dtype = data.draw(st.sampled_from([torch.float32, torch.float64]), label="dtype")
    torch.manual_seed(0)
    model = ReformerLM(config).to(dtype).train()
    fused = data.draw(st.booleans(), label="fused loss")
    out = model(ids, attention_mask=mask, labels=ids, return_logits=not fused)
    B, L = ids.shape
    if not fused:
        assert out.logits.shape == (B, L, config.vocab_size) and out.logits.dtype == dtype
        assert torch.isfinite(out.logits).all()
    assert out.loss.shape == () and torch.isfinite(out.loss)
    out.loss.backward()
    for name, p in model.named_parameters():
        if p.grad is not None:
            assert p.grad.shape == p.shape, name
            assert torch.isfinite(p.grad).all(), name
    assert model.embed.weight.grad is not None


# ------------------------------------------------------------------------- invalid values
NOT_INTS = [0, -1, 1.5, True, "4", None]
INVALID = {
    "vocab_size": NOT_INTS, "d_model": NOT_INTS, "n_heads": NOT_INTS, "d_ff": NOT_INTS,
    "n_layers": NOT_INTS, "n_hashes": NOT_INTS, "chunk_length": NOT_INTS,
    "local_chunk_length": NOT_INTS, "max_seq_len": NOT_INTS, "ff_chunk_size": NOT_INTS,
    "loss_chunk_size": NOT_INTS, "attn_head_chunk_size": NOT_INTS,
    "d_head": [0, -2, 2.5, True, "8"],
    "attn_layers": [(), ("lsh", "global"), "sparse", (1,)],
    "n_buckets": [0, 3, -2, 1, (2, 3), (4, 0), 2.0, True],
    "n_chunks_before": [-1, 0.5, True, "1"],
    "n_chunks_after": [-1, 0.5, "1"],
    "local_n_chunks_before": [-1, 0.5, True, "1"],
    "local_n_chunks_after": [-1, 0.5, "1"],
    "hf_compat": [1, "yes"],
    "pad_token_id": [-1, 1.5, None, True],
    "hash_seed": [1.5, "0", True],
    "causal": [1, "yes", None],
    "reversible": [0, "no"],
    "dedup_rounds": [1, "yes"],
    "pos_embedding": ["rotary", None, ""],
    "axial_pos_shape": [(0, 8), (2, 2), (8, -8), (8.0, 8)],
    "axial_pos_dims": [(8,), (1, 2), (16, 16, 0)],
    "ff_activation": ["tanh", None],
    "dropout": [-0.1, 1.0, math.nan, math.inf, "0.1", None],
    "attention_dropout": [-0.5, 1.5, math.nan, "0"],
    "layer_norm_eps": [0.0, -1e-5, math.nan, math.inf, "1e-5", None],
    "init_std": [0.0, -0.02, math.nan, math.inf, None],
    "embed_init_std": [0.0, -0.7, math.nan, math.inf, "0.7", True],
}
BASE = dict(vocab_size=16, d_model=16, n_heads=2, d_ff=32, n_layers=2, max_seq_len=64)


@SETTINGS
@given(field_and_value=st.sampled_from(sorted(INVALID)).flatmap(
    lambda name: st.tuples(st.just(name), st.sampled_from(INVALID[name]))))
def test_invalid_values_name_their_field(field_and_value):
    name, value = field_and_value
    overrides = {name: value}
    if name in ("n_chunks_after", "local_n_chunks_after"):
        overrides["causal"] = False
    with pytest.raises(ValueError, match=name):
        ReformerConfig(**{**BASE, **overrides})


def test_every_field_has_invalid_values():
    assert set(INVALID) == set(ReformerConfig.__dataclass_fields__)
