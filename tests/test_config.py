"""ReformerConfig: frozen, derived defaults, JSON round-trip, and validation messages."""

from __future__ import annotations

import dataclasses
import json
import re

import pytest

from reformer.config import AUTO_FACTORISE_ABOVE, ReformerConfig, resolve_n_buckets


def test_config_is_frozen():
    config = ReformerConfig()
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.d_model = 8
    assert config.d_model == 256


def test_default_d_head_is_d_model_over_n_heads():
    assert ReformerConfig(d_model=48, n_heads=3).d_head == 16
    assert ReformerConfig(d_model=48, n_heads=3, d_head=7).d_head == 7  # explicit wins


def test_default_axial_shape_and_dims():
    config = ReformerConfig(d_model=256, max_seq_len=16384)
    assert config.axial_pos_shape == (128, 128)
    assert config.axial_pos_dims == (128, 128)
    # Not a square: ceil(sqrt(1000)) = 32 rows of 32 still cover 1000 positions.
    config = ReformerConfig(d_model=15, n_heads=3, max_seq_len=1000)
    assert config.axial_pos_shape == (32, 32)
    assert config.axial_pos_dims == (8, 7)  # the remainder goes to the first axes
    config = ReformerConfig(d_model=16, n_heads=2, max_seq_len=60, axial_pos_shape=(3, 4, 5))
    assert config.axial_pos_dims == (6, 5, 5)


def test_non_axial_config_leaves_axial_fields_empty():
    config = ReformerConfig(pos_embedding="learned")
    assert config.axial_pos_shape is None and config.axial_pos_dims is None


def test_lists_become_tuples_and_a_kind_string_becomes_a_tuple():
    config = ReformerConfig(attn_layers=["lsh", "full"], n_buckets=[4, 8],
                            axial_pos_shape=[128, 128], axial_pos_dims=[100, 156])
    assert config.attn_layers == ("lsh", "full")
    assert config.n_buckets == (4, 8)
    assert config.axial_pos_shape == (128, 128)
    assert config.axial_pos_dims == (100, 156)
    assert ReformerConfig(attn_layers="lsh").attn_layers == ("lsh",)
    hash(config)  # hashable, as frozen dataclasses of tuples are


def test_layer_kind_cycles_over_attn_layers():
    config = ReformerConfig(n_layers=5, attn_layers=("local", "lsh", "full"))
    assert [config.layer_kind(i) for i in range(5)] == ["local", "lsh", "full", "local", "lsh"]


@pytest.mark.parametrize("config", [
    ReformerConfig(),
    ReformerConfig(d_model=16, n_heads=2, n_buckets=(4, 8), hash_seed=3, max_seq_len=60,
                   axial_pos_shape=(3, 4, 5), attn_layers=("lsh", "local", "full"),
                   dropout=0.1, ff_activation="gelu", causal=False, n_chunks_after=1),
    ReformerConfig(pos_embedding="learned", n_buckets=8, d_head=5),
], ids=["default", "custom", "learned"])
def test_json_round_trip(config):
    text = config.to_json()
    json.loads(text)  # valid JSON
    again = ReformerConfig.from_json(text)
    assert again == config
    assert again.to_json() == text
    assert ReformerConfig.from_dict(config.to_dict()) == config


def test_replace_applies_and_validates():
    config = ReformerConfig()
    assert config.replace(n_layers=2).n_layers == 2
    assert config.n_layers == 6  # the original is untouched
    with pytest.raises(ValueError, match="n_buckets=3"):
        config.replace(n_buckets=3)


def test_replace_equals_constructing_with_the_changes():
    # Derived values (d_head, the axial shape and dims) that the user never set must follow the
    # change, as they would in a fresh config, rather than be kept as if set explicitly.
    changes = dict(d_model=128, max_seq_len=65536)
    assert ReformerConfig().replace(**changes) == ReformerConfig(**changes)


