"""ReformerLM: chunked paths against unchunked ones, causality, hashing controls, input checks.

All models are tiny float64 ones from conftest's ``make_model`` (D=16, 3 layers cycling LSH,
local and full attention, chunk lengths 4) unless a test says otherwise.
"""

from __future__ import annotations

import pytest
import torch

from reformer import ReformerOutput

F64 = torch.float64


def forward_backward(model, tokens, seed: int = 0, **kwargs):
    """Logits (or None), loss and every parameter's gradient of one seeded forward."""
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    out = model(tokens, **kwargs)
    loss = out.loss if out.logits is None else out.loss + out.logits.square().mean()
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    logits = None if out.logits is None else out.logits.detach()
    return logits, out.loss.detach(), grads


def loss_atol(loss: torch.Tensor) -> float:
    """Tolerance for a loss: float64 rounding when the loss is float64 (see the dtype test)."""
    return 1e-10 if loss.dtype == F64 else 1e-6


def assert_same(a, b, atol=1e-10):
    for x, y in zip(a[:2], b[:2], strict=True):
        if x is not None or y is not None:
            torch.testing.assert_close(x, y, rtol=0, atol=atol)
    assert a[2].keys() == b[2].keys()
    for name in a[2]:
        torch.testing.assert_close(a[2][name], b[2][name], rtol=0, atol=atol, msg=name)


def twin(make_model, model, **overrides):
    """A model with ``model``'s weights and a config changed by ``overrides``."""
    other = make_model(**{**_overrides_of(model), **overrides})
    other.load_state_dict(model.state_dict())
    return other


def _overrides_of(model):
    return {k: v for k, v in model.config.to_dict().items()
            if k not in ("d_head", "axial_pos_shape", "axial_pos_dims")}


# ---------------------------------------------------------------------- chunking equivalences


@pytest.mark.parametrize("reversible", [True, False])
def test_chunked_feed_forward_equals_unchunked(make_model, ids, reversible):
    big = make_model(ff_chunk_size=4096, reversible=reversible)
    small = twin(make_model, big, ff_chunk_size=3)  # 2*21 = 42 rows: 14 blocks
    tokens = ids(2, 21)
    assert_same(forward_backward(small, tokens, labels=tokens),
                forward_backward(big, tokens, labels=tokens))


def labels_with_ignored(tokens):
    labels = tokens.clone()
    labels[0, 1:10] = -100  # rows 0..8 of the loss: whole chunks of 4 are ignored
    labels[1, 5] = -100
    return labels


@pytest.mark.parametrize("loss_chunk_size", [1, 4, 7])
def test_chunked_loss_equals_unchunked_loss_and_gradients(make_model, ids, loss_chunk_size):
    model = make_model(loss_chunk_size=loss_chunk_size)
    tokens = ids(2, 16)
    labels = labels_with_ignored(tokens)
    full = forward_backward(model, tokens, labels=labels, return_logits=True)
    chunked = forward_backward(model, tokens, labels=labels, return_logits=False)
    atol = loss_atol(chunked[1])
    torch.testing.assert_close(chunked[1], full[1].to(chunked[1].dtype), rtol=0, atol=atol)
    # Gradients of the loss alone: rerun the logits path without the logits term.
    model.zero_grad(set_to_none=True)
    torch.manual_seed(0)
    model(tokens, labels=labels).loss.backward()
    for name, p in model.named_parameters():
        torch.testing.assert_close(chunked[2][name], p.grad, rtol=0, atol=atol, msg=name)


def test_chunked_loss_returns_no_logits(make_model, ids):
    tokens = ids(1, 8)
    out = make_model()(tokens, labels=tokens, return_logits=False)
    assert isinstance(out, ReformerOutput) and out.logits is None and out.loss.dim() == 0
    # Without labels there is no loss to chunk: logits come back.
    assert make_model()(tokens, return_logits=False).logits.shape == (1, 8, 32)


