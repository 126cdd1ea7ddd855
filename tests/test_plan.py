"""Execution plans (plan.py): the cuda plan computes the CPU plan's function, with a number
of operators per layer that does not grow with L and no host sync inside the layers.

The cuda plan runs on the CPU here (``plan.forced``), its attention cores with tensor
operators or FlexAttention's eager path (tests/attention/test_banded.py covers both cores
alone); tests/test_cuda.py runs it on a GPU.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.attention.flex_attention as flex_module

from conftest import random_ids
from reformer import ReformerConfig, ReformerLM
from reformer.attention import _banded
from reformer.plan import CPU, CUDA, count_kernel_ops, forced, plan_for


def loss_logits_grads(model: ReformerLM, ids: torch.Tensor, mask: torch.Tensor | None):
    model.zero_grad(set_to_none=True)
    labels = ids if mask is None else ids.masked_fill(~mask, -100)  # padding: no target
    out = model(ids, attention_mask=mask, labels=labels)
    out.loss.backward()
    return out.loss.detach(), out.logits.detach(), {n: p.grad.clone()
                                                    for n, p in model.named_parameters()}


@pytest.mark.parametrize("backend", ["tensor ops", "flex"])
@pytest.mark.parametrize("causal", [True, False])
def test_cuda_plan_computes_the_cpu_plans_function(make_model, monkeypatch, backend, causal):
    # lsh, local and full layers, padding inside the sequence and at its end (45 tokens in
    # chunks of 4), float64: loss, logits on real positions and every gradient
    if backend == "flex":
        monkeypatch.setattr(_banded, "FLEX_ON_CPU", True)
        monkeypatch.setattr(flex_module, "_validate_device", lambda *args: None)
    model = make_model(causal=causal, n_chunks_after=0 if causal else 1, n_heads=4,
                       d_model=16, attn_head_chunk_size=1)
    ids = random_ids(2, 45, seed=4)
    mask = torch.ones(2, 45, dtype=torch.bool)
    mask[1, 30:] = False
    want = loss_logits_grads(model, ids, mask)
    with forced("cuda"):
        got = loss_logits_grads(model, ids, mask)
    assert abs(got[0] - want[0]) <= 1e-12
    assert (got[1] - want[1])[mask].abs().max() <= 1e-10
    for name, g in want[2].items():
        assert (got[2][name] - g).abs().max() <= 1e-10 * max(1.0, g.abs().max().item()), name


def test_cuda_plan_keeps_round_dedup_on_the_blockwise_path(make_model, ids):
    model = make_model(dedup_rounds=True, n_hashes=3)
    tokens = ids(2, 24, seed=1)
    want = loss_logits_grads(model, tokens, None)
    with forced("cuda"):
        got = loss_logits_grads(model, tokens, None)
    assert abs(got[0] - want[0]) <= 1e-12


BENCH_LAYER = dict(vocab_size=256, d_model=128, n_heads=4, d_ff=256, attn_layers=("lsh",),
                   n_hashes=4, chunk_length=64, hash_seed=0)


def ops_per_layer(plan: str, length: int) -> dict[str, int]:
    """Operators of one training step (forward + recomputing backward) of one LSH layer: a
    2-layer model's less a 1-layer model's."""
    counts = []
    for layers in (1, 2):
        torch.manual_seed(0)
        model = ReformerLM(ReformerConfig(**BENCH_LAYER, n_layers=layers, max_seq_len=length))
        ids = random_ids(1, length, vocab=256)

        def step(model=model, ids=ids):
            model(ids, labels=ids, return_logits=False).loss.backward()

        with forced(plan):
            counts.append(count_kernel_ops(step))
    return {k: counts[1].get(k, 0) - counts[0].get(k, 0) for k in counts[0].keys() | counts[1]}


def test_cuda_plan_launches_per_layer_do_not_grow_with_length():
    short, long = ops_per_layer("cuda", 4096), ops_per_layer("cuda", 16384)
    assert short == long
    assert 50 < sum(short.values()) <= 300
    # no host sync inside a layer: nothing reads a device value back
    syncs = {"aten::_local_scalar_dense", "aten::item", "aten::is_nonzero", "aten::nonzero"}
    assert not syncs & {k for k, n in short.items() if n}


def test_the_launch_count_sees_blocks_grow_on_the_cpu_plan():
    # the same count on the CPU plan, whose blocks are cache-sized: it grows with L
    assert sum(ops_per_layer("cpu", 16384).values()) > sum(ops_per_layer("cpu", 4096).values())


def test_plans_by_device_and_forced():
    assert plan_for(torch.device("cpu")) is CPU
    assert plan_for(torch.device("cuda")) is CUDA
    with forced("cuda"):
        assert plan_for(torch.device("cpu")) is CUDA
    assert plan_for(torch.device("cpu")) is CPU
    with pytest.raises(ValueError, match="plan 'tpu'"), forced("tpu"):
        pass


def test_block_rows():
    assert CPU.rows(4096, 1024) == 4096  # the config's
    assert CUDA.rows(4096, 1024) == 1 << 16  # at least 64K rows
    assert CUDA.rows(1024, 32768) == 2048  # 2**26 elements of (rows, 32K)
    assert CUDA.rows(16, 1 << 26) == 16
