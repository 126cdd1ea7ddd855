"""Parity with Hugging Face's Reformer (transformers' ReformerModelWithLMHead): an imported
model (``hf_compat`` on) computes HF's function, logits to 1e-9 and every parameter's gradient
to 1e-8 of its scale in float64, over local/LSH mixes, factorised and automatic bucket counts,
axial and learned positions, relu and gelu, lengths that HF pads to the chunk lengths' lcm,
more hash rounds at evaluation and wider look-arounds (docs/interop.md, "Parity").

Bidirectional models are checked through ReformerForMaskedLM's trunk and LM-shaped head
(the same weights), for the circular local windows. Skipped without transformers (the dev
extra installs it).
"""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

from reformer.attention.lsh import LSHSelfAttention  # noqa: E402
from reformer.generation import sample  # noqa: E402
from reformer.hashing import hf_rotations  # noqa: E402
from reformer.interop.hf import from_hf  # noqa: E402

BASE = dict(hidden_size=16, num_attention_heads=2, attention_head_size=8,
            attn_layers=["local", "lsh", "local", "lsh"], axial_pos_shape=[4, 8],
            axial_pos_embds_dim=[8, 8], feed_forward_size=32, vocab_size=32,
            max_position_embeddings=32, lsh_attn_chunk_length=4, local_attn_chunk_length=8,
            num_buckets=4, num_hashes=2, is_decoder=True, hash_seed=0, hidden_dropout_prob=0.0,
            lsh_attention_probs_dropout_prob=0.0, local_attention_probs_dropout_prob=0.0)


def hf_model(seed: int = 0, **changes):
    """A random float64 HF model whose weights are all far from their initial values."""
    config = transformers.ReformerConfig(**{**BASE, **changes})
    cls = (transformers.ReformerModelWithLMHead if config.is_decoder
           else transformers.ReformerForMaskedLM)
    torch.manual_seed(seed)
    model = cls(config).double()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.3)
        model.lm_head.decoder.bias.copy_(model.lm_head.bias)  # one bias, as loaded models have
    return model


def ids(batch: int, length: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, 32, (batch, length), generator=torch.Generator().manual_seed(seed))


def both(hf, length, *, train=False, mask=None, n_hashes=None, ours=None):
    """HF's and our logits (B, L, V) on the same tokens; with ``train``, also backward through
    a random weighting of the real positions' logits."""
    ours = ours or from_hf(hf)
    hf.train(train)
    ours.train(train)
    tokens = ids(2, length)
    extra = {} if n_hashes is None else {"num_hashes": n_hashes}
    theirs = hf(tokens, attention_mask=mask, **extra).logits
    mine = ours(tokens, attention_mask=mask, n_hashes=n_hashes).logits
    real = torch.ones(2, length, dtype=torch.bool) if mask is None else mask.bool()
    if train:
        w = torch.randn(theirs.shape, dtype=torch.float64,
                        generator=torch.Generator().manual_seed(3)) * real[..., None]
        (theirs * w).sum().backward()
        (mine * w).sum().backward()
    return theirs.detach()[real], mine.detach()[real], ours


CONFIGS = {
    "local+lsh": {},
    "factorised buckets": dict(num_buckets=[2, 2]),
    "automatic buckets": dict(num_buckets=None),
    "learned positions, gelu": dict(axial_pos_embds=False, hidden_act="gelu",
                                    attn_layers=["lsh", "local"]),
    "wider look-around, 3 rounds": dict(lsh_num_chunks_before=2, local_num_chunks_before=0,
                                        num_hashes=3),
    "window wider than the sequence": dict(lsh_num_chunks_before=3, num_hashes=1,
                                           lsh_attn_chunk_length=8, local_attn_chunk_length=16),
    "bidirectional": dict(is_decoder=False, lsh_num_chunks_after=1, local_num_chunks_after=2),
}


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("length", [32, 20, 3])  # HF's training length; padded; one chunk
def test_logits_equal_hf(name, length):
    theirs, mine, _ = both(hf_model(**CONFIGS[name]), length)
    assert (theirs - mine).abs().max() <= 1e-9


@pytest.mark.parametrize("name", list(CONFIGS))
def test_training_gradients_equal_hf(name):
    hf = hf_model(**CONFIGS[name])
    theirs, mine, ours = both(hf, 32, train=True)  # HF trains on prod(axial_pos_shape) tokens
    assert (theirs - mine).abs().max() <= 1e-9
    hf_params = dict(hf.named_parameters())
    ours_params = dict(ours.named_parameters())
    checked = 0
    for name_ours, name_hf in _sources(ours, hf).items():
        g, ref = ours_params[name_ours].grad, hf_params[name_hf].grad
        assert (g - ref.reshape(g.shape)).abs().max() <= 1e-8 * ref.abs().max(), name_ours
        checked += 1
    assert checked == len(ours_params)


