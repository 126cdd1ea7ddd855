"""The same model on CUDA: results equal the CPU's, training and sampling run there.

The CUDA tests are skipped where no CUDA device is present (CI); run them on a GPU machine
with ``pytest tests/test_cuda.py`` (benchmarks/run_gpu.sh does). The CPU side is the
reference: float64 tiny models must agree to rounding, float32 models at a realistic shape to
float32 accumulation error (the CPU runs the native kernels, CUDA the blockwise PyTorch
path). One test runs everywhere: CUDA's autocast dtypes emulated on the CPU.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from conftest import TINY, random_ids
from reformer import ReformerConfig, ReformerLM
from reformer.cli import main
from reformer.generation import sample
from reformer.plan import count_cuda_launches, forced
from reformer.training.trainer import Callback, Trainer
from training import test_trainer
from training.test_trainer import MODEL, make_run, train_losses

corpus = test_trainer.corpus  # its fixture
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
CUDA = torch.device("cuda")


def loss_and_grads(model: ReformerLM, ids: torch.Tensor, **kwargs):
    model.zero_grad(set_to_none=True)
    out = model(ids, labels=ids, **kwargs)
    out.loss.backward()
    grads = {n: p.grad.detach().cpu() for n, p in model.named_parameters()}
    logits = None if out.logits is None else out.logits.detach().cpu()
    return out.loss.detach().cpu(), logits, grads


def cpu_and_cuda(config: ReformerConfig, dtype: torch.dtype, seed: int = 0):
    torch.manual_seed(seed)
    cpu = ReformerLM(config).to(dtype).train()
    gpu = ReformerLM(config).to(dtype).train()
    gpu.load_state_dict(cpu.state_dict())
    return cpu, gpu.to(CUDA)


def close_grads(got: dict, want: dict, rel: float) -> None:
    """Every gradient within ``rel`` of the largest entry of its reference."""
    for name, ref in want.items():
        atol = max(rel * ref.abs().max().item(), 1e-12)
        torch.testing.assert_close(got[name], ref, rtol=0, atol=atol,
                                   msg=lambda m, name=name: f"{name}: {m}")


@needs_cuda
@pytest.mark.parametrize("causal", [True, False])
def test_tiny_float64_model_matches_cpu(causal):
    # All three attention kinds, reversible layers, chunked head: logits, loss and every
    # parameter's gradient.
    cpu, gpu = cpu_and_cuda(ReformerConfig(**{**TINY, "causal": causal}), torch.float64)
    ids = random_ids(2, 48, seed=1)
    want = loss_and_grads(cpu, ids)
    got = loss_and_grads(gpu, ids.to(CUDA))
    torch.testing.assert_close(got[0], want[0], rtol=0, atol=1e-10)
    torch.testing.assert_close(got[1], want[1], rtol=0, atol=1e-10)
    close_grads(got[2], want[2], 1e-9)


@needs_cuda
def test_float32_benchmark_shape_matches_cpu():
    # The benchmark's layer shape (4 heads x 64, chunk 64, 4 rounds) at 4K: the chunked loss
    # without logits, as training runs it. CPU = fused native kernel, CUDA = blockwise.
    config = ReformerConfig(vocab_size=256, d_model=256, n_heads=4, d_head=64, d_ff=1024,
                            n_layers=2, attn_layers=("lsh",), n_hashes=4, chunk_length=64,
                            max_seq_len=4096, hash_seed=0)
    cpu, gpu = cpu_and_cuda(config, torch.float32)
    ids = random_ids(1, 4096, seed=2, vocab=256)
    torch.set_num_threads(2)
    want = loss_and_grads(cpu, ids, return_logits=False)
    got = loss_and_grads(gpu, ids.to(CUDA), return_logits=False)
    torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=1e-5)
    # fp32 sums over 4K positions in another order, through two reversible reconstructions;
    # a wrong gradient is off by O(1) of its scale
    close_grads(got[2], want[2], 1e-3)


@needs_cuda
@pytest.mark.parametrize("kinds,n_layers", [(("lsh",), 1), (("local", "full"), 3)])
def test_cached_decoding_on_cuda_equals_full_forward(kinds, n_layers):
    # As tests/test_generation.py: the logits are exact for local/full stacks and a single LSH
    # layer (with LSH below other layers they are close, not equal: generation.py).
    torch.manual_seed(0)
    config = ReformerConfig(**{**TINY, "attn_layers": kinds, "n_layers": n_layers})
    model = ReformerLM(config).double().eval().to(CUDA)
    ids = random_ids(2, 30, seed=3).to(CUDA)
    caches = model.new_cache(2, 40)
    torch.testing.assert_close(model.prefill(ids[:, :6], caches), model(ids[:, :6]).logits[:, -1])
    for t in range(6, 30):
        torch.testing.assert_close(model.step(ids[:, t], caches),
                                   model(ids[:, :t + 1]).logits[:, -1], rtol=0, atol=1e-10)


@needs_cuda
def test_seeded_sampling_is_the_same_on_cuda_and_cpu():
    cpu, gpu = cpu_and_cuda(ReformerConfig(**{**TINY, "attn_layers": ("lsh", "local")}),
                            torch.float64)
    prompt = random_ids(1, 9, seed=4)[0]
    runs = [list(sample(m, prompt, 25, top_k=8, generator=torch.Generator().manual_seed(5)))
            for m in (cpu, gpu)]
    assert runs[0] == runs[1]


@needs_cuda
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_training_on_cuda_resumes(tmp_path, corpus, precision):
    # The resumed run replays the same batches, dropout and LSH rotations; only the last bits
    # may differ, since some CUDA kernels (index_add_, the embedding's backward) add with
    # atomics in no fixed order: two uninterrupted runs differ the same way.
    # test_trainer's model: LSH rotations from the global RNG (CUDA's here) and dropout, so
    # that a resume must restore the CUDA generator too
    run = make_run(corpus, precision=precision, batch_size=2, device="cuda")
    straight = Trainer.create(tmp_path / "a", run).run_loop()
    assert straight.step == 6 and str(Trainer.resume(tmp_path / "a").device) == "cuda"

    class StopAt3(Callback):
        def on_step(self, trainer, report):
            if report.step == 3:
                trainer.request_stop("test")

    Trainer.create(tmp_path / "b", run).run_loop(StopAt3())
    Trainer.resume(tmp_path / "b").run_loop()
    losses = train_losses(tmp_path / "a")
    assert len(losses) == 6 and all(0 < loss < 6 for loss in losses)
    # other dropout masks or batches change these losses in the second decimal
    tol = 1e-5 if precision == "fp32" else 1e-2
    assert train_losses(tmp_path / "b") == pytest.approx(losses, rel=tol)


@needs_cuda
def test_cli_trains_and_generates_on_cuda(tmp_path, corpus, capsys):
    (tmp_path / "model.json").write_text(MODEL.to_json())
    assert main(["train", "--config", str(tmp_path / "model.json"), "--data", str(corpus),
                 "--steps", "3", "--eval-every", "2", "--eval-windows", "1",
                 "--out", str(tmp_path / "run"), "--device", "cuda", "--precision",
                 "bf16"]) == 0
    assert "finished 3 steps" in capsys.readouterr().out
    assert main(["generate", "--checkpoint", str(tmp_path / "run"), "--prompt", "Now is",
                 "--max-new-tokens", "12", "--seed", "1", "--device", "cuda"]) == 0
    assert capsys.readouterr().out.startswith("Now is")


@pytest.mark.parametrize("plan", ["cpu", "cuda"])
@pytest.mark.parametrize("kinds", [("local", "lsh", "full"), ("lsh",)])
def test_bf16_training_with_cuda_autocast_dtypes_on_cpu(monkeypatch, kinds, plan):
    # CUDA's autocast returns fp32 from norms and softmax where the CPU's keeps bf16; mixing
    # the two dtypes broke in-place and out= matmuls of the PyTorch kernels (bf16 runs on an
    # H200 failed). Emulate those ops on the CPU, with the native kernels off (the GPU path),
    # on both plans (the cuda plan's banded attention, with tensor operators here).
    monkeypatch.setenv("REFORMER_NATIVE", "off")

    def fp32_under_autocast(fn):
        def wrapped(*args, **kwargs):
            out = fn(*args, **kwargs)
            return out.float() if torch.is_autocast_enabled("cpu") else out
        return wrapped

    for module, name in [(torch.linalg, "vector_norm"), (F, "normalize"), (torch, "softmax"),
                         (F, "softmax"), (F, "log_softmax"), (F, "layer_norm")]:
        monkeypatch.setattr(module, name, fp32_under_autocast(getattr(module, name)))
    config = ReformerConfig(vocab_size=256, d_model=32, n_heads=2, d_ff=64, n_layers=3,
                            attn_layers=kinds, n_hashes=2, chunk_length=16,
                            local_chunk_length=16, max_seq_len=128, dropout=0.1)
    torch.manual_seed(0)
    model = ReformerLM(config).train()
    ids = random_ids(2, 128, seed=6, vocab=256)
    for return_logits in (True, False):
        with forced(plan):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = model(ids, labels=ids, return_logits=return_logits).loss
            loss.backward()
        assert 5 < loss.item() < 6 and all(p.grad.isfinite().all() for p in model.parameters())


@needs_cuda
@pytest.mark.parametrize("kind", ["lsh", "local"])
def test_flex_attention_on_cuda_matches_the_cpu_reference(kind):
    # The compiled Triton kernels (FlexAttention) at the benchmark's head shape, float32,
    # against the CPU's blockwise kernel in float64: outputs and gradients.
    from reformer.attention import bucketed_attention, local_attention
    from reformer.attention._banded import lsh_banded
    from reformer.attention._chunked import window_offsets
    from reformer.attention.local import _local_banded
    from reformer.hashing import hash_vectors, sample_rotations

    g = torch.Generator().manual_seed(0)
    B, H, L, E, M, R = 1, 4, 4096, 64, 64, 4
    q, k, v = (torch.randn(B, H, L, E, generator=g, dtype=torch.float64) for _ in range(3))
    w = torch.randn(B, H, L, E, generator=g, dtype=torch.float64)
    ins = [t.requires_grad_(True) for t in (q, k, v)]
    cfg = ReformerConfig(vocab_size=8, d_model=256, n_heads=H, local_chunk_length=M,
                         max_seq_len=L)
    if kind == "lsh":
        buckets = hash_vectors(q.detach(), sample_rotations(H, E, R, 2 * L // M, seed=1))
        ref = bucketed_attention(q, v, buckets, chunk_length=M)
        ins = [q, v]
    else:
        ref = local_attention(q, k, v, chunk_length=M)
    want = torch.autograd.grad((ref * w).sum(), ins)
    dev = [t.detach().float().to(CUDA).requires_grad_(True) for t in ins]
    if kind == "lsh":
        out = lsh_banded(*dev, buckets.to(CUDA), chunk_length=M,
                         offsets=window_offsets(R * L // M, 1, 0), causal=True,
                         attention_mask=None)
    else:
        out = _local_banded(*dev, cfg, None)
    got = torch.autograd.grad((out * w.float().to(CUDA)).sum(), dev)
    torch.testing.assert_close(out.double().cpu(), ref.detach(), rtol=0, atol=1e-4)
    for a, b in zip(got, want, strict=True):
        scale = b.abs().max().item()
        torch.testing.assert_close(a.double().cpu(), b, rtol=0, atol=1e-4 * scale)


def cuda_launches(model: ReformerLM, ids: torch.Tensor) -> int:
    """Kernels launched on the GPU by one training step (after a warm-up step)."""
    def step():
        model(ids, labels=ids, return_logits=False).loss.backward()
        torch.cuda.synchronize()

    return count_cuda_launches(step)


@needs_cuda
def test_cuda_launches_per_layer_do_not_grow_with_length():
    per_layer = []
    for length in (4096, 16384):
        counts = []
        for layers in (1, 2):
            torch.manual_seed(0)
            config = ReformerConfig(vocab_size=256, d_model=256, n_heads=4, d_ff=1024,
                                    n_layers=layers, attn_layers=("lsh",), n_hashes=4,
                                    chunk_length=64, max_seq_len=length, hash_seed=0)
            model = ReformerLM(config).to(CUDA)
            counts.append(cuda_launches(model, random_ids(1, length, vocab=256).to(CUDA)))
        per_layer.append(counts[1] - counts[0])
    assert per_layer[0] == per_layer[1] and per_layer[0] <= 300, per_layer
