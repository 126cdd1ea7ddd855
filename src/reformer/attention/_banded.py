"""The cuda plan's attention cores (plan.py): every head, every round, one attention call.

LSH attention (lsh.py) is softmax attention of the bucket-sorted sequence of all R*Lp items
under a *banded* mask: sorted chunk i sees the chunks at fixed offsets from it, wrapping
around. Here that is computed the way a GPU wants it, with a number of operators that does not
depend on L: sort the items, gather their rows in sorted order (queries raw, keys unit rows,
values), make one attention call over all B*H sorted sequences with the band as a block mask
(block = chunk) and the masks as a score function of the *original* positions, get each
item's output and log-sum-exp, unsort them and fold the rounds, ``o = sum_r softmax_r(z) o_r``.
Local attention is the same call on the sequence in position order with a sliding,
non-wrapping band; full attention the same call with no band.

The call is FlexAttention (``torch.nn.attention.flex_attention``, compiled to Triton) on a
CUDA device. Elsewhere (the cuda plan forced on the CPU, or a torch without FlexAttention) the
same contract is computed with plain tensor operators (:func:`_band_attention`): the band's
key windows gathered chunk by chunk, (G, n, M, K) scores at once. Both produce exactly the
blockwise reference's function (tests/attention/test_banded.py, float64).

Shapes: B batch, H heads, G = B*H, Lp padded length, E d_head, R rounds, N = R*Lp sorted items
(Lp for local and full), M chunk length, n = N/M chunks, W window chunks, K = W*M.
Prefixes: ``s_`` sorted order, ``c_`` chunked.

Decisions:
- Masks are *added* in the score function, -1e9 for a later or padded key and -1e5 for the
  query's own position, as in the blockwise kernels (_chunked.py), not removed by a mask
  function: a row whose keys are all masked then averages them as the reference does, instead
  of producing a log-sum-exp of -inf that would turn the round fold into NaN.
- The block mask's index arrays are built directly as bands, both ways (key blocks per query
  block and query blocks per key block, each W long): ``BlockMask.from_kv_blocks`` would
  transpose through a dense n x n matrix, 16 GiB at a million tokens.
- ``dedup_rounds`` and attention dropout stay on the blockwise path (the cores check).
"""

from __future__ import annotations

import functools
import warnings

import torch
import torch.nn.functional as F

from reformer.attention._chunked import lse_dtype, mask_values, unit_keys
from reformer.attention.base import consecutive
from reformer.hashing import sort_by_bucket

try:  # FlexAttention: torch >= 2.5
    from torch.nn.attention import flex_attention as _flex_module
except ImportError:  # pragma: no cover - older torch
    _flex_module = None
FLEX_ON_CPU = False  # tests only: run FlexAttention's eager reference on CPU tensors
_flex_failed: list[str] = []  # why compiling FlexAttention failed here, once it has


def flex_available(device: torch.device) -> bool:
    """Whether attention on ``device`` goes through FlexAttention."""
    return (_flex_module is not None and not _flex_failed
            and (torch.device(device).type == "cuda" or FLEX_ON_CPU))