@pytest.mark.parametrize("return_logits", [True, False])
def test_loss_is_shifted_cross_entropy_ignoring_minus_100(make_model, ids, return_logits):
    model = make_model().eval()
    tokens = ids(2, 16, seed=1)
    labels = labels_with_ignored(tokens)
    logits = model(tokens).logits
    log_probs = logits[:, :-1].log_softmax(-1)  # position t predicts labels[t + 1]
    targets = labels[:, 1:]
    keep = targets != -100
    picked = log_probs.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    expected = -(picked[keep]).sum() / keep.sum()
    loss = model(tokens, labels=labels, return_logits=return_logits).loss
    torch.testing.assert_close(loss, expected.to(loss.dtype), rtol=0, atol=loss_atol(loss))
    # The ignored positions' labels, and labels[:, 0], never matter.
    other = labels.clone()
    other[:, 0] = 3
    assert torch.equal(model(tokens, labels=other, return_logits=return_logits).loss, loss)


@pytest.mark.parametrize("return_logits", [True, False])
def test_float64_model_computes_its_loss_in_float64(make_model, ids, return_logits):
    # The loss is upcast for bf16/fp16 models; a float64 model must not be cast down to float32.
    tokens = ids(2, 8)
    assert make_model()(tokens, labels=tokens, return_logits=return_logits).loss.dtype == F64


@pytest.mark.parametrize("return_logits", [True, False])
def test_loss_of_a_batch_with_every_label_ignored_is_zero(make_model, ids, return_logits):
    # Both loss paths must agree on an all-padding batch, and stay finite for training.
    model = make_model()
    tokens = ids(2, 8)
    labels = torch.full_like(tokens, -100)
    out = model(tokens, labels=labels, return_logits=return_logits)
    assert out.loss.item() == 0.0
    out.loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


@pytest.mark.parametrize("slice_size", [1, 3])
def test_head_sliced_attention_equals_all_heads_at_once(make_model, ids, slice_size):
    whole = make_model(n_heads=4, attn_head_chunk_size=4)
    sliced = twin(make_model, whole, attn_head_chunk_size=slice_size)
    assert len(sliced.stack.blocks[0].f.attn.head_slices()) > 1
    tokens = ids(2, 24)
    assert_same(forward_backward(sliced, tokens, labels=tokens),
                forward_backward(whole, tokens, labels=tokens))


# --------------------------------------------------------------------------------- causality

LOCAL_FULL = [("local",), ("full",), ("local", "full")]


@pytest.mark.parametrize("attn_layers", LOCAL_FULL, ids="+".join)
def test_changing_later_tokens_leaves_earlier_logits_unchanged(make_model, ids, attn_layers):
    model = make_model(attn_layers=attn_layers).eval()
    tokens = ids(2, 24)
    logits = model(tokens).logits
    for t in (1, 6, 13):
        changed = tokens.clone()
        changed[:, t:] = (changed[:, t:] + 1 + torch.arange(24 - t)) % 32
        new = model(changed).logits
        torch.testing.assert_close(new[:, :t], logits[:, :t], rtol=0, atol=1e-12)
        assert not torch.allclose(new[:, t:], logits[:, t:])


@pytest.mark.parametrize("attn_layers", LOCAL_FULL, ids="+".join)
def test_prefix_logits_equal_logits_of_the_longer_input(make_model, ids, attn_layers):
    # 13 and 21 are not multiples of the chunk length 4: both are padded internally.
    model = make_model(attn_layers=attn_layers).eval()
    tokens = ids(2, 21)
    torch.testing.assert_close(model(tokens[:, :13]).logits, model(tokens).logits[:, :13],
                               rtol=0, atol=1e-12)


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidirectional"])
def test_internal_padding_equals_explicit_padding_with_a_mask(make_model, ids, causal):
    # L = 21 is padded to 24 inside every layer; padding it ourselves and masking the padding
    # must give the same logits at the 21 real positions, for LSH, local and full layers.
    model = make_model(causal=causal, n_chunks_after=0 if causal else 1).eval()
    tokens = ids(2, 24, seed=3)
    mask = torch.ones(2, 24, dtype=torch.bool)
    mask[:, 21:] = False
    padded = model(tokens, attention_mask=mask).logits[:, :21]
    internal = model(tokens[:, :21]).logits
    assert torch.isfinite(internal).all()
    torch.testing.assert_close(internal, padded, rtol=0, atol=1e-12)


