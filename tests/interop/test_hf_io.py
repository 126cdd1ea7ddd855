"""Reading and writing Hugging Face Reformer checkpoints (reformer.interop.hf): settings and
weight names both ways, against a hand-written table of HF's layout and against transformers
itself; the refusals; the published enwik8 configuration. The command line is
tests/interop/test_hf_cli.py's.

Semantics (HF's logits and gradients) are tests/interop/test_hf_parity.py's.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from reformer import ReformerLM
from reformer.interop.hf import (
    config_from_hf,
    config_to_hf,
    from_hf,
    state_from_hf,
    state_to_hf,
    to_hf,
)

HF_TINY = dict(vocab_size=32, hidden_size=16, num_attention_heads=2, attention_head_size=8,
               feed_forward_size=32, attn_layers=["local", "lsh", "local", "lsh"],
               axial_pos_embds=True, axial_pos_shape=[4, 8], axial_pos_embds_dim=[8, 8],
               lsh_attn_chunk_length=8, local_attn_chunk_length=4, lsh_num_chunks_before=1,
               lsh_num_chunks_after=0, local_num_chunks_before=1, local_num_chunks_after=0,
               num_buckets=4, num_hashes=1, hash_seed=0, is_decoder=True,
               max_position_embeddings=32, hidden_act="relu", hidden_dropout_prob=0.0,
               lsh_attention_probs_dropout_prob=0.0, local_attention_probs_dropout_prob=0.0,
               layer_norm_eps=1e-12, initializer_range=0.02, pad_token_id=0,
               tie_word_embeddings=False)
LEARNED = {k: v for k, v in HF_TINY.items() if not k.startswith("axial")} | {
    "axial_pos_embds": False}
# google/reformer-enwik8's config.json (bookkeeping keys left out)
ENWIK8 = dict(architectures=["ReformerModelWithLMHead"], model_type="reformer",
              attention_head_size=128, attn_layers=["local", "local", "lsh", "local"] * 3,
              axial_norm_std=1.0, axial_pos_embds=True, axial_pos_shape=[128, 512],
              axial_pos_embds_dim=[256, 768], chunk_size_lm_head=0, chunk_size_feed_forward=0,
              feed_forward_size=4096, hash_seed=None, hidden_act="relu", hidden_dropout_prob=0.2,
              hidden_size=1024, initializer_range=0.02, is_decoder=True, layer_norm_eps=1e-12,
              local_attn_chunk_length=128, local_num_chunks_after=0, local_num_chunks_before=1,
              local_attention_probs_dropout_prob=0.2, lsh_attention_probs_dropout_prob=0.1,
              lsh_attn_chunk_length=256, lsh_num_chunks_after=0, lsh_num_chunks_before=1,
              max_position_embeddings=65536, num_attention_heads=8, num_buckets=512,
              num_hashes=4, num_hidden_layers=12, pad_token_id=0, tie_word_embeddings=False,
              use_cache=True, vocab_size=258)


def random_hf_state(hf: dict, seed: int = 0) -> dict[str, torch.Tensor]:
    """A float64 ReformerModelWithLMHead state dict for the config dict ``hf``, written from
    HF's layout by hand (checked against transformers in test_hand_written_layout_is_hfs)."""
    g = torch.Generator().manual_seed(seed)
    D, V, F = hf["hidden_size"], hf["vocab_size"], hf["feed_forward_size"]
    HE = hf["num_attention_heads"] * hf["attention_head_size"]

    def r(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64)

    emb = "reformer.embeddings."
    s = {emb + "word_embeddings.weight": r(V, D), "reformer.encoder.layer_norm.weight": r(2 * D),
         "reformer.encoder.layer_norm.bias": r(2 * D), "lm_head.decoder.weight": r(V, 2 * D),
         "lm_head.decoder.bias": r(V)}
    s["lm_head.bias"] = s["lm_head.decoder.bias"].clone()
    if hf["axial_pos_embds"]:
        (h, w), (d0, d1) = hf["axial_pos_shape"], hf["axial_pos_embds_dim"]
        s[emb + "position_embeddings.weights.0"] = r(h, 1, d0)
        s[emb + "position_embeddings.weights.1"] = r(1, w, d1)
    else:
        s[emb + "position_embeddings.embedding.weight"] = r(hf["max_position_embeddings"], D)
    for i, kind in enumerate(hf["attn_layers"]):
        p = f"reformer.encoder.layers.{i}."
        for name in (["query_key"] if kind == "lsh" else ["query", "key"]) + ["value"]:
            s[f"{p}attention.self_attention.{name}.weight"] = r(HE, D)
        s[p + "attention.output.dense.weight"] = r(D, HE)
        for part in ("attention", "feed_forward"):
            s[f"{p}{part}.layer_norm.weight"], s[f"{p}{part}.layer_norm.bias"] = r(D), r(D)
        s[p + "feed_forward.dense.dense.weight"], s[p + "feed_forward.dense.dense.bias"] = (
            r(F, D), r(F))
        s[p + "feed_forward.output.dense.weight"], s[p + "feed_forward.output.dense.bias"] = (
            r(D, F), r(D))
    return s


