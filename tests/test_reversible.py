"""Reversible stack: its recomputing backward equals plain autograd through the same network.

The comparisons run in float64 on a model that mixes LSH, local and full attention layers, with
dropout and attention dropout on (so the backward must replay the forward's RNG) and with the
feed-forward and attention halves chunked (ff_chunk_size < B*L, one head per slice), so that
every chunked backward path is exercised. ``model.stack.reversible`` selects the path; the
autograd graph is checked to make sure each run really took the path it names.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

import reformer.reversible as reversible_module
from conftest import graph_has
from reformer._dropout import PositionDropout
from reformer.reversible import CallInfo, ReversibleBlock

ATOL = 1e-8
REGULARISED = dict(dropout=0.1, attention_dropout=0.2, ff_chunk_size=5, attn_head_chunk_size=1)


def run(model, ids, *, reversible: bool, seed: int = 1, **kwargs):
    """Seeded forward + backward; returns logits and every parameter's gradient."""
    model.stack.reversible = reversible
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    out = model(ids, labels=kwargs.pop("labels", ids), **kwargs)
    assert graph_has(out.logits, "_BlockFunctionBackward") == reversible
    probe = torch.randn(out.logits.shape, dtype=out.logits.dtype,
                        generator=torch.Generator().manual_seed(123))
    (out.loss + (out.logits * probe).sum()).backward()
    grads = {}
    for name, p in model.named_parameters():
        assert p.grad is not None, f"{name} got no gradient"
        grads[name] = p.grad.clone()
    return out.logits.detach(), grads


def assert_same(a, b, atol=ATOL):
    (logits_a, grads_a), (logits_b, grads_b) = a, b
    torch.testing.assert_close(logits_a, logits_b, rtol=0, atol=atol)
    assert grads_a.keys() == grads_b.keys()
    for name in grads_a:
        torch.testing.assert_close(grads_a[name], grads_b[name], rtol=0, atol=atol,
                                   msg=lambda m, name=name: f"{name}: {m}")


def max_grad_difference(a, b) -> float:
    return max((a[1][n] - b[1][n]).abs().max().item() for n in a[1])


def test_reversible_matches_autograd_with_dropout_and_hash_seed(make_model, ids):
    model = make_model(**REGULARISED)
    tokens = ids(2, 24)
    rev, plain = run(model, tokens, reversible=True), run(model, tokens, reversible=False)
    assert_same(rev, plain)
    # The embedding gradient is what flows back into the input of the stack.
    assert rev[1]["embed.weight"].abs().sum() > 0
    # Dropout is really on: another seed gives other logits.
    other = run(model, tokens, reversible=False, seed=2)
    assert not torch.allclose(other[0], plain[0])


def test_reversible_matches_autograd_without_hash_seed(make_model, ids):
    # Fresh rotations from the global RNG at every forward; the backward must reuse them.
    model = make_model(hash_seed=None, **REGULARISED)
    tokens = ids(2, 24, seed=1)
    assert_same(run(model, tokens, reversible=True), run(model, tokens, reversible=False))


def test_reversible_matches_autograd_with_padding_mask(make_model, ids):
    model = make_model(**REGULARISED)
    tokens = ids(2, 24, seed=2)
    mask = torch.ones(2, 24, dtype=torch.bool)
    mask[0, -7:] = False  # right padding
    mask[1, 5] = False  # and a hole
    labels = tokens.masked_fill(~mask, -100)
    rev = run(model, tokens, reversible=True, attention_mask=mask, labels=labels)
    plain = run(model, tokens, reversible=False, attention_mask=mask, labels=labels)
    assert_same(rev, plain)


def test_reversible_matches_autograd_with_more_hashes_at_call_time(make_model, ids):
    model = make_model(**REGULARISED)
    tokens = ids(2, 24, seed=3)
    rev = run(model, tokens, reversible=True, n_hashes=4)
    assert_same(rev, run(model, tokens, reversible=False, n_hashes=4))
    assert not torch.allclose(rev[0], run(model, tokens, reversible=True, n_hashes=2)[0])


