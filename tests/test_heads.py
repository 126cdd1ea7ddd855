"""Task heads (reformer.heads) against straightforward unchunked references in float64: the
trunk run without the reversible backward, the whole (L, 2D) normalised states, the plain
losses. Also BERT-style masking (reformer.data.masking) and the refusals."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from conftest import TINY, random_ids
from reformer import ReformerConfig
from reformer.data.masking import bert_mask
from reformer.heads import SLOT_FEATURES, ReformerForMaskedLM, ReformerForSequenceClassification
from reformer.reversible import CallInfo

ENCODER = {**TINY, "causal": False, "n_chunks_after": 1, "loss_chunk_size": 5}


def build(cls, seed=0, **kwargs):
    torch.manual_seed(seed)
    return cls(ReformerConfig(**ENCODER), **kwargs).double().train()


def reference_states(model, ids, mask):
    """The normalised final states (B, L, 2D), through the plain (autograd) stack."""
    call = CallInfo(attention_mask=None if mask is None else mask.bool())
    y1, y2 = model.stack(model.embed_tokens(ids), call, reversible=False)
    return model.norm(torch.cat([y1, y2], dim=-1))


def grads_of(model, loss):
    model.zero_grad(set_to_none=True)
    loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters()}


def assert_close(got: dict, want: dict) -> None:
    for name, g in want.items():
        assert (got[name] - g).abs().max() <= 1e-6 * max(1.0, g.abs().max().item()), name


def padded_mask():
    mask = torch.ones(2, 30, dtype=torch.bool)
    mask[1, 21:] = False
    return mask


@pytest.mark.parametrize("masked", [False, True])
def test_masked_lm_loss_and_gradients_equal_the_unchunked_reference(masked):
    model = build(ReformerForMaskedLM)
    ids, mask = random_ids(2, 30, seed=1), padded_mask() if masked else None
    inputs, labels = bert_mask(ids, 31, 32, p=0.3, attention_mask=mask,
                               generator=torch.Generator().manual_seed(2))
    out = model(inputs, attention_mask=mask, labels=labels)
    got = grads_of(model, out.loss)
    logits = model.head(reference_states(model, inputs, mask))  # (B, L, V): all of them
    want_loss = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100)
    want = grads_of(model, want_loss)
    assert abs(out.loss.item() - want_loss.item()) <= 1e-9
    assert out.logits.shape == ((labels != -100).sum().item(), 32)
    assert_close(got, want)


def test_masked_lm_without_labels_gives_every_positions_logits():
    model = build(ReformerForMaskedLM).eval()
    ids = random_ids(2, 30, seed=3)
    logits = model(ids).logits
    torch.testing.assert_close(logits, model.head(reference_states(model, ids, None)))


def reference_ends(model, states, last, width):
    """(B, 4D) the first and the last real token's states side by side; for width K > 1,
    (B, 2KS) positions 0..K-1 and last-K+1..last, each through the slot projection, zeros
    where a position lies outside the sequence."""
    if width == 1:
        return torch.cat([states[:, 0], states[torch.arange(len(last)), last]], dim=-1)
    rows = []
    for b, end in enumerate(last):
        slots = [*range(width), *range(end - width + 1, end + 1)]  # both ends, in order
        rows.append(torch.cat([model.slots(states[b, p]) if 0 <= p <= end
                               else torch.zeros(SLOT_FEATURES, dtype=torch.float64)
                               for p in slots]))
    return torch.stack(rows)


@pytest.mark.parametrize("pooling, width", [  # width 25: past the padded row's 21 tokens
    ("mean", 1), ("first", 1), ("ends", 1), ("ends", 4), ("ends", 25)])
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("hidden", [0, 7])
def test_classification_equals_the_unchunked_reference(pooling, width, masked, hidden):
    model = build(ReformerForSequenceClassification, n_classes=3, pooling=pooling,
                  hidden=hidden, width=width)
    if hidden:  # its output projection starts at zero (the linear classifier); give it
        assert not model.hidden.outer.weight.any()  # weights that show in the logits
        torch.nn.init.normal_(model.hidden.outer.weight, std=0.3)
    ids, mask = random_ids(2, 30, seed=4), padded_mask() if masked else None
    labels = torch.tensor([2, 0])
    out = model(ids, attention_mask=mask, labels=labels)
    got = grads_of(model, out.loss)
    states = reference_states(model, ids, mask)  # (B, L, 2D)
    if pooling == "first":
        pooled = states[:, 0]
    elif pooling == "ends":  # the last real token: 29 in both rows, or 20 in the padded one
        pooled = reference_ends(model, states, [29, 20 if masked else 29], width)
        wide = 2 * width * SLOT_FEATURES
        assert pooled.shape[1] == (4 * model.config.d_model if width == 1 else wide)
    else:
        real = torch.ones(2, 30, dtype=torch.float64) if mask is None else mask.double()
        pooled = (states * real[..., None]).sum(1) / real.sum(1, keepdim=True)
    if hidden:  # one residual ReLU layer of 7 units between the pooling and the classifier
        inner, outer = model.hidden.inner, model.hidden.outer
        assert inner.weight.shape == (7, pooled.shape[1])
        pooled = pooled + torch.relu(pooled @ inner.weight.T + inner.bias) @ outer.weight.T \
            + outer.bias
    logits = model.head(pooled)
    want_loss = F.cross_entropy(logits, labels)
    want = grads_of(model, want_loss)
    assert (out.logits - logits).abs().max() <= 1e-9
    assert_close(got, want)


@pytest.mark.parametrize("pooling, width", [("mean", 1), ("ends", 1), ("ends", 25)])
def test_pooling_ignores_padding_tokens(pooling, width):
    model = build(ReformerForSequenceClassification, n_classes=2, pooling=pooling,
                  width=width).eval()
    ids, mask = random_ids(2, 30, seed=5), padded_mask()
    changed = ids.clone()
    changed[1, 21:] = (changed[1, 21:] + 1) % 32  # only padded positions differ
    torch.testing.assert_close(model(ids, attention_mask=mask).logits,
                               model(changed, attention_mask=mask).logits, rtol=0, atol=1e-12)


def test_heads_refuse_what_they_cannot_do():
    causal = ReformerConfig(**TINY)
    with pytest.raises(ValueError, match="causal=True makes a masked language model"):
        ReformerForMaskedLM(causal)
    with pytest.raises(ValueError, match="causal=True makes a sequence classifier"):
        ReformerForSequenceClassification(causal, 2)
    encoder = ReformerConfig(**ENCODER)
    with pytest.raises(ValueError, match="pooling='max' is unknown"):
        ReformerForSequenceClassification(encoder, 2, pooling="max")
    with pytest.raises(ValueError, match="hidden=-3 must be a non-negative integer"):
        ReformerForSequenceClassification(encoder, 2, hidden=-3)
    with pytest.raises(ValueError, match="width=0 must be a positive integer"):
        ReformerForSequenceClassification(encoder, 2, pooling="ends", width=0)
    with pytest.raises(ValueError, match="width=2 applies to pooling='ends' only"):
        ReformerForSequenceClassification(encoder, 2, pooling="mean", width=2)
    with pytest.raises(ValueError, match="n_classes=0"):
        ReformerForSequenceClassification(encoder, 0)
    model = ReformerForSequenceClassification(encoder, 2)
    with pytest.raises(ValueError, match=r"labels must be \(B,\) = \(2,\) class ids in \[0, 2\)"):
        model(random_ids(2, 8), labels=torch.tensor([0, 2]))
    with pytest.raises(ValueError, match="has no real token"):
        model(random_ids(2, 8), attention_mask=torch.zeros(2, 8, dtype=torch.bool))


def test_bert_mask_chooses_fifteen_percent_and_replaces_eighty_ten_ten():
    ids = torch.randint(0, 30, (64, 512), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids, dtype=torch.bool)
    mask[:, 400:] = False
    inputs, labels = bert_mask(ids, 31, 32, attention_mask=mask,
                               generator=torch.Generator().manual_seed(1))
    chosen = labels != -100
    assert not chosen[:, 400:].any() and torch.equal(inputs[~chosen], ids[~chosen])
    assert torch.equal(labels[chosen], ids[chosen])
    share = chosen.float().sum() / mask.sum()
    assert abs(share - 0.15) < 0.01
    as_mask = (inputs[chosen] == 31).float().mean()
    kept = (inputs[chosen] == ids[chosen]).float().mean()  # incl. random draws of itself
    assert abs(as_mask - 0.8) < 0.02 and abs(kept - (0.1 + 0.1 / 32)) < 0.02
    again = bert_mask(ids, 31, 32, attention_mask=mask, generator=torch.Generator().manual_seed(1))
    assert torch.equal(again[0], inputs) and torch.equal(again[1], labels)


@pytest.mark.parametrize("first,mask_id", [(1, 31), (1, 0), (3, 2)])
def test_bert_mask_draws_replacements_from_first_random_id_on_never_the_mask(first, mask_id):
    ids = torch.randint(first, 32, (64, 512), generator=torch.Generator().manual_seed(0))
    inputs, labels = bert_mask(ids, mask_id, 32, p=1.0, first_random_id=first,
                               generator=torch.Generator().manual_seed(1))
    replaced = (inputs != ids) & (inputs != mask_id)
    drawn = inputs[replaced].unique()
    allowed = set(range(first, 32)) - {mask_id}
    assert set(drawn.tolist()) == allowed  # every allowed id is drawn, no other


@pytest.mark.parametrize("kwargs,match", [({"p": 0.0}, "p=0.0"), ({"p": 1.5}, "p=1.5"),
                                          ({"mask_token_id": 32}, "mask_token_id=32"),
                                          ({"first_random_id": 31}, "first_random_id=31"),
                                          ({"first_random_id": -1}, "first_random_id=-1")])
def test_bert_mask_refuses_bad_settings(kwargs, match):
    args = {"mask_token_id": 31, **kwargs}
    with pytest.raises(ValueError, match=match):
        bert_mask(random_ids(1, 8), args.pop("mask_token_id"), 32, **args)


@pytest.mark.parametrize("pooling", ["mean", "ends"])
def test_pooling_refuses_a_sequence_without_real_tokens(pooling):
    model = build(ReformerForSequenceClassification, n_classes=2, pooling=pooling)
    mask = padded_mask()
    mask[0] = False
    with pytest.raises(ValueError, match="a sequence has no real token"):
        model(random_ids(2, 30, seed=6), attention_mask=mask)
