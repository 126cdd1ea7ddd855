"""Held-out evaluation: bits per labelled token, weighted by how many labels each sequence has."""

from __future__ import annotations

import math

import pytest
import torch

from reformer import ReformerConfig, ReformerLM
from reformer.training import metrics
from reformer.training.metrics import LN2, evaluate_sequences


def test_bits_are_the_mean_over_labelled_tokens_not_over_sequences():
    torch.manual_seed(0)
    model = ReformerLM(ReformerConfig(vocab_size=16, d_model=16, n_heads=2, d_ff=16, n_layers=1,
                                      attn_layers=("full",), max_seq_len=12)).eval()
    inputs = torch.randint(0, 16, (2, 12))
    labels = inputs.clone()
    labels[0, :9] = -100  # 2 labelled targets in the first sequence, 11 in the second
    with torch.no_grad():
        logits = model(inputs).logits  # (2, 12, V)
    nll = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 16),
                                            labels[:, 1:].reshape(-1), ignore_index=-100,
                                            reduction="sum")
    expected = float(nll) / int((labels[:, 1:] != -100).sum()) / LN2
    calls = []

    def extra(logits, y):
        calls.append(logits.shape)
        return {"first_logit": float(logits[0, 0, 0])}

    bits, metrics = evaluate_sequences(model, inputs, labels, extra=extra)
    assert bits == pytest.approx(expected, rel=1e-5)
    assert calls == [(1, 12, 16), (1, 12, 16)]  # one sequence at a time, full logits
    assert metrics["first_logit"] == pytest.approx(float(logits[:, 0, 0].mean()), rel=1e-5)
    plain, none = evaluate_sequences(model, inputs)  # language modelling: every position
    assert none == {} and math.isfinite(plain) and plain != pytest.approx(bits)


def test_precision_warning_only_for_emulated_bf16_on_the_cpu():
    from reformer.training.metrics import precision_warning

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    warning = precision_warning(cpu, "bf16", native=lambda: False)
    assert warning is not None and "--precision fp32" in warning
    assert precision_warning(cpu, "bf16", native=lambda: True) is None
    assert precision_warning(cpu, "fp32", native=lambda: False) is None
    assert precision_warning(cuda, "bf16", native=lambda: False) is None


def test_native_bf16_falls_back_to_the_cpu_flags_without_the_onednn_query(tmp_path,
                                                                          monkeypatch):
    class NoQuery:  # a torch build without the private oneDNN op
        def __getattr__(self, name):
            raise AttributeError(name)
    monkeypatch.setattr(torch.ops, "mkldnn", NoQuery())
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f avx512_bf16\n")
    assert metrics.cpu_has_native_bf16(info)
    info.write_text("processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f avx512_vnni\n")
    assert not metrics.cpu_has_native_bf16(info)
    assert not metrics.cpu_has_native_bf16(tmp_path / "absent")