def _sources(ours, hf) -> dict[str, str]:
    """Our parameter name -> the HF parameter holding the same values (random weights: each
    tensor's values are its own)."""
    hf_params = dict(hf.named_parameters())
    hf_params.pop("lm_head.bias")  # transformers 5 never reads it: lm_head.decoder.bias is used
    out = {}
    for name, p in ours.named_parameters():
        for hf_name, q in hf_params.items():
            if q.numel() == p.numel() and torch.equal(q.detach().reshape(p.shape), p.detach()):
                out[name] = hf_name
                break
    return out


def test_more_hash_rounds_at_evaluation_and_a_padding_mask():
    hf = hf_model()
    theirs, mine, ours = both(hf, 20, n_hashes=4)
    assert (theirs - mine).abs().max() <= 1e-9
    mask = torch.ones(2, 32, dtype=torch.bool)
    mask[1, 25:] = False
    theirs, mine, _ = both(hf, 32, mask=mask, ours=ours)
    assert (theirs - mine).abs().max() <= 1e-9


def test_the_cuda_plan_computes_hf_function_too():
    from reformer.plan import forced

    hf = hf_model()
    with forced("cuda"):
        theirs, mine, _ = both(hf, 20)
    assert (theirs - mine).abs().max() <= 1e-9


def test_without_hf_compat_causal_logits_differ_only_by_the_key_epsilon(monkeypatch):
    # Our own function, given HF's rotations and a length HF does not pad: the keys
    # x / |x| against HF's x / sqrt(|x|^2 + E * 1e-6) are all that differs
    hf = hf_model()
    ours = from_hf(hf)
    plain = type(ours)(ours.config.replace(hf_compat=False)).double()  # the same weights
    plain.load_state_dict(ours.state_dict())

    def hf_draw(self, length, n_hashes, device, dtype=torch.float32):
        cfg = self.config
        return hf_rotations(self.n_heads, self.d_head, n_hashes or cfg.n_hashes,
                            cfg.n_buckets, seed=cfg.hash_seed, device=device, dtype=dtype)

    monkeypatch.setattr(LSHSelfAttention, "sample_rotations", hf_draw)
    theirs, mine, _ = both(hf, 32, ours=plain)
    error = (theirs - mine).abs().max()
    assert 1e-12 < error <= 1e-6


def test_greedy_generation_equals_hf_generate():
    # HF's generate without its cache (HF's cached generation is not its own full forward:
    # its tokens differ from uncached ones on random models) against ours without the cache
    hf = hf_model()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if name.endswith("bias"):
                p.zero_()
            elif "layer_norm.weight" in name:
                p.fill_(1.0)
            else:
                p.normal_(0, 0.5, generator=torch.Generator().manual_seed(len(name)))
    ours = from_hf(hf).eval()
    hf.eval()
    for length in (5, 9, 12):
        prompt = ids(1, length, seed=length)
        want = hf.generate(prompt, max_new_tokens=20, do_sample=False, use_cache=False,
                           pad_token_id=0, eos_token_id=None)[0, length:].tolist()
        got = list(sample(ours, prompt[0], 20, top_k=1, use_cache=False))[-20:]
        assert got == want
    assert len(set(want)) > 2  # the model does not just repeat one token


@pytest.mark.parametrize("length", [32, 20])  # HF's training length; padded to the lcm
def test_masked_lm_imports_and_equals_hf_reformer_for_masked_lm(tmp_path, length):
    from reformer.heads import ReformerForMaskedLM
    from reformer.interop.hf import to_hf

    hf = hf_model(is_decoder=False, lsh_num_chunks_after=1, local_num_chunks_after=1).eval()
    ours = from_hf(hf)
    assert isinstance(ours, ReformerForMaskedLM)
    tokens = ids(2, length)
    theirs = hf(tokens).logits
    assert (ours(tokens).logits - theirs).abs().max() <= 1e-9
    labels = torch.full_like(tokens, -100)
    labels[:, ::3] = tokens[:, ::3]
    want = torch.nn.functional.cross_entropy(theirs.flatten(0, 1), labels.flatten())
    assert abs(ours(tokens, labels=labels).loss - want) <= 1e-9
    # and back: transformers' ReformerForMaskedLM loads it with nothing missing
    to_hf(ours, tmp_path / "mlm")
    back, info = transformers.ReformerForMaskedLM.from_pretrained(
        tmp_path / "mlm", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    back = back.double().eval()
    assert (back(tokens).logits - theirs).abs().max() <= 1e-6  # axial tables load as fp32


def test_importing_a_masked_lm_as_a_run_is_refused(tmp_path, capsys):
    from reformer.cli import main
    from reformer.interop.hf import to_hf

    to_hf(from_hf(hf_model(is_decoder=False, vocab_size=256)), tmp_path / "mlm")
    assert main(["import-hf", str(tmp_path / "mlm"), "--out", str(tmp_path / "run")]) == 2
    assert "masked language model" in capsys.readouterr().err