@pytest.mark.parametrize("project_elements", [1, 1 << 25])  # a group per slice; one group
@pytest.mark.parametrize("head_chunk", [1, 3])  # slices of one head; uneven slices (3 + 1)
def test_reversible_matches_autograd_over_head_groups(make_model, ids, monkeypatch,
                                                      project_elements, head_chunk):
    """Heads projected and merged a group at once, each slice's rows reused for its
    gradients: the same as plain autograd however the heads are grouped and sliced."""
    monkeypatch.setattr(reversible_module, "PROJECT_ELEMENTS", project_elements)
    model = make_model(**{**REGULARISED, "n_heads": 4, "attn_head_chunk_size": head_chunk})
    half = model.stack.blocks[0].f
    groups = half._groups(torch.zeros(2, 24, 1), CallInfo())
    assert len(groups) == (len(half.attn.head_slices()) if project_elements == 1 else 1)
    tokens = ids(2, 24, seed=6)
    assert_same(run(model, tokens, reversible=True), run(model, tokens, reversible=False))


def test_head_groups_stay_within_the_budget(make_model, monkeypatch):
    half = make_model(n_heads=4, d_model=16, attn_head_chunk_size=1).stack.blocks[0].f
    # 10 rows x E=4 x 2 projections = 80 values per head: two heads per group
    monkeypatch.setattr(reversible_module, "PROJECT_ELEMENTS", 160)
    assert half._groups(torch.zeros(1, 10, 1), CallInfo()) == [
        (slice(0, 2), [slice(0, 1), slice(1, 2)]), (slice(2, 4), [slice(2, 3), slice(3, 4)])]


def test_reversible_matches_autograd_through_the_config_flag(make_model, ids):
    # config.reversible=False builds a plain stack; same weights, same gradients.
    rev_model = make_model(**REGULARISED)
    plain_model = make_model(reversible=False, **REGULARISED)
    plain_model.load_state_dict(rev_model.state_dict())
    assert plain_model.stack.reversible is False
    tokens = ids(2, 21, seed=4)  # not a multiple of any chunk length
    assert_same(run(rev_model, tokens, reversible=True),
                run(plain_model, tokens, reversible=False))


def test_backward_rebuilds_the_masks_without_the_rng(make_model, ids):
    # The dropout masks are keyed by position (reformer._dropout) and their seeds recorded:
    # the backward needs no RNG state, so reseeding between forward and backward changes
    # nothing.
    model = make_model(**REGULARISED)
    tokens = ids(2, 24)
    plain = run(model, tokens, reversible=False)
    model.stack.reversible = True
    model.zero_grad(set_to_none=True)
    torch.manual_seed(1)
    out = model(tokens, labels=tokens)
    torch.manual_seed(999)  # would change masks drawn from the RNG in the backward
    probe = torch.randn(out.logits.shape, dtype=out.logits.dtype,
                        generator=torch.Generator().manual_seed(123))
    (out.loss + (out.logits * probe).sum()).backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters()}
    assert_same((out.logits.detach(), grads), plain)


def test_comparison_detects_a_backward_with_other_masks(make_model, ids, monkeypatch):
    # Guard on the tests above: if the backward rebuilt other hidden-dropout masks than the
    # forward's, the gradients would differ far beyond ATOL.
    model = make_model(**REGULARISED)
    tokens = ids(2, 24)
    plain = run(model, tokens, reversible=False)
    seen, rows_of = set(), PositionDropout.rows

    def other_masks_on_recomputation(drop, rows, like):
        key = (drop.seed, rows.start, rows.stop, like.shape[-1])
        again = key in seen
        seen.add(key)
        return rows_of(dataclasses.replace(drop, seed=drop.seed + 1) if again else drop,
                       rows, like)

    monkeypatch.setattr(PositionDropout, "rows", other_masks_on_recomputation)
    assert max_grad_difference(run(model, tokens, reversible=True), plain) > 1e-4


def test_reversible_forward_equals_plain_forward_and_no_grad(make_model, ids):
    model = make_model().eval()
    tokens = ids(2, 24, seed=5)
    model.stack.reversible = True
    rev = model(tokens).logits
    model.stack.reversible = False
    plain = model(tokens).logits
    with torch.no_grad():
        model.stack.reversible = True
        no_grad = model(tokens).logits
    torch.testing.assert_close(rev, plain, rtol=0, atol=1e-12)
    torch.testing.assert_close(no_grad, plain, rtol=0, atol=1e-12)