def write_hf_dir(path: Path, hf: dict, state: dict[str, torch.Tensor], bin: bool = False) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(hf))
    if bin:
        torch.save(state, path / "pytorch_model.bin")
    else:
        save_file(state, path / "model.safetensors", metadata={"format": "pt"})
    return path


def assert_states_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k


def tiny_ours(seed: int = 0, **changes) -> ReformerLM:
    """One of our tiny float64 models with an HF-expressible config, weights far from init."""
    torch.manual_seed(seed)
    model = ReformerLM(config_from_hf({**HF_TINY, **changes})).double()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.3)
    return model.eval()


# ------------------------------------------------------------------------------ settings
@pytest.mark.parametrize("hf", [HF_TINY, {**HF_TINY, "num_buckets": [2, 2]},
                                {**HF_TINY, "num_buckets": None, "hidden_act": "gelu"}, LEARNED])
def test_config_round_trip(hf):
    assert json.loads(json.dumps(config_to_hf(config_from_hf(hf)))).items() >= hf.items()


def test_config_fields_and_hf_defaults():
    cfg = config_from_hf({**HF_TINY, "num_buckets": [2, 2], "transformers_version": "5.25.0",
                          "_name_or_path": "x", "chunk_size_lm_head": 64, "eos_token_id": 2})
    assert (cfg.n_layers, cfg.attn_layers, cfg.d_model, cfg.n_heads, cfg.d_head) == (
        4, ("local", "lsh", "local", "lsh"), 16, 2, 8)
    assert (cfg.chunk_length, cfg.local_chunk_length, cfg.n_buckets) == (8, 4, (2, 2))
    assert cfg.hf_compat and cfg.causal and cfg.axial_pos_shape == (4, 8)
    with pytest.warns(UserWarning, match="attention_dropout"):  # HF's defaults: 0.05 and 0.0
        default = config_from_hf({"model_type": "reformer", "pad_token_id": None})
    assert (default.d_model, default.n_heads, default.d_head, default.n_layers) == (256, 12, 64, 6)
    assert (default.max_seq_len, default.axial_pos_shape, default.axial_pos_dims) == (
        4096, (64, 64), (64, 192))
    assert (default.dropout, default.layer_norm_eps, default.pad_token_id) == (0.05, 1e-12, 0)
    assert not default.causal and default.attn_layers == ("local", "lsh") * 3


@pytest.mark.parametrize("changes, name", [
    ({"hidden_act": "gelu_new"}, "hidden_act"), ({"hidden_act": "swish"}, "hidden_act"),
    ({"tie_word_embeddings": True}, "tie_word_embeddings"),
    ({"attn_layers": ["local", "full"]}, "attn_layers"), ({"num_buckets": 5}, "num_buckets"),
    ({"num_buckets": [2, 3]}, "num_buckets"), ({"num_chunks_before": 1}, "num_chunks_before"),
    ({"model_type": "bert"}, "model_type"), ({"lsh_attn_chunk_length": None},
                                             "lsh_attn_chunk_length"),
    ({"axial_pos_embds_dim": [8, 4]}, "axial_pos_dims"),
])
def test_config_from_hf_refusals_name_the_setting(changes, name):
    with pytest.raises(ValueError, match=name) as err:
        config_from_hf({**HF_TINY, **changes})
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("changes, name", [
    ({"attn_layers": ("local", "full")}, "attn_layers"), ({"dedup_rounds": True}, "dedup_rounds"),
    ({"pos_embedding": "none"}, "pos_embedding"),
    ({"pos_embedding": "sinusoidal"}, "pos_embedding"),
    ({"hf_compat": False}, "hf_compat"),
    ({"causal": False}, "causal"), ({"axial_pos_shape": (2, 2, 8), "axial_pos_dims": None},
                                    "axial_pos_shape"),
])
def test_config_to_hf_refusals_name_the_setting(changes, name):
    with pytest.raises(ValueError, match=name):
        config_to_hf(config_from_hf(HF_TINY).replace(**changes))


