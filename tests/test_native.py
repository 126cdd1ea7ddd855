"""The native CPU kernels (csrc/) against the PyTorch ops they replace."""

import fnmatch
import logging
import os
from pathlib import Path

import pytest
import torch

from conftest import needs_compiler
from reformer import _native
from reformer.attention import _chunked
from reformer.attention._chunked import chunk_window_attention, window_probs
from reformer.attention._sorted import sorted_window_attention


def native(monkeypatch, name):
    monkeypatch.setenv(_native.ENV, "on")
    fn = _native.op(name, torch.zeros(1))
    if fn is None:
        pytest.fail("the native kernels did not build")
    return fn


def windows_of(span, nb, W, M):
    """Overlapping (G, nb, W*M) windows of a (G, (nb+W-1)*M) span, as the kernels pass them."""
    return span.as_strided((span.shape[0], nb, W * M), (span.stride(0), M, 1))


@needs_compiler
@pytest.mark.parametrize("causal,self_mask", [(True, True), (True, False), (False, True),
                                              (False, False)])
@pytest.mark.parametrize("M,W", [(4, 3), (64, 2), (5, 2)])  # K = 12, 128, 10
@pytest.mark.parametrize("shared_pos", [False, True])  # positions (1, ...) broadcast over G
def test_window_softmax_matches_pytorch(monkeypatch, causal, self_mask, M, W, shared_pos):
    g = torch.Generator().manual_seed(M * W + causal)
    G, nb, E = 3, 6, 8
    q, k = torch.randn(G, nb, M, E, generator=g), torch.randn(G, nb, W * M, E, generator=g)
    span = torch.stack([torch.randperm((nb + W - 1) * M, generator=g).float()
                        for _ in range(1 if shared_pos else G)])
    qpos = span[:, (W - 1) * M:].reshape(-1, nb, M)  # the last chunk of each window
    kpos = windows_of(span, nb, W, M)
    results = []
    for setting in ("on", "off"):
        monkeypatch.setenv(_native.ENV, setting)
        results.append(window_probs(q, k, qpos, kpos, None, causal=causal,
                                    self_mask=self_mask, scale=0.6))
    (p_native, lse_native), (p_torch, lse_torch) = results
    assert torch.allclose(p_native, p_torch, atol=1e-6, rtol=0), (p_native - p_torch).abs().max()
    assert torch.allclose(lse_native, lse_torch, atol=1e-5, rtol=1e-6)
    assert (p_native == 0).equal(p_torch == 0)  # masked keys get exactly 0
    assert torch.allclose(p_native.sum(-1), torch.ones(()), atol=1e-6)


@needs_compiler
def test_window_softmax_rows_with_nothing_valid(monkeypatch):
    """Every key later than the query (causal): all logits masked, as in PyTorch's path."""
    M, K = 4, 8
    logits = torch.randn(1, 1, M, K)
    qpos = torch.zeros(1, 1, M)
    kpos = torch.arange(1, K + 1).float().view(1, 1, K)
    expect = torch.softmax(logits + _chunked.MASK_VALUE, -1)
    lse = native(monkeypatch, "window_softmax_")(logits, qpos, kpos, 1.0, True, True,
                                                 _chunked.MASK_VALUE, _chunked.SELF_VALUE)
    assert torch.allclose(logits, expect, atol=1e-6)
    assert torch.allclose(lse, torch.full((1, 1, M), _chunked.MASK_VALUE), rtol=1e-6)