def test_block_is_inverted_by_its_own_halves(make_model):
    # x2 = y2 - g(y1), x1 = y1 - f(x2): the identity the backward relies on.
    model = make_model().eval()
    x1, x2 = torch.randn(2, 2, 24, 16, dtype=torch.float64)
    call = CallInfo()
    for block in model.stack.blocks:
        assert isinstance(block, ReversibleBlock)
        y1, y2, f_rec, g_rec = block.forward_plain(x1, x2, call)
        assert not torch.allclose(y1, x1) and not torch.allclose(y2, x2)
        back2 = y2 - block.g(y1, g_rec, call)
        back1 = y1 - block.f(back2, f_rec, call)
        torch.testing.assert_close(back2, x2, rtol=0, atol=1e-12)
        torch.testing.assert_close(back1, x1, rtol=0, atol=1e-12)


def saved_numel(model, tokens) -> int:
    """Elements of all tensors autograd saves for the backward of one forward."""
    total = 0

    def pack(t):
        nonlocal total
        total += t.numel()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(tokens, labels=tokens, return_logits=False)
    return total


def test_saved_activations_do_not_grow_with_depth(make_model, ids):
    tokens = ids(2, 24)
    rev = [saved_numel(make_model(n_layers=n), tokens) for n in (2, 4)]
    plain = [saved_numel(make_model(n_layers=n, reversible=False), tokens) for n in (2, 4)]
    assert rev[0] == rev[1]
    assert plain[1] > plain[0] > rev[0]  # the measure does see per-layer activations


def test_parameter_gradients_flow_through_autograd_grad(make_model, ids):
    # The Function returns parameter gradients (it does not write .grad behind autograd's back),
    # so torch.autograd.grad sees them and leaves .grad alone.
    model = make_model(**REGULARISED)
    tokens = ids(2, 24, seed=6)
    params = dict(model.named_parameters())
    torch.manual_seed(1)
    grads = torch.autograd.grad(model(tokens, labels=tokens).loss, list(params.values()))
    assert all(p.grad is None for p in params.values())
    model.stack.reversible = False
    torch.manual_seed(1)
    expected = torch.autograd.grad(model(tokens, labels=tokens).loss, list(params.values()))
    for name, got, want in zip(params, grads, expected, strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=ATOL, msg=name)


@pytest.mark.parametrize("name", ["stack.blocks.0.f.attn.w_qk.weight",
                                  "stack.blocks.1.g.ff.w_in.weight"])
def test_gradient_hooks_see_each_parameter_gradient_once(make_model, ids, name):
    # A tensor hook (e.g. gradient scaling or clipping) must run once on the full gradient, as
    # in plain autograd, not on every head slice / row block the backward recomputes.
    model = make_model(**REGULARISED)
    tokens = ids(2, 24, seed=6)
    param = dict(model.named_parameters())[name]
    calls = []
    param.register_hook(lambda g: (calls.append(1), 2 * g)[1])
    results = []
    for reversible in (True, False):
        calls.clear()
        results.append(run(model, tokens, reversible=reversible))
        assert len(calls) == 1, f"reversible={reversible}: hook ran {len(calls)} times"
    assert_same(*results)