def test_masked_tokens_do_not_affect_real_positions(make_model, ids):
    # Bidirectional, so that the masked positions would be visible to every query.
    model = make_model(causal=False, n_chunks_after=1).eval()
    tokens = ids(2, 24, seed=4)
    mask = torch.ones(2, 24, dtype=torch.bool)
    mask[0, 3] = mask[0, 17] = mask[1, 20:] = False
    logits = model(tokens, attention_mask=mask).logits
    changed = torch.where(mask, tokens, (tokens + 7) % 32)
    new = model(changed, attention_mask=mask).logits
    torch.testing.assert_close(new[mask], logits[mask], rtol=0, atol=1e-12)
    unmasked = model(changed).logits
    assert not torch.allclose(unmasked[mask], logits[mask])


# ------------------------------------------------------------------------- hashing controls


def spy_on_prepare(attn, monkeypatch):
    states = []
    prepare = attn.prepare

    def recording(x, n_hashes=None):
        states.append(prepare(x, n_hashes))
        return states[-1]

    monkeypatch.setattr(attn, "prepare", recording)
    return states


def test_n_hashes_at_call_time_sets_the_number_of_rounds(make_model, ids, monkeypatch):
    model = make_model(attn_layers=("lsh",), n_layers=2).eval()
    states = spy_on_prepare(model.stack.blocks[0].f.attn, monkeypatch)
    tokens = ids(2, 24)
    logits = {}
    for n_hashes in (None, 1, 4):
        logits[n_hashes] = model(tokens, n_hashes=n_hashes).logits
        rounds = n_hashes or model.config.n_hashes
        state = states[-1]
        assert state.n_hashes == rounds
        assert state.rotations.shape[2] == rounds
        assert all(b.shape[2] == rounds for b in state.buckets.values())
    assert not torch.allclose(logits[1], logits[4])
    assert torch.equal(logits[None], model(tokens, n_hashes=2).logits)


def test_n_hashes_does_not_change_a_model_without_lsh(make_model, ids):
    model = make_model(attn_layers=("local", "full")).eval()
    tokens = ids(2, 24)
    assert torch.equal(model(tokens, n_hashes=1).logits, model(tokens, n_hashes=4).logits)


def test_hash_seed_makes_training_forwards_identical(make_model, ids):
    model = make_model(attn_layers=("lsh",), hash_seed=7)  # train mode, dropout 0
    tokens = ids(2, 24)
    torch.manual_seed(0)
    a = model(tokens).logits
    torch.manual_seed(1)  # the global RNG does not matter
    assert torch.equal(model(tokens).logits, a)


def test_without_hash_seed_each_forward_hashes_afresh(make_model, ids):
    model = make_model(attn_layers=("lsh",), hash_seed=None)
    tokens = ids(2, 24)
    torch.manual_seed(0)
    a = model(tokens).logits
    b = model(tokens).logits
    assert not torch.allclose(a, b)
    torch.manual_seed(0)  # ... from the global RNG
    assert torch.equal(model(tokens).logits, a)


def test_different_hash_seeds_give_different_logits(make_model, ids):
    model = make_model(attn_layers=("lsh",), hash_seed=0).eval()
    other = twin(make_model, model, hash_seed=1).eval()
    tokens = ids(2, 24)
    assert not torch.allclose(model(tokens).logits, other(tokens).logits)


# ------------------------------------------------------------------- lengths and positions


@pytest.mark.parametrize("length", [1, 3, 21, 64])
def test_any_length_up_to_max_seq_len_runs(make_model, ids, length):
    model = make_model()
    tokens = ids(2, length)
    out = model(tokens, labels=tokens)
    assert out.logits.shape == (2, length, 32)
    assert torch.isfinite(out.logits).all()
    if length > 1:  # a single token has no next-token target
        out.loss.backward()
        assert all(torch.isfinite(p.grad).all() for p in model.parameters())


@pytest.mark.parametrize("pos_embedding", ["axial", "learned", "sinusoidal", "none"])
def test_position_embedding_options(make_model, ids, pos_embedding):
    model = make_model(pos_embedding=pos_embedding).eval()
    tokens = ids(2, 20)
    added = model.embed_tokens(tokens) - model.embed(tokens)
    if pos_embedding == "none":
        assert model.pos is None and torch.equal(added, torch.zeros_like(added))
    else:
        torch.testing.assert_close(added, model.pos(20).expand(2, -1, -1), rtol=0, atol=1e-15)
        assert added.abs().sum() > 0
    out = model(tokens, labels=tokens)
    assert torch.isfinite(out.loss)