@needs_compiler
@pytest.mark.parametrize("sorted_kernel", [True, False])
def test_kernels_match_with_and_without_native(monkeypatch, sorted_kernel):
    """Outputs and gradients of both attention kernels, float32, native on vs off."""
    monkeypatch.setattr(_chunked, "BLOCK_ELEMENTS", 1 << 12)  # several blocks
    g = torch.Generator().manual_seed(5)
    G, Lp, E, R, M = 2, 64, 8, 2, 4
    qk, v = (torch.randn(G, Lp, E, generator=g, requires_grad=True) for _ in range(2))
    s_pos = torch.stack([torch.cat([torch.randperm(Lp, generator=g) for _ in range(R)])
                         for _ in range(G)])
    results = []
    for setting in ("on", "off"):
        monkeypatch.setenv(_native.ENV, setting)
        if sorted_kernel:
            out, lse = sorted_window_attention(qk, v, s_pos, chunk_length=M, offsets=[-1, 0],
                                               causal=True)
        else:
            c = (t.view(G, Lp // M, M, E) for t in (qk, qk, v))
            out, lse = chunk_window_attention(*c, torch.arange(Lp).view(1, -1, M),
                                              offsets=[-1, 0], circular=False, causal=True,
                                              scale=0.3)
        loss = (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum() + lse.sum()
        results.append((out, lse, *torch.autograd.grad(loss, [qk, v])))
    for a, b in zip(*results, strict=True):
        assert torch.allclose(a, b, atol=2e-5, rtol=1e-5), (a - b).abs().max()


def test_off_and_bad_setting(monkeypatch):
    monkeypatch.setenv(_native.ENV, "off")
    assert _native.op("window_softmax_", torch.zeros(1)) is None
    monkeypatch.setenv(_native.ENV, "maybe")
    with pytest.raises(ValueError, match="REFORMER_NATIVE='maybe'"):
        _native.op("window_softmax_", torch.zeros(1))


def test_other_dtypes_use_pytorch():
    assert _native.op("window_softmax_", torch.zeros(1, dtype=torch.float64)) is None
    assert _native.op("window_softmax_", torch.zeros(1, dtype=torch.bfloat16)) is None


def test_failed_build_warns_and_falls_back(monkeypatch, tmp_path):
    import torch.utils.cpp_extension as cpp

    def broken(**kwargs):
        raise RuntimeError("no compiler here")

    monkeypatch.setenv(_native.ENV, "on")
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))  # nothing cached there
    monkeypatch.setattr(cpp, "load", broken)
    _native._load.cache_clear()
    try:
        with pytest.warns(RuntimeWarning, match="no compiler here"):
            assert _native.op("window_softmax_", torch.zeros(1)) is None
    finally:
        _native._load.cache_clear()  # the next caller loads the real build again


@needs_compiler
def test_a_cached_build_is_loaded_without_the_builder(monkeypatch):
    """Once built, the kernels load without calling the builder (and so ninja, which
    rebuilt everything when another ninja came first on PATH)."""
    import torch.utils.cpp_extension as cpp

    monkeypatch.setenv(_native.ENV, "on")
    _native.build()  # built (or found) for real

    def builder(**kwargs):
        raise AssertionError("the builder ran although a finished build is cached")

    monkeypatch.setattr(cpp, "load", builder)
    _native._load.cache_clear()
    try:
        assert _native.available()
    finally:
        _native._load.cache_clear()


def test_a_build_is_announced_and_uses_the_wheels_ninja(monkeypatch, tmp_path, caplog):
    import torch.utils.cpp_extension as cpp

    ninja = pytest.importorskip("ninja")
    seen = {}

    def builder(**kwargs):  # stands in for the compile: records what it was given
        seen.update(kwargs, path=os.environ["PATH"])

    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    monkeypatch.setattr(cpp, "load", builder)
    path_before = os.environ["PATH"]
    with caplog.at_level(logging.INFO, logger="reformer"):
        build = _native.build()
    assert build.directory == tmp_path / _native.build_name() == Path(seen["build_directory"])
    assert build.seconds is not None and (build.directory / _native.BUILT_MARKER).is_file()
    notes = [r.getMessage() for r in caplog.records]
    assert len(notes) == 2 and "building" in notes[0] and "built" in notes[1], notes
    assert seen["path"].split(os.pathsep)[0] == ninja.BIN_DIR
    assert os.environ["PATH"] == path_before


def test_the_build_key_covers_sources_flags_and_versions(monkeypatch):
    name = _native.build_name()
    assert name == _native.build_name()  # stable
    monkeypatch.setattr(_native, "CFLAGS", [*_native.CFLAGS, "-DX"])
    assert _native.build_name() != name
    monkeypatch.undo()
    monkeypatch.setattr(torch, "__version__", "0.0.0")
    assert _native.build_name() != name


@needs_compiler
def test_gather_span_rows_matches_pytorch(monkeypatch):
    gather = native(monkeypatch, "gather_span_rows")
    g = torch.Generator().manual_seed(8)
    wide = torch.randn(50, 3 * 12, generator=g)
    rows = wide[:, 12:24]  # strided rows, as a head's columns of a group's projections
    values = wide[:, 24:]
    rows[7] = 0  # |q| < eps: divided by eps, as F.normalize does
    index = torch.randint(0, 50, (41,), generator=g)
    index[3] = 7
    raw, unit, norm, value_rows = gather(rows, values, index, 1e-12)
    expect = rows.index_select(0, index)
    assert torch.equal(raw, expect)
    assert torch.equal(value_rows, values.index_select(0, index))
    torch.testing.assert_close(norm, expect.norm(dim=-1, keepdim=True), rtol=1e-6, atol=0)
    torch.testing.assert_close(unit, torch.nn.functional.normalize(expect, dim=-1), rtol=1e-6,
                               atol=1e-7)
    with pytest.raises(RuntimeError, match="out of range"):
        gather(rows, values, torch.tensor([0, 50]), 1e-12)
    with pytest.raises(RuntimeError, match="values must have the rows' shape"):
        gather(rows, values[:40], index, 1e-12)


@needs_compiler
def test_scaled_query_rows_matches_pytorch(monkeypatch):
    """share * dO[index] and share * row[index], share = exp(z_block - top[index]) /
    total[index] (the round's weight in the fold's final softmax)."""
    scaled = native(monkeypatch, "scaled_query_rows")
    g = torch.Generator().manual_seed(14)
    N, E, S = 30, 7, 12
    d_out = torch.randn(N, 2 * E, generator=g)[:, E:]  # strided rows, as a head's columns
    row, top = torch.randn(N, generator=g), torch.randn(N, generator=g)
    total = 1 + torch.rand(N, generator=g) * 3
    index = torch.randperm(N, generator=g)[:S]
    block_lse = top[index] - torch.rand(S, generator=g) * 3
    d_o, share_row = scaled(d_out, row, top, total, index, block_lse)
    share = (block_lse - top[index]).exp() / total[index]
    torch.testing.assert_close(d_o, d_out[index] * share[:, None], rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(share_row, row[index] * share, rtol=1e-6, atol=1e-7)
    with pytest.raises(RuntimeError, match="out of range"):
        scaled(d_out, row, top, total, torch.tensor([N]), block_lse[:1])


@needs_compiler
@pytest.mark.parametrize("E", [5, 16, 64, 70])
def test_index_add_rows_matches_index_add(monkeypatch, E):
    """Repeated indices accumulate (the threads split columns, never rows); widths that are
    not a multiple of a cache line too."""
    add_rows = native(monkeypatch, "index_add_rows_")
    g = torch.Generator().manual_seed(15 + E)
    dst, src = torch.randn(20, E, generator=g), torch.randn(300, E, generator=g)
    index = torch.randint(0, 20, (300,), generator=g)
    expect = dst.clone().index_add_(0, index, src)
    add_rows(dst, index, src)
    torch.testing.assert_close(dst, expect, rtol=1e-5, atol=1e-5)
    with pytest.raises(RuntimeError, match="out of range"):
        add_rows(dst, torch.full((300,), 20), src)


@needs_compiler
def test_fold_round_matches_pytorch(monkeypatch):
    """Rounds folded by the native op equal the PyTorch fold, round by round, and their
    log-sum-exp equals logsumexp_r z_r; log-sum-exps near the self value (-1e5), where
    float32's spacing is 0.0078, give weights that still sum to one."""
    from reformer.attention._sorted import _fold_round

    fold = native(monkeypatch, "fold_round_")
    g = torch.Generator().manual_seed(9)
    N, E, R = 37, 6, 3
    out, top, total = torch.empty(N, E), torch.empty(N), torch.empty(N)
    expect, zs = None, []
    for r in range(R):
        o_s, z_s = torch.randn(N, E, generator=g), torch.randn(N, generator=g) * 3
        z_s[:5] = -1e5 + torch.rand(5, generator=g)  # some queries see only themselves
        o_s[:5] = 1.0  # and the same value in every round (the keys are permuted alike)
        unsort = torch.randperm(N, generator=g)
        unsort[:5] = torch.arange(5)
        unsort[5:] = 5 + torch.randperm(N - 5, generator=g)
        fold(out, top, total, o_s, z_s, unsort, r == 0)
        monkeypatch.setenv(_native.ENV, "off")
        expect = _fold_round(expect, o_s.view(1, N, E), z_s.view(1, N), unsort)
        monkeypatch.setenv(_native.ENV, "on")
        for got, want in zip((out, top, total), expect, strict=True):
            torch.testing.assert_close(got, want.view_as(got), rtol=1e-6, atol=1e-6)
        zs.append(z_s[unsort].double())
        lse = top.double() + total.double().log()
        torch.testing.assert_close(lse, torch.stack(zs).logsumexp(0), rtol=0, atol=1e-5)
        torch.testing.assert_close(out[:5], torch.ones(5, E), rtol=0, atol=2e-7)
    with pytest.raises(RuntimeError, match="out of range"):
        fold(out, top, total, o_s, z_s, torch.full((N,), -1), False)


@needs_compiler
def test_fold_rows_matches_the_pytorch_fold_of_some_rows(monkeypatch):
    """Sequence parallelism's fold of returned rows (parallel/rounds.py): rows picked from
    returned outputs in any order, into some positions of the running result, whose first
    round starts from top = -inf and total = 0; the rest stay as they were."""
    from reformer.attention._sorted import _Fold
    from reformer.parallel.rounds import _Buffers, _fold_rows

    fold_rows = native(monkeypatch, "fold_rows_")
    g = torch.Generator().manual_seed(12)
    N, E, S = 41, 7, 60
    got = _Fold(torch.zeros(N, E), torch.full((N,), float("-inf")), torch.zeros(N))
    want = _Fold(*(t.clone() for t in got))
    for _ in range(3):  # rounds
        o, z = torch.randn(S, E, generator=g), torch.randn(S, generator=g) * 3
        rows = torch.randperm(N, generator=g)[:30]  # distinct, some positions left out
        index = torch.randint(0, S, (30,), generator=g)
        fold_rows(*got, rows, o, z, index)
        monkeypatch.setenv(_native.ENV, "off")
        _fold_rows(want, rows, o, z, index, _Buffers())
        monkeypatch.setenv(_native.ENV, "on")
        for a, b in zip(got, want, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    assert torch.isinf(got.top).any() and torch.isfinite(got.top).any()  # some never folded
    with pytest.raises(RuntimeError, match="out of range"):
        fold_rows(*got, rows, o, z, torch.full((30,), S))


@needs_compiler
def test_signed_argmax_matches_pytorch(monkeypatch):
    signed_argmax = native(monkeypatch, "signed_argmax")
    g = torch.Generator().manual_seed(10)
    for F in (1, 4, 16, 33):
        proj = torch.randn(2, 3, 5, F, generator=g)
        proj[0, 0, 0] = 0  # every value tied: the first of [x, -x]
        proj[0, 0, 1, -1] = 9  # ties between halves: +9 at the end, -9 nowhere
        proj[1, 0, 0] = torch.linspace(-2, 2, F) if F > 1 else 2
        expect = torch.cat([proj, -proj], dim=-1).argmax(dim=-1)
        assert torch.equal(signed_argmax(proj), expect), F


@needs_compiler
@pytest.mark.parametrize("dtype", [torch.int16, torch.int32])
def test_bucket_sort_matches_stable_sort(monkeypatch, dtype):
    """The counting sort equals sort_by_bucket's stable sort and scatter: items and inverse,
    ties kept in position order, the padding bucket last, every (batch, head, round) row."""
    from reformer import hashing

    bucket_sort = native(monkeypatch, "bucket_sort")
    g = torch.Generator().manual_seed(16)
    B, H, R, L, NB = 2, 3, 4, 37, 6
    buckets = torch.randint(0, NB, (B, H, R, L), generator=g)
    buckets[0, 0, 0] = 2  # one bucket for the whole round: the identity
    buckets[1, 2, :, -5:] = NB  # padding, which sorts last
    buckets = buckets.to(dtype)
    items, undo = bucket_sort(buckets)
    monkeypatch.setenv(_native.ENV, "off")  # sort_by_bucket's PyTorch path
    expect_items, expect_undo = hashing.sort_by_bucket(buckets)
    assert torch.equal(items, expect_items) and torch.equal(undo, expect_undo)
    assert torch.equal(items[0, 0, :L], torch.arange(L))
    with pytest.raises(RuntimeError, match=">= 0"):
        bucket_sort(torch.full((1, 1, 1, 3), -1, dtype=dtype))


@needs_compiler
def test_bias_relu_matches_pytorch(monkeypatch):
    bias_relu = native(monkeypatch, "bias_relu_")
    g = torch.Generator().manual_seed(11)
    pre, bias = torch.randn(37, 19, generator=g), torch.randn(19, generator=g)
    expect = torch.relu(pre + bias)
    assert bias_relu(pre, bias) is pre  # in place
    assert torch.equal(pre, expect)


@needs_compiler
def test_bias_relu_of_bfloat16_rounds_the_float32_sum_once(monkeypatch):
    """Under autocast pre is bf16 and the bias float32: the sum is taken in float32 and
    rounded to bf16 once (to nearest even), as PyTorch's mixed-type add_ does; NaN stays."""
    bias_relu = native(monkeypatch, "bias_relu_")
    g = torch.Generator().manual_seed(12)
    pre, bias = torch.randn(37, 19, generator=g).bfloat16(), torch.randn(19, generator=g)
    pre[3, 4] = float("nan")
    expect = torch.relu(pre.float() + bias).bfloat16()
    assert bias_relu(pre, bias) is pre
    torch.testing.assert_close(pre, expect, rtol=0, atol=0, equal_nan=True)


@needs_compiler
def test_feed_forward_hidden_native_matches_autograd_path(monkeypatch):
    from reformer import ReformerConfig
    from reformer.layers import FeedForward

    monkeypatch.setenv(_native.ENV, "on")
    torch.manual_seed(0)
    ff = FeedForward(ReformerConfig(vocab_size=8, d_model=16, n_heads=2, d_ff=40))
    x = torch.randn(23, 16)
    with torch.no_grad():
        fast = ff.hidden(x)
    torch.testing.assert_close(fast, torch.relu(ff.w_in(x)), rtol=1e-6, atol=1e-6)


@needs_compiler
@pytest.mark.parametrize("W", [1, 2, 3])
def test_unwindow_matches_pytorch(monkeypatch, W):
    """Windows summed onto their span (the adjoint of the overlapping views), then through
    F.normalize's backward (autograd as the reference)."""
    from reformer.attention._sorted import _unwindow, _windows

    unwindow = native(monkeypatch, "unwindow")
    g = torch.Generator().manual_seed(12 + W)
    G, nb, M, E = 2, 5, 3, 4
    grad_windows = torch.randn(G, nb, W * M, E, generator=g)
    expect = _unwindow(grad_windows, W, M)
    torch.testing.assert_close(unwindow(grad_windows, W, None, None, 0.0), expect,
                               rtol=1e-6, atol=1e-6)
    span = torch.randn(G, (nb + W - 1) * M, E, generator=g)
    span[0, 2] = 0  # |q| < eps
    raw = span.clone().requires_grad_(True)
    unit = torch.nn.functional.normalize(raw, dim=-1, eps=1e-12)
    (through_norm,) = torch.autograd.grad(unit, raw, expect)
    # the kernel's own check of _windows: the adjoint of the views it differentiates
    assert torch.allclose((_windows(span, nb, W, M) * grad_windows).sum(), (span * expect).sum(),
                          rtol=1e-5)
    got = unwindow(grad_windows, W, unit.detach(), span.norm(dim=-1, keepdim=True), 1e-12)
    torch.testing.assert_close(got, through_norm, rtol=1e-5, atol=1e-5)


@needs_compiler
def test_softmax_backward_matches_pytorch(monkeypatch):
    fused = native(monkeypatch, "softmax_backward_")
    g = torch.Generator().manual_seed(13)
    grad_p, probs = torch.randn(2, 3, 4, 5, generator=g), torch.rand(2, 3, 4, 5, generator=g)
    row = torch.randn(2, 3, 4, generator=g)
    expect = (grad_p - row.unsqueeze(-1)) * probs
    assert fused(grad_p, row, probs) is grad_p
    torch.testing.assert_close(grad_p, expect, rtol=1e-6, atol=1e-6)


def _sorted_case(G, Lp, E, R, seed):
    g = torch.Generator().manual_seed(seed)
    qk, v = (torch.randn(G, Lp, E, generator=g) for _ in range(2))
    qk[0, 3] = 0  # |q| < eps: F.normalize divides by eps
    s_pos = torch.stack([torch.cat([torch.randperm(Lp, generator=g) for _ in range(R)])
                         for _ in range(G)])
    return qk, v, s_pos


@needs_compiler
@pytest.mark.parametrize("G,Lp,E,R,M,offsets,causal", [
    (1, 512, 16, 4, 16, [-1, 0], True),  # several chunks per thread, rounds wrapping
    (3, 60, 5, 3, 4, [-2, -1, 0, 1], True),  # a window reaching both ways; odd E
    (2, 16, 4, 4, 8, [-1, 0, 1], False),  # two chunks per round: windows wrap within it
    (1, 8, 4, 1, 8, [-1, 0], True),  # one chunk: its window holds it twice
])
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("key_offset", [0.0, 0.5])  # unit keys; q / sqrt(|q|^2 + c)
def test_fused_sorted_kernel_matches_pytorch(monkeypatch, G, Lp, E, R, M, offsets, causal,
                                            threads, key_offset):
    """csrc/lsh_chunks.cpp against the PyTorch blockwise kernel: outputs, log-sum-exps and
    both gradients (through the log-sum-exp too). With two threads, rows of chunks outside a
    thread's run are added after the round. Keys with an offset (hf_compat's) alike."""
    from reformer.attention import _sorted

    native(monkeypatch, "lsh_forward_")
    assert _native.blas(), "PyTorch's BLAS sgemm was not found"
    calls = []
    applies = _sorted._fused_applies
    monkeypatch.setattr(_sorted, "_fused_applies", lambda *a: calls.append(applies(*a)) or
                        calls[-1])
    qk0, v0, s_pos = _sorted_case(G, Lp, E, R, seed=Lp + M + R)
    threads_before = torch.get_num_threads()
    torch.set_num_threads(threads)
    results = []
    try:
        for setting in ("on", "off"):
            monkeypatch.setenv(_native.ENV, setting)
            qk, v = qk0.clone().requires_grad_(True), v0.clone().requires_grad_(True)
            out, lse = sorted_window_attention(qk, v, s_pos, chunk_length=M, offsets=offsets,
                                               causal=causal, key_offset=key_offset)
            weights = torch.linspace(-1, 1, out.numel()).view_as(out)
            lse_weights = torch.linspace(0, 1, lse.numel()).view_as(lse)
            loss = (out * weights).sum() + (lse * lse_weights).sum()
            results.append((out, lse, *torch.autograd.grad(loss, [qk, v])))
    finally:
        torch.set_num_threads(threads_before)
    assert calls == [True, False]  # the chunkwise kernel ran when "on", the blocks when "off"
    for a, b in zip(*results, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=2e-5)
    if key_offset:  # the offset changes the keys (else this case would test nothing new)
        plain = sorted_window_attention(qk0, v0, s_pos, chunk_length=M, offsets=offsets,
                                        causal=causal)[0]
        assert (plain - results[0][0]).abs().max() > 1e-3


@needs_compiler
@pytest.mark.parametrize("threads", [1, 2])
def test_fused_sorted_kernel_takes_bfloat16_rows(monkeypatch, threads):
    """bf16 rows (autocast's projections): products in bf16 with float32 results, the rest
    in float32. Held against the float32 blocks on the same (bf16-valued) rows: within the
    rounding of the probabilities and gradients to bf16 as product operands (2**-9)."""
    from reformer.attention import _sorted

    native(monkeypatch, "lsh_forward_")
    if not _native.blas(torch.bfloat16):
        pytest.skip("this PyTorch build exports no bf16 matrix product (MKL)")
    calls = []
    applies = _sorted._fused_applies
    monkeypatch.setattr(_sorted, "_fused_applies", lambda *a: calls.append(applies(*a)) or
                        calls[-1])
    qk0, v0, s_pos = _sorted_case(2, 256, 32, 3, seed=5)
    qk0, v0 = qk0.bfloat16(), v0.bfloat16()
    threads_before = torch.get_num_threads()
    torch.set_num_threads(threads)
    results = []
    try:
        for setting, dtype in (("on", torch.bfloat16), ("off", torch.float32)):
            monkeypatch.setenv(_native.ENV, setting)
            qk, v = (t.to(dtype).requires_grad_(True) for t in (qk0, v0))
            out, lse = sorted_window_attention(qk, v, s_pos, chunk_length=16, offsets=[-1, 0],
                                               causal=True)
            assert out.dtype == dtype and lse.dtype == torch.float32
            loss = (out.float() * torch.linspace(-1, 1, out.numel()).view_as(out)).sum()
            grads = torch.autograd.grad(loss, [qk, v])
            assert all(g.dtype == dtype for g in grads)
            results.append((out, *grads))
    finally:
        torch.set_num_threads(threads_before)
    assert calls == [True, False]
    for got, expect in zip(*results, strict=True):
        error = (got.float() - expect).abs().max() / expect.abs().max()
        assert error < 1e-2, error


@needs_compiler
def test_fused_backward_reads_bfloat16_or_float32_d_out_alike(monkeypatch):
    """With bf16 rows, lsh_backward_ takes dO in bf16 (autograd's, through the output cast
    to the rows' type) or float32: the same values give exactly the same gradients."""
    from reformer.attention._sorted import _fused_args

    native(monkeypatch, "lsh_forward_")
    if not _native.blas(torch.bfloat16):
        pytest.skip("this PyTorch build exports no bf16 matrix product (MKL)")
    qk, v, s_pos = _sorted_case(1, 256, 32, 2, seed=3)
    qk, v = qk.bfloat16(), v.bfloat16()
    args = _fused_args(qk, v, s_pos, (16, [-1, 0], True, None, 0.0, 0.0))
    out, top, total = torch.empty(256, 32), torch.empty(256), torch.empty(256)
    torch.ops.reformer.lsh_forward_(out, top, total, *args)
    d_out = torch.randn(256, 32, generator=torch.Generator().manual_seed(4)).bfloat16()
    row = (d_out.float() * out).sum(-1)
    grads = []
    for d in (d_out, d_out.float()):
        gq, gv = torch.zeros(256, 32), torch.zeros(256, 32)
        torch.ops.reformer.lsh_backward_(gq, gv, *args[:3], d, row, top, total, *args[3:])
        grads.append((gq, gv))
    assert grads[0][0].abs().sum() > 0
    for a, b in zip(*grads, strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("setting", ["on", "off"])  # the fused kernel, the blocks
def test_a_query_that_sees_only_itself_keeps_its_value_in_bfloat16(monkeypatch, setting):
    """Position 0 under the causal mask sees only itself (the self value, -1e5) in each of
    its R rounds, so the rounds fold to weights 1/R. With bf16 log-sum-exps, log R vanished
    next to -1e5 (bf16 spacing there: 512), each round got weight 1: out = R * v."""
    monkeypatch.setenv(_native.ENV, setting)
    qk, v, s_pos = _sorted_case(1, 64, 8, 4, seed=11)
    out, lse = sorted_window_attention(qk.bfloat16(), v.bfloat16(), s_pos, chunk_length=8,
                                       offsets=[-1, 0], causal=True)
    torch.testing.assert_close(out[0, 0].float(), v[0, 0].bfloat16().float(), rtol=1e-2,
                               atol=1e-2)


@needs_compiler
def test_fused_sorted_kernel_checks_its_inputs(monkeypatch):
    forward = native(monkeypatch, "lsh_forward_")
    qk, v, s_pos = _sorted_case(1, 32, 4, 2, seed=3)
    q, vr = qk.view(32, 4), v.view(32, 4)
    out, top, total = torch.empty(32, 4), torch.empty(32), torch.empty(32)
    args = (2, 8, -1, 2, True, _chunked.MASK_VALUE, _chunked.SELF_VALUE, 1e-12)
    with pytest.raises(RuntimeError, match="position out of range"):
        forward(out, top, total, q, vr, s_pos + 32, *args)
    with pytest.raises(RuntimeError, match="must include 0"):
        forward(out, top, total, q, vr, s_pos, 2, 8, 1, 2, *args[4:])
    with pytest.raises(RuntimeError, match="top and total"):
        forward(out, top[:16], total, q, vr, s_pos, *args)


def test_fused_sorted_kernel_leaves_masks_dedup_and_dropout_to_pytorch():
    from reformer.attention._sorted import _fused_applies

    q, pos = torch.zeros(1, 8, 4), torch.arange(8).view(1, 8)
    strided = q.transpose(1, 2).contiguous().transpose(1, 2)
    assert not _fused_applies(q, q, pos, torch.ones(1, 8, dtype=torch.bool), None, 0.0)
    assert not _fused_applies(q, q, pos, None, lambda *a: None, 0.0)
    assert not _fused_applies(q, q, pos, None, None, 0.1)
    assert not _fused_applies(q, strided, pos, None, None, 0.0)
    assert not _fused_applies(q, q, pos.int(), None, None, 0.0)


def test_the_wheel_ships_every_kernel_source():
    # The kernels compile on the user's machine from the installed package's csrc/: a file
    # that pyproject's package-data misses (softmax_row.h once was) breaks every build there.
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    root = Path(__file__).resolve().parents[1]
    setuptools = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]
    patterns = setuptools["package-data"]["reformer"]
    sources = sorted(p.name for p in (root / "src" / "reformer" / "csrc").iterdir())
    assert {"softmax_row.h", "lsh_chunks.cpp"} <= set(sources)
    missed = [s for s in sources if not any(fnmatch.fnmatch(f"csrc/{s}", p) for p in patterns)]
    assert not missed, f"add {missed} to [tool.setuptools.package-data] in pyproject.toml"


@needs_compiler
def test_native_row_gathers_take_hf_key_offset(monkeypatch):
    """With a padding mask the blocks run, with csrc/sorted_rows.cpp's gathers and window
    sums: keys q / sqrt(|q|^2 + c) (hf_compat) there too, against the PyTorch blocks."""
    native(monkeypatch, "gather_span_rows")
    qk0, v0, s_pos = _sorted_case(2, 64, 8, 2, seed=5)
    valid = torch.ones(2, 64, dtype=torch.bool)
    valid[1, 50:] = False
    results = []
    for setting in ("on", "off"):
        monkeypatch.setenv(_native.ENV, setting)
        qk, v = qk0.clone().requires_grad_(True), v0.clone().requires_grad_(True)
        out, _ = sorted_window_attention(qk, v, s_pos, chunk_length=8, offsets=[-1, 0],
                                         causal=True, valid=valid, key_offset=0.3)
        weights = torch.linspace(-1, 1, out.numel()).view_as(out)
        results.append((out, *torch.autograd.grad((out * weights).sum(), [qk, v])))
    for a, b in zip(*results, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=2e-5)
