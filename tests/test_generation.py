"""Incremental decoding: cached steps against full forward passes (DESIGN.md 1.7)."""

import pytest
import torch

from reformer import ReformerConfig, ReformerLM
from reformer.attention import ATTENTION_MODULES
from reformer.generation import filter_logits, sample


def tiny_config(kinds, n_layers, **overrides):
    base = dict(vocab_size=17, d_model=16, n_heads=2, d_ff=32, n_layers=n_layers,
                attn_layers=kinds, n_hashes=3, n_buckets=4, chunk_length=4,
                local_chunk_length=4, max_seq_len=64, hash_seed=1)
    base.update(overrides)
    return ReformerConfig(**base)


@pytest.mark.parametrize("kind", ["lsh", "local", "full"])
@pytest.mark.parametrize("n_hashes,n_buckets", [(1, 4), (3, 4), (2, (2, 4))])
def test_cached_step_equals_the_layers_full_forward(kind, n_hashes, n_buckets):
    cfg = tiny_config((kind,), 1, n_hashes=n_hashes, n_buckets=n_buckets, n_chunks_before=2)
    torch.manual_seed(0)
    layer = ATTENTION_MODULES[kind](cfg).double().eval()
    x = torch.randn(2, 27, 16, dtype=torch.float64)
    cache = layer.new_cache(2, 32, x.device, x.dtype)
    layer.fill_cache(x[:, :5], cache)
    for t in range(5, 27):
        step = layer.step(x[:, t:t + 1], cache)[:, 0]
        full = layer(x[:, :t + 1])[:, -1]
        torch.testing.assert_close(step, full, rtol=0, atol=1e-10)


@pytest.mark.parametrize("kinds,n_layers", [(("lsh",), 1), (("local", "full"), 3)])
def test_cached_logits_equal_full_forward(kinds, n_layers):
    torch.manual_seed(0)
    model = ReformerLM(tiny_config(kinds, n_layers)).double().eval()
    ids = torch.randint(0, 17, (2, 30))
    caches = model.new_cache(2, 40)
    torch.testing.assert_close(model.prefill(ids[:, :6], caches), model(ids[:, :6]).logits[:, -1])
    for t in range(6, 30):
        step = model.step(ids[:, t], caches)
        torch.testing.assert_close(step, model(ids[:, :t + 1]).logits[:, -1], rtol=0,
                                   atol=1e-10)


def test_decoding_from_an_empty_cache_equals_full_forward():
    torch.manual_seed(0)
    model = ReformerLM(tiny_config(("lsh",), 1)).double().eval()
    ids = torch.randint(0, 17, (1, 12))
    caches = model.new_cache(1, 16)
    for t in range(12):
        step = model.step(ids[:, t], caches)
        torch.testing.assert_close(step, model(ids[:, :t + 1]).logits[:, -1], rtol=0,
                                   atol=1e-10)


def test_one_layer_lsh_model_generates_the_same_tokens_with_and_without_cache():
    torch.manual_seed(0)
    model = ReformerLM(tiny_config(("lsh",), 1))
    prompt = torch.randint(0, 17, (7,))
    runs = [list(sample(model, prompt, 20, generator=torch.Generator().manual_seed(3),
                        use_cache=use_cache)) for use_cache in (True, False)]
    assert runs[0] == runs[1]


def test_generation_restarts_the_cache_when_it_is_full():
    torch.manual_seed(0)
    model = ReformerLM(tiny_config(("local", "full"), 2, max_seq_len=16))
    out = list(sample(model, torch.randint(0, 17, (10,)), 30,
                      generator=torch.Generator().manual_seed(0)))
    assert len(out) == 30 and all(0 <= t < 17 for t in out)


def test_cache_rejects_bidirectional_and_dedup_models():
    for overrides in ({"causal": False}, {"dedup_rounds": True}):
        model = ReformerLM(tiny_config(("lsh",), 1, **overrides))
        assert not model.supports_cache()
        with pytest.raises(ValueError, match="causal|dedup_rounds"):
            model.new_cache(1, 8)


def test_filter_logits_top_k_and_top_p():
    logits = torch.tensor([0.0, 1.0, 2.0, 3.0])
    p = filter_logits(logits, top_k=2)
    assert (p[:2] == 0).all() and p.sum().item() == pytest.approx(1.0)
    p = filter_logits(logits, top_p=0.5)  # the top token alone has mass 0.64
    assert p.tolist() == [0.0, 0.0, 0.0, 1.0]
    with pytest.raises(ValueError, match="temperature"):
        filter_logits(logits, temperature=0)
