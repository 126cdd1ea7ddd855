"""ReformerLM's fused head loss (``return_logits=False``): held against the logits path.

The fused path computes LayerNorm -> Linear -> cross-entropy block by block inside one autograd
node and recomputes each block in its backward; these tests check that it is the same function
with the same gradients, that hooks and autocast see what they would see on the plain path, and
that it never builds a tensor over all positions of the (2D)-wide states or the logits.
"""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from reformer.model import _ChunkedHeadLoss

F64 = torch.float64


def labels_with_ignored(tokens):
    labels = tokens.clone()
    labels[0, 2:9] = -100
    labels[-1, -1] = -100  # the last target of a row
    return labels


def loss_and_grads(model, tokens, labels, return_logits):
    model.zero_grad(set_to_none=True)
    loss = model(tokens, labels=labels, return_logits=return_logits).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("loss_chunk_size", [1, 5, 4096])
def test_fused_loss_and_every_gradient_equal_the_logits_path(make_model, ids, loss_chunk_size):
    model = make_model(loss_chunk_size=loss_chunk_size)
    tokens = ids(3, 13)  # 39 rows: blocks of 5 do not divide them, nor the rows of a sequence
    labels = labels_with_ignored(tokens)
    fused = loss_and_grads(model, tokens, labels, return_logits=False)
    plain = loss_and_grads(model, tokens, labels, return_logits=True)
    torch.testing.assert_close(fused[0], plain[0], rtol=0, atol=1e-12)
    assert "embed.weight" in fused[1] and fused[1].keys() == plain[1].keys()
    for name, grad in plain[1].items():
        torch.testing.assert_close(fused[1][name], grad, rtol=0, atol=1e-12, msg=name)


def reference_head_loss(y1, y2, targets, norm, head):
    logits = head(norm(torch.cat([y1, y2], dim=-1)))
    return torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten(),
                                             ignore_index=-100, reduction="sum")


def head_loss_case(make_model, chunk=3):
    model = make_model()
    gen = torch.Generator().manual_seed(5)
    y1, y2 = (torch.randn(2, 7, 16, generator=gen, dtype=F64, requires_grad=True)
              for _ in range(2))
    targets = torch.randint(0, 32, (2, 7), generator=gen)
    targets[:, -1] = -100  # what the model passes: the last position predicts nothing
    targets[1, 2] = -100
    params = [*model.norm.parameters(), *model.head.parameters()]
    return model, y1, y2, targets, params


def test_head_loss_gradients_pass_gradcheck(make_model):
    model, y1, y2, targets, params = head_loss_case(make_model)

    def fused(y1, y2, *params):
        return _ChunkedHeadLoss.apply(y1, y2, targets, model.norm, model.head, 3, *params)

    assert torch.autograd.gradcheck(fused, (y1, y2, *params))
    torch.testing.assert_close(fused(y1, y2, *params),
                               reference_head_loss(y1, y2, targets, model.norm, model.head))


def test_input_gradients_are_fresh_separate_tensors_zero_at_the_last_position(make_model):
    # The reversible stack may overwrite them (CallInfo.owned_grads): they must share no memory.
    model, y1, y2, targets, params = head_loss_case(make_model)
    seen = {}
    y1.register_hook(lambda g: seen.setdefault("y1", g))
    y2.register_hook(lambda g: seen.setdefault("y2", g))
    _ChunkedHeadLoss.apply(y1, y2, targets, model.norm, model.head, 3, *params).backward()
    g1, g2 = seen["y1"], seen["y2"]
    assert g1.is_contiguous() and g2.is_contiguous()
    storages = {t.untyped_storage().data_ptr() for t in (g1, g2, y1, y2)}
    assert len(storages) == 4
    assert torch.equal(g1[:, -1], torch.zeros_like(g1[:, -1]))
    assert torch.equal(g2[:, -1], torch.zeros_like(g2[:, -1]))
    expected = torch.autograd.grad(reference_head_loss(y1, y2, targets, model.norm, model.head),
                                   (y1, y2))
    torch.testing.assert_close((g1, g2), expected, rtol=0, atol=1e-12)


def test_parameter_hooks_see_each_total_gradient_once(make_model, ids):
    model = make_model(loss_chunk_size=1)  # 2 * 12 blocks: one partial gradient per block
    tokens = ids(2, 12)
    labels = labels_with_ignored(tokens)
    expected = loss_and_grads(model, tokens, labels, return_logits=True)[1]
    model.zero_grad(set_to_none=True)
    seen = {}
    for name in ("head.weight", "head.bias", "norm.weight", "embed.weight"):
        param = model.get_parameter(name)
        param.register_hook(lambda g, name=name: seen.setdefault(name, []).append(g.clone()))
    model(tokens, labels=labels, return_logits=False).loss.backward()
    for name, grads in seen.items():
        assert len(grads) == 1, name
        torch.testing.assert_close(grads[0], expected[name], rtol=0, atol=1e-12, msg=name)
    assert len(seen) == 4


@pytest.mark.parametrize(("labelled", "return_logits", "owned"),
                         [(True, False, True), (True, True, False), (False, False, False)])
def test_only_the_fused_loss_tells_the_stack_it_owns_the_gradients(
        make_model, ids, monkeypatch, labelled, return_logits, owned):
    model = make_model()
    calls = []
    stack_forward = model.stack.forward
    monkeypatch.setattr(model.stack, "forward",
                        lambda x, call: calls.append(call) or stack_forward(x, call))
    tokens = ids(2, 8)
    model(tokens, labels=tokens if labelled else None, return_logits=return_logits)
    assert [c.owned_grads for c in calls] == [owned]


def test_bf16_autocast_backward_recomputes_under_autocast(make_model, ids):
    # One block: the fused path then runs exactly the logits path's ops, bf16 matmuls included,
    # so its gradients match to float32 rounding; recomputing in float32 would be ~1e-3 off.
    model = make_model(dtype=torch.float32, loss_chunk_size=4096, init_std=0.02)
    tokens = ids(2, 24)
    grads = {}
    for return_logits in (True, False):
        model.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(tokens, labels=tokens, return_logits=return_logits).loss
        loss.backward()
        grads[return_logits] = {n: p.grad for n, p in model.named_parameters()}
    for name in ("head.weight", "norm.weight", "embed.weight"):
        torch.testing.assert_close(grads[False][name], grads[True][name], rtol=1e-5, atol=1e-7,
                                   msg=name)


class ShapeRecorder(TorchDispatchMode):
    """Records the shape of every tensor an operator returns."""

    def __init__(self):
        super().__init__()
        self.shapes = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.shapes.append(tuple(t.shape))
        return out


def test_no_tensor_spans_all_positions_of_the_normalised_states_or_the_logits(make_model, ids):
    # 2D = 32 and V = 40 are widths that nothing else in this model has (d_ff 48, E 8, L 24).
    model = make_model(vocab_size=40, d_ff=48, loss_chunk_size=5)
    tokens = ids(2, 24)
    params = {tuple(p.shape) for p in model.parameters()}
    params |= {s[::-1] for s in params}  # the head's weight, transposed by nn.Linear
    with ShapeRecorder() as recorder:
        model(tokens, labels=tokens, return_logits=False).loss.backward()
    wide = [s for s in recorder.shapes if s and s[-1] in (32, 40) and s not in params]
    assert wide  # the blocks themselves were seen
    assert max(torch.Size(s).numel() // s[-1] for s in wide) <= 5  # rows per tensor