def lsh_banded(qk: torch.Tensor, v: torch.Tensor, buckets: torch.Tensor, *,
               chunk_length: int, offsets: list[int], causal: bool,
               attention_mask: torch.Tensor | None, key_offset: float = 0.0) -> torch.Tensor:
    """LSH attention given bucket ids, all heads and rounds at once.

    Args:
        qk, v: (B, H, Lp, E), Lp a multiple of ``chunk_length``.
        buckets: (B, H, R, Lp) ids (padding carries NB and sorts last).
        offsets: the window's chunk offsets (``window_offsets``), wrapping around.
        attention_mask: (B, Lp) bool (True = real) or None.
        key_offset: c in the keys ``q / sqrt(|q|^2 + c)`` (0: unit keys).

    Returns:
        (B, H, Lp, E).
    """
    B, H, Lp, E = qk.shape
    R = buckets.shape[2]
    s_items, _ = sort_by_bucket(buckets, inverse=False)  # (B, H, N)
    s_pos = s_items % Lp  # original position of each sorted item
    rows = s_pos.unsqueeze(-1).expand(B, H, R * Lp, E)
    k = unit_keys(qk, key_offset)  # before the R-fold copies
    s_q, s_k, s_v = qk.gather(2, rows), k.gather(2, rows), v.gather(2, rows)  # (B, H, N, E)
    s_valid = None if attention_mask is None else attention_mask.gather(
        1, s_pos.view(B, -1)).view(B, H, -1)  # (B, H, N)
    s_out, s_lse = attend(s_q, s_k, s_v, s_pos, s_valid, chunk_length=chunk_length,
                          offsets=offsets, circular=True, causal=causal, self_mask=True,
                          scale=1.0)
    # o = sum_r softmax_r(z) o_r: the weights per (round, position), then each sorted output
    # weighted and added into its position (no (R, Lp, E) unsorted copy)
    z = torch.empty_like(s_lse).scatter_(2, s_items, s_lse).view(B, H, R, Lp)
    w = torch.softmax(z, dim=2).view(B, H, R * Lp).gather(2, s_items)  # (B, H, N) sorted
    s_weighted = s_out * w.unsqueeze(-1).to(s_out.dtype)
    return s_out.new_zeros(B, H, Lp, E).scatter_add_(2, rows, s_weighted)  # (B, H, Lp, E)


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pos: torch.Tensor,
           valid: torch.Tensor | None, *, chunk_length: int, offsets: list[int] | None,
           circular: bool, causal: bool, self_mask: bool,
           scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax attention of each chunk of queries over the chunks at ``offsets`` from it.

    Args:
        q, k, v: (B, H, N, E), N a multiple of ``chunk_length``.
        pos: (B, H, N) or (N,) each row's original position (for the masks).
        valid: (B, H, N) bool, False = padded key, or None.
        offsets: chunk offsets of the window; None = every key (full attention).
        circular: windows wrap around the ends (LSH) or stop there (local).

    Returns:
        out (B, H, N, E) in q's dtype, log-sum-exp (B, H, N) in at least float32.
    """
    spec = (chunk_length, offsets, circular, causal, self_mask, scale)
    if flex_available(q.device) and (offsets is None or consecutive(offsets)):
        try:
            return _flex_attention(q, k, v, pos, valid, spec)
        except torch.OutOfMemoryError:
            raise
        except Exception as err:  # e.g. no Triton for this GPU: the same function, slower
            if not q.is_cuda:
                raise
            _flex_failed.append(f"{type(err).__name__}: {err}"[:500])
            warnings.warn("FlexAttention failed to compile or run here, so attention runs "
                          f"as tensor operators (slower, more memory): {_flex_failed[0]}",
                          RuntimeWarning, stacklevel=2)
    return _band_attention(q, k, v, pos, valid, spec)


def _bias(qpos: torch.Tensor, kpos: torch.Tensor, kvalid: torch.Tensor | None,
          causal: bool, self_mask: bool, dtype: torch.dtype) -> torch.Tensor | float:
    """The additive mask for query/key positions that broadcast together (0.0 when nothing
    is masked). Pointwise and allocation-free, as FlexAttention's score function must be."""
    invalid_value, self_value = mask_values(dtype)
    bias: torch.Tensor | float = 0.0
    if causal:
        bias = bias + (kpos > qpos).to(dtype) * invalid_value
    if kvalid is not None:
        bias = bias + (~kvalid).to(dtype) * invalid_value
    if self_mask:
        bias = bias + (kpos == qpos).to(dtype) * self_value
    return bias


def _offsets(offsets: list[int], device: torch.device) -> torch.Tensor:
    """(1, W) the window's offsets, made on the device when consecutive (no copy from the
    host); others (Hugging Face's repeated chunks) are copied."""
    if consecutive(offsets):
        return torch.arange(offsets[0], offsets[-1] + 1, device=device).unsqueeze(0)
    return torch.tensor(offsets, device=device).unsqueeze(0)