# (kwargs, the offending value as it must appear in the message)
INVALID = {
    "odd n_buckets": (dict(n_buckets=7), "n_buckets=7"),
    "odd bucket factor": (dict(n_buckets=(4, 3)), "n_buckets=(4, 3)"),
    "unknown attention kind": (dict(attn_layers=("lsh", "global")), "'global'"),
    "empty attn_layers": (dict(attn_layers=()), "attn_layers=()"),
    "d_model not divisible by n_heads": (dict(d_model=10, n_heads=3), "d_model=10"),
    "dropout 1.5": (dict(dropout=1.5), "dropout=1.5"),
    "negative attention_dropout": (dict(attention_dropout=-0.1), "attention_dropout=-0.1"),
    "causal with n_chunks_after=1": (dict(causal=True, n_chunks_after=1), "n_chunks_after=1"),
    "negative n_chunks_before": (dict(n_chunks_before=-1), "n_chunks_before=-1"),
    "axial shape too small": (dict(max_seq_len=100, axial_pos_shape=(8, 8)),
                              "axial_pos_shape=(8, 8)"),
    "axial shape non-positive": (dict(max_seq_len=16, axial_pos_shape=(0, 16)),
                                 "axial_pos_shape=(0, 16)"),
    "axial dims not summing to d_model": (dict(d_model=16, n_heads=2, max_seq_len=64,
                                               axial_pos_dims=(8, 4)), "axial_pos_dims=(8, 4)"),
    "axial dims wrong count": (dict(d_model=16, n_heads=2, max_seq_len=64,
                                    axial_pos_dims=(16,)), "axial_pos_dims=(16,)"),
    "n_layers=0": (dict(n_layers=0), "n_layers=0"),
    "bool vocab_size": (dict(vocab_size=True), "vocab_size=True"),
    "float chunk_length": (dict(chunk_length=64.0), "chunk_length=64.0"),
    "zero d_head": (dict(d_head=0), "d_head=0"),
    "unknown pos_embedding": (dict(pos_embedding="rotary"), "pos_embedding='rotary'"),
    "unknown activation": (dict(ff_activation="swish"), "ff_activation='swish'"),
    "non-int hash_seed": (dict(hash_seed="0"), "hash_seed='0'"),
}


@pytest.mark.parametrize("kwargs, shown", INVALID.values(), ids=INVALID.keys())
def test_invalid_values_raise_with_value_and_fix(kwargs, shown):
    with pytest.raises(ValueError) as info:
        ReformerConfig(**kwargs)
    message = str(info.value)
    assert shown in message
    # "<name>=<value> <rule>; <fix>": a fix follows the rule.
    rule, _, fix = message.partition("; ")
    assert rule and re.search(r"\b(pass|use|make|choose|e\.g\.)", fix), message


def test_from_dict_rejects_unknown_keys_and_names_them():
    d = ReformerConfig().to_dict()
    d["n_head"] = 8  # a typo of n_heads
    with pytest.raises(ValueError, match=r"unknown config keys \['n_head'\]") as info:
        ReformerConfig.from_dict(d)
    assert "n_heads" in str(info.value)  # the known keys are listed as the fix


def test_from_dict_validates_values():
    d = ReformerConfig().to_dict()
    d["n_buckets"] = 5
    with pytest.raises(ValueError, match="n_buckets=5"):
        ReformerConfig.from_dict(d)


def test_resolve_n_buckets():
    assert resolve_n_buckets(8, 1024, 64) == 8  # explicit values pass through
    assert resolve_n_buckets((4, 8), 1024, 64) == (4, 8)
    assert resolve_n_buckets(None, 1024, 64) == 32  # 2 * L / M
    assert resolve_n_buckets(None, 64, 64) == 2  # at least 2
    assert resolve_n_buckets(None, 16, 64) == 2
    nb = 2 * (2 ** 20 // 64)  # 1M tokens: factorised into two even factors
    assert nb > AUTO_FACTORISE_ABOVE
    f1, f2 = resolve_n_buckets(None, 2 ** 20, 64)
    assert f1 * f2 == nb and f1 % 2 == 0 and f2 % 2 == 0
    assert f1 == 128  # isqrt(32768) = 181, largest even divisor below it with an even cofactor


def test_local_neighbours_default_to_the_lsh_layers():
    assert ReformerConfig().local_neighbours() == (1, 0)
    assert ReformerConfig(local_n_chunks_before=3).local_neighbours() == (3, 0)
    bidirectional = ReformerConfig(causal=False, n_chunks_after=1, local_n_chunks_after=2)
    assert bidirectional.local_neighbours() == (1, 2)
    with pytest.raises(ValueError, match="local_n_chunks_after=1 must be 0 for a causal"):
        ReformerConfig(local_n_chunks_after=1)


def test_hf_compat_pads_with_a_token_of_the_vocabulary():
    with pytest.raises(ValueError, match="pad_token_id=16 is not below vocab_size=16"):
        ReformerConfig(vocab_size=16, hf_compat=True, pad_token_id=16)
    assert ReformerConfig(vocab_size=16, pad_token_id=16).pad_token_id == 16  # unused off