def test_differing_attention_dropouts_warn_and_take_lsh_rate():
    with pytest.warns(UserWarning, match="local_attention_probs_dropout_prob=0.2"):
        cfg = config_from_hf({**HF_TINY, "local_attention_probs_dropout_prob": 0.2,
                              "lsh_attention_probs_dropout_prob": 0.1})
    assert cfg.attention_dropout == 0.1


# ------------------------------------------------------------------------------- weights
@pytest.mark.parametrize("hf", [HF_TINY, LEARNED])
def test_state_mapping_is_a_bijection_onto_our_model(hf):
    cfg, s = config_from_hf(hf), random_hf_state(hf)
    ours = state_from_hf(s, cfg)
    reference = ReformerLM(cfg).state_dict()
    assert {k: v.shape for k, v in ours.items()} == {k: v.shape for k, v in reference.items()}
    assert_states_equal(state_to_hf(ours, cfg), s)
    layer1 = "reformer.encoder.layers.1.attention.self_attention."
    assert torch.equal(ours["stack.blocks.1.f.attn.w_qk.weight"], s[layer1 + "query_key.weight"])
    assert torch.equal(ours["stack.blocks.0.f.attn.w_k.weight"],
                       s[layer1.replace("1", "0") + "key.weight"])
    assert torch.equal(ours["head.weight"], s["lm_head.decoder.weight"])
    if hf["axial_pos_embds"]:
        w0 = s["reformer.embeddings.position_embeddings.weights.0"]
        assert torch.equal(ours["pos.weights.0"], w0[:, 0, :])


def test_lm_head_bias_under_either_name():
    cfg, s = config_from_hf(HF_TINY), random_hf_state(HF_TINY)
    decoder = s.pop("lm_head.decoder.bias")
    assert torch.equal(state_from_hf(s, cfg)["head.bias"], decoder)  # lm_head.bias alone
    s["lm_head.decoder.bias"], s["lm_head.bias"] = decoder, torch.zeros_like(decoder)
    assert torch.equal(state_from_hf(s, cfg)["head.bias"], decoder)  # the one HF 5 reads
    del s["lm_head.bias"]
    assert torch.equal(state_from_hf(s, cfg)["head.bias"], decoder)


def test_old_checkpoints_mask_constants_are_dropped():
    cfg, s = config_from_hf(HF_TINY), random_hf_state(HF_TINY)
    old = {f"reformer.encoder.layers.{i}.attention.self_attention.{name}": torch.tensor(-1e9)
           for i in range(4) for name in ("mask_value_float16", "mask_value_float32")}
    old["reformer.encoder.layers.1.attention.self_attention.self_mask_value_float32"] = (
        torch.tensor(-1e5))
    assert_states_equal(state_from_hf({**s, **old}, cfg), state_from_hf(s, cfg))
    with pytest.raises(ValueError, match="unknown Hugging Face weights mask_value_float32"):
        state_from_hf({**s, "mask_value_float32": torch.tensor(-1e9)}, cfg)


def test_unknown_missing_or_misshapen_weights_are_refused():
    cfg, s = config_from_hf(HF_TINY), random_hf_state(HF_TINY)
    with pytest.raises(ValueError, match="unknown Hugging Face weights qa_outputs.weight"):
        state_from_hf({**s, "qa_outputs.weight": torch.zeros(2, 32)}, cfg)
    key = "reformer.encoder.layers.3.attention.self_attention.query_key.weight"
    with pytest.raises(ValueError, match="lack " + key):
        state_from_hf({k: v for k, v in s.items() if k != key}, cfg)
    w0 = "reformer.embeddings.position_embeddings.weights.0"
    with pytest.raises(ValueError, match="shape"):
        state_from_hf({**s, w0: s[w0].reshape(1, 4, 8)}, cfg)
    with pytest.raises(ValueError, match="unknown Reformer weights extra"):
        state_to_hf({**state_from_hf(s, cfg), "extra": torch.zeros(1)}, cfg)


@pytest.mark.parametrize("bin", [False, True])
def test_directory_reads_without_transformers(tmp_path, bin):
    s = random_hf_state(HF_TINY)
    model = from_hf(write_hf_dir(tmp_path / "hf", HF_TINY, s, bin=bin))
    assert not model.training and model.config.hf_compat
    assert_states_equal(model.state_dict(), state_from_hf(s, model.config))
    assert from_hf(tmp_path / "hf", dtype=torch.float32).embed.weight.dtype == torch.float32