def test_without_positions_bidirectional_full_attention_is_permutation_equivariant(
        make_model, ids):
    model = make_model(pos_embedding="none", attn_layers=("full",), causal=False).eval()
    tokens = ids(2, 12)
    perm = torch.randperm(12, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(model(tokens[:, perm]).logits, model(tokens).logits[:, perm],
                               rtol=0, atol=1e-12)
    with_pos = make_model(attn_layers=("full",), causal=False).eval()
    assert not torch.allclose(with_pos(tokens[:, perm]).logits, with_pos(tokens).logits[:, perm])


# -------------------------------------------------------------------------------- bad inputs


@pytest.mark.parametrize("case", ["too big", "negative"])
def test_token_ids_outside_the_vocabulary_raise(make_model, ids, case):
    tokens = ids(2, 8)
    bad = 32 if case == "too big" else -1
    tokens[1, 3] = bad
    with pytest.raises(ValueError, match=rf"token id {bad} is outside \[0, 32\)"):
        make_model()(tokens)


def test_length_beyond_max_seq_len_raises(make_model, ids):
    with pytest.raises(ValueError, match="sequence length 65 exceeds max_seq_len=64"):
        make_model()(ids(1, 65))


@pytest.mark.parametrize("name", ["attention_mask", "labels"])
def test_mismatched_mask_or_labels_shape_raises(make_model, ids, name):
    tokens = ids(2, 8)
    other = torch.ones(2, 7, dtype=torch.long)
    with pytest.raises(ValueError, match=rf"{name} has shape \(2, 7\) but input_ids has \(2, 8\)"):
        make_model()(tokens, **{name: other})


def test_non_integer_or_wrong_rank_input_ids_raise(make_model, ids):
    model = make_model()
    with pytest.raises(ValueError, match="torch.float32"):
        model(ids(2, 8).float())
    with pytest.raises(ValueError, match=r"\(16,\)"):
        model(ids(2, 8).flatten())


def test_length_beyond_the_axial_grid_raises(make_model, ids):
    model = make_model(max_seq_len=20, axial_pos_shape=(4, 5))
    with pytest.raises(ValueError, match="sequence length 21 exceeds the 20 positions"):
        model.embed_tokens(ids(1, 21))


# --------------------------------------------------------------------------------- precision


@pytest.mark.parametrize("return_logits", [True, False])
def test_bf16_autocast_forward_backward_is_close_to_fp32(make_model, ids, return_logits):
    model = make_model(dtype=torch.float32, init_std=0.02)
    tokens = ids(2, 24)
    reference = model(tokens, labels=tokens).loss.item()
    model.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(tokens, labels=tokens, return_logits=return_logits)
    if return_logits:
        assert out.logits.dtype == torch.bfloat16  # autocast really was on
    assert torch.isfinite(out.loss)
    assert abs(out.loss.item() - reference) < 0.05
    out.loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.dtype == torch.float32, name
        assert torch.isfinite(p.grad).all(), name


@pytest.mark.parametrize("embed_init_std", [None, 0.7])
def test_embed_init_std_draws_the_token_embedding_only(embed_init_std):
    from reformer import ReformerConfig, ReformerLM
    from reformer.heads import ReformerForSequenceClassification

    config = ReformerConfig(vocab_size=512, d_model=64, n_heads=2, d_ff=64, n_layers=2,
                            max_seq_len=64, embed_init_std=embed_init_std)
    torch.manual_seed(0)
    for model in (ReformerLM(config),
                  ReformerForSequenceClassification(config.replace(causal=False), 10)):
        expected = 0.02 if embed_init_std is None else embed_init_std
        assert abs(model.embed.weight.std().item() / expected - 1) < 0.05
        for name, module in model.named_modules():
            if isinstance(module, torch.nn.Linear):
                assert abs(module.weight.std().item() / 0.02 - 1) < 0.2, name