def _band_attention(q, k, v, pos, valid, spec) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`attend` with tensor operators: each chunk's window of keys gathered, then all
    (G, n, M, K) scores at once."""
    M, offsets, circular, causal, self_mask, scale = spec
    B, H, N, E = q.shape
    G, n = B * H, N // M
    pos = pos.expand(B, H, N).reshape(G, n, M)
    if offsets is None:  # full attention: one window of every chunk
        idx, inside = torch.arange(n, device=q.device).repeat(n, 1), None
    else:
        idx = torch.arange(n, device=q.device).unsqueeze(1) + _offsets(offsets, q.device)
        inside = None if circular else (idx >= 0) & (idx < n)
        idx = idx % n
    W = idx.shape[1]

    def windows(x: torch.Tensor) -> torch.Tensor:  # (G, n, M, ...) -> (G, n, W*M, ...)
        return x.index_select(1, idx.reshape(-1)).view(G, n, W * M, *x.shape[3:])

    c_q = q.reshape(G, n, M, E)
    k_win, v_win = windows(k.reshape(G, n, M, E)), windows(v.reshape(G, n, M, E))
    kpos = windows(pos)  # (G, n, K)
    kvalid = None if valid is None else windows(valid.reshape(G, n, M))
    if inside is not None:  # chunks beyond the ends: masked keys
        outside = ~inside.view(1, n, W, 1).expand(1, n, W, M).reshape(1, n, W * M)
        kvalid = ~outside if kvalid is None else kvalid & ~outside
    work = lse_dtype(q.dtype)
    scores = torch.matmul(c_q, k_win.transpose(-1, -2)).to(work) * scale  # (G, n, M, K)
    kv = None if kvalid is None else kvalid.unsqueeze(2)
    scores = scores + _bias(pos.unsqueeze(-1), kpos.unsqueeze(2), kv, causal, self_mask, work)
    lse = torch.logsumexp(scores, dim=-1)  # (G, n, M)
    probs = torch.exp(scores - lse.unsqueeze(-1)).to(v.dtype)
    out = torch.matmul(probs, v_win)  # (G, n, M, E)
    return out.view(B, H, N, E), lse.view(B, H, N)


def _flex_attention(q, k, v, pos, valid, spec) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`attend` through FlexAttention: one call, the band as its block mask."""
    M, offsets, circular, causal, self_mask, scale = spec
    B, H, N, E = q.shape
    pos = pos.expand(B, H, N)
    work = lse_dtype(q.dtype)

    def score_mod(score, b, h, q_idx, kv_idx):
        kvalid = None if valid is None else valid[b, h, kv_idx]
        return score + _bias(pos[b, h, q_idx], pos[b, h, kv_idx], kvalid, causal, self_mask,
                             score.dtype)

    block_mask = None if offsets is None else band_block_mask(N // M, tuple(offsets), circular,
                                                              M, q.device)
    # The forward's tiles must divide the block (chunk) size, and its default is 128 wide;
    # the backward keeps only the configurations whose tiles divide it (inductor's filter).
    tile = {} if M >= 128 else {"fwd_BLOCK_M": M, "fwd_BLOCK_N": M}
    out, aux = _flex_call(q.is_cuda)(
        q, k, v, score_mod=score_mod, block_mask=block_mask, scale=scale,
        return_aux=_flex_module.AuxRequest(lse=True), kernel_options=tile or None)
    return out, aux.lse.to(work)


@functools.cache
def _flex_call(compiled: bool):
    """flex_attention, compiled for CUDA (its Triton kernels), eager elsewhere (tests)."""
    fn = _flex_module.flex_attention
    return torch.compile(fn, dynamic=False) if compiled else fn


@functools.lru_cache(maxsize=16)  # the same band for every layer of a step, both passes
def band_block_mask(n: int, offsets: tuple[int, ...], circular: bool, block: int,
                    device: torch.device, compact: bool | None = None):
    """The BlockMask of a band: query block i sees key blocks i + o for o in ``offsets``
    (modulo n when ``circular``, else those inside [0, n)); built from index arrays, both
    directions, (n, W) each on a GPU: the Triton kernels read them through their strides.
    FlexAttention's eager reference (CPU) reads an array's width as the number of blocks, so
    there they are padded to (n, n) (``compact`` None: by the device)."""
    if compact is None:
        compact = torch.device(device).type == "cuda"

    def band(sign: int) -> tuple[torch.Tensor, torch.Tensor]:
        idx = torch.arange(n, device=device).unsqueeze(1) + sign * _offsets(offsets, device)
        inside = torch.ones_like(idx, dtype=torch.bool) if circular else (idx >= 0) & (idx < n)
        idx = idx % n
        # the blocks inside first, ascending; the rest (never read) after them
        key = torch.where(inside, idx, idx + n)
        idx = key.sort(dim=1).values % n
        count = inside.sum(dim=1)
        if not compact:  # the eager reference reads the width as the number of key blocks
            idx = F.pad(idx, (0, n - idx.shape[1]))
        return count.to(torch.int32).view(1, 1, n), idx.to(torch.int32).view(1, 1, n, -1)

    offsets = list(offsets)
    kv_num, kv_idx = band(+1)
    q_num, q_idx = band(-1)  # key block j is seen by query blocks j - o
    before, width = -offsets[0], len(offsets)

    def in_band(b, h, q_idx, kv_idx):  # the same band, element by element
        step = kv_idx // block - q_idx // block + before
        if circular:
            step = step % n
        return (step >= 0) & (step < width)

    # Every block of the band is "full": the kernels skip in_band there, and no other block
    # is visited. (FlexAttention's eager reference ignores the block arrays and applies
    # in_band to every pair.)
    none = torch.zeros_like(kv_num)
    return _flex_module.BlockMask(
        (n * block, n * block), none, kv_idx, kv_num, kv_idx, none, q_idx, q_num, q_idx,
        BLOCK_SIZE=(block, block), mask_mod=in_band)