def test_bad_directories_are_refused(tmp_path):
    with pytest.raises(ValueError, match="no config.json"):
        from_hf(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(HF_TINY))
    with pytest.raises(ValueError, match="no model.safetensors or pytorch_model.bin"):
        from_hf(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(ValueError, match="not a readable weights file"):
        from_hf(tmp_path)
    with pytest.raises(ValueError, match="cannot read an HF Reformer from a int"):
        from_hf(3)


@pytest.mark.parametrize("positions", [{}, {"axial_pos_embds": False}], ids=["axial", "learned"])
def test_export_then_import_reproduces_our_logits(tmp_path, positions):
    ours = tiny_ours(**positions)
    back = from_hf(to_hf(ours, tmp_path / "hf"))
    assert back.config == ours.config
    assert_states_equal(back.state_dict(), ours.state_dict())
    tokens = torch.randint(0, 32, (2, 32), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(back(tokens).logits, ours(tokens).logits)


def test_enwik8_configuration_imports_and_runs():
    with pytest.warns(UserWarning, match="attention_dropout"):  # 0.1 for LSH, 0.2 for local
        cfg = config_from_hf(ENWIK8)
    assert (cfg.n_layers, cfg.d_model, cfg.n_heads, cfg.d_head, cfg.d_ff) == (12, 1024, 8, 128,
                                                                              4096)
    assert cfg.attn_layers.count("lsh") == 3 and cfg.n_buckets == 512 and cfg.n_hashes == 4
    torch.manual_seed(0)
    model = ReformerLM(cfg).eval()
    assert set(state_to_hf(model.state_dict(), cfg)) >= {
        "reformer.embeddings.position_embeddings.weights.1",
        "reformer.encoder.layers.10.attention.self_attention.query_key.weight"}
    with torch.no_grad():
        logits = model(torch.randint(0, 258, (1, 512))).logits
    assert logits.shape == (1, 512, 258) and logits.isfinite().all()


# --------------------------------------------------------------------------- transformers
def hf_model(tmp_path: Path, **changes):
    """A random float64 ReformerModelWithLMHead, all its weights far from their init,
    saved with save_pretrained (safetensors) to tmp_path / "hf"."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    model = transformers.ReformerModelWithLMHead(
        transformers.ReformerConfig(**{**HF_TINY, **changes})).double().eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.3)
        model.lm_head.bias.copy_(model.lm_head.decoder.bias)  # one bias, as in loaded models
    model.save_pretrained(tmp_path / "hf")
    return model


@pytest.mark.parametrize("changes", [{}, {"num_buckets": [2, 2]}, LEARNED])
def test_hand_written_layout_is_hfs(tmp_path, changes):
    hf = hf_model(tmp_path, **changes)
    layout = random_hf_state({**HF_TINY, **changes})
    assert {k: v.shape for k, v in hf.state_dict().items()} == {
        k: v.shape for k, v in layout.items()}


@pytest.mark.parametrize("changes", [{}, {"num_buckets": [2, 2]}])
def test_hf_directory_bin_and_live_model_import_the_same_weights(tmp_path, changes):
    hf = hf_model(tmp_path, **changes)
    from_dir, from_live = from_hf(tmp_path / "hf"), from_hf(hf)
    assert_states_equal(from_dir.state_dict(), from_live.state_dict())
    assert_states_equal(state_to_hf(from_dir.state_dict(), from_dir.config), hf.state_dict())
    assert from_dir.config == from_live.config
    # transformers 5 writes safetensors even with safe_serialization=False: write the .bin
    (tmp_path / "hf" / "model.safetensors").unlink()
    torch.save(hf.state_dict(), tmp_path / "hf" / "pytorch_model.bin")
    assert_states_equal(from_hf(tmp_path / "hf").state_dict(), from_dir.state_dict())


@pytest.mark.parametrize("changes", [{}, LEARNED], ids=["axial", "learned"])
def test_exported_directory_loads_in_transformers_exactly(tmp_path, changes):
    transformers = pytest.importorskip("transformers")
    hf = hf_model(tmp_path, **changes)
    to_hf(from_hf(tmp_path / "hf"), tmp_path / "back")
    loaded, info = transformers.ReformerModelWithLMHead.from_pretrained(
        tmp_path / "back", output_loading_info=True)
    assert not (info["missing_keys"] or info["unexpected_keys"] or info["mismatched_keys"])
    original, back = hf.state_dict(), loaded.state_dict()
    assert original.keys() == back.keys()
    for k, v in back.items():  # HF's axial tables load as float32 whatever the dtype (its own
        assert torch.equal(v, original[k].to(v.dtype)), k  # save/load does the same)
        assert v.dtype == torch.float64 or "position_embeddings.weights" in k
    assert transformers.ReformerConfig(**config_to_hf(config_from_hf(HF_TINY))).num_buckets == 4