@pytest.mark.parametrize("reversible", [True, False])
def test_input_gradient_of_the_stack(make_model, reversible):
    # dL/dx for x fed to the stack directly, reversible vs plain autograd.
    model = make_model(**REGULARISED)
    model.stack.reversible = reversible
    x = torch.randn(2, 24, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    grads = []
    for flag in (reversible, False):
        x_in = x.clone().requires_grad_(True)
        torch.manual_seed(1)
        y1, y2 = model.stack(x_in, CallInfo(), reversible=flag)
        (y1.square().sum() + (y1 * y2).sum()).backward()
        grads.append(x_in.grad)
    torch.testing.assert_close(grads[0], grads[1], rtol=0, atol=ATOL)


def loss_and_grads(model, tokens, *, reversible: bool):
    """Seeded forward + backward of the fused loss (return_logits=False)."""
    model.stack.reversible = reversible
    model.zero_grad(set_to_none=True)
    torch.manual_seed(1)
    loss = model(tokens, labels=tokens, return_logits=False).loss
    assert graph_has(loss, "_BlockFunctionBackward") == reversible
    loss.backward()
    return loss.detach(), {name: p.grad.clone() for name, p in model.named_parameters()}


def test_fused_loss_path_reuses_gradient_storage_and_matches_autograd(make_model, ids):
    # With the fused loss the stack's backward overwrites its outputs and incoming gradients
    # in place (CallInfo.owned_grads); the result must still equal plain autograd.
    model = make_model(**REGULARISED)
    tokens = ids(2, 24, seed=3)
    assert_same(loss_and_grads(model, tokens, reversible=True),
                loss_and_grads(model, tokens, reversible=False))


@pytest.mark.parametrize("activation", ["relu", "gelu"])
@pytest.mark.parametrize("fused_loss", [True, False])
def test_written_out_backward_without_dropout_matches_autograd(make_model, ids, activation,
                                                               fused_loss):
    # Without dropout the feed-forward half's backward is written out by hand (and the
    # attention half's LayerNorm backward too); both activations, chunked rows and heads.
    model = make_model(ff_activation=activation, ff_chunk_size=5, attn_head_chunk_size=1)
    tokens = ids(2, 24, seed=4)
    if fused_loss:
        assert_same(loss_and_grads(model, tokens, reversible=True),
                    loss_and_grads(model, tokens, reversible=False))
    else:
        assert_same(run(model, tokens, reversible=True), run(model, tokens, reversible=False))


def test_fused_loss_path_refuses_a_second_backward(make_model, ids):
    # Its saved outputs were turned back into the inputs: autograd must notice, not reuse them.
    model = make_model()
    tokens = ids(2, 24)
    loss = model(tokens, labels=tokens, return_logits=False).loss
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


def test_backward_leaves_the_callers_outputs_and_gradients_alone(make_model):
    # Without owned_grads the outputs and the gradients it receives belong to the caller.
    model = make_model(**REGULARISED)
    x = torch.randn(2, 24, 16, dtype=torch.float64, requires_grad=True)
    y1, y2 = model.stack(x, CallInfo())
    g1, g2 = torch.randn_like(y1), torch.randn_like(y2)
    before = [t.clone() for t in (y1, y2, g1, g2)]
    torch.autograd.backward([y1, y2], [g1, g2])
    for t, b in zip((y1, y2, g1, g2), before, strict=True):
        assert torch.equal(t.detach(), b)


def test_reversible_matches_autograd_under_bf16_autocast(make_model, ids):
    # The hand-written backward casts each product's operands to autocast's dtype itself
    # (once per block, for every product that uses them); its gradients must still be those
    # of autograd through the same bf16 products, up to bf16 rounding: the two paths round
    # in different places, and at this size that alone differs by up to 8% (the second
    # feed-forward's LayerNorm), by under 3% for most parameters.
    model = make_model(dtype=torch.float32, init_std=0.02, ff_chunk_size=5,
                       attn_head_chunk_size=1)
    tokens = ids(2, 24)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        (_, rev), (_, plain) = (run(model, tokens, reversible=r) for r in (True, False))
    for name, g in plain.items():
        assert rev[name].dtype == torch.float32, name
        error = ((rev[name] - g).norm() / g.norm()).item()
        assert error < 0.15, f"{name}: relative difference {error:.3g}"


def test_each_blocks_gradients_are_handed_on_before_the_blocks_below_are_recomputed(
        make_model, ids):
    # One autograd node per block: DDP's buckets (fired by these hooks) go out while the rest
    # of the stack is still being recomputed. A single node for the stack fails this.
    model = make_model()
    events = []
    for i, block in enumerate(model.stack.blocks):
        for p in block.parameters():
            p.register_post_accumulate_grad_hook(lambda p, i=i: events.append(("grad", i)))
        backward = block.f.backward_

        def recording(*args, i=i, backward=backward):
            events.append(("recompute", i))
            return backward(*args)

        block.f.backward_ = recording
    tokens = ids(2, 24)
    model(tokens, labels=tokens, return_logits=False).loss.backward()
    order = [e for i, e in enumerate(events) if e not in events[:i]]  # first occurrences
    n = len(model.stack.blocks)
    expected = [e for i in reversed(range(n)) for e in (("recompute", i), ("grad", i))]
    assert order == expected
