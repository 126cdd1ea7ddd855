"""Native CPU kernels (C++ in ``csrc/``), compiled on first use with PyTorch's JIT builder.

PyTorch runs the masked softmax of a block of attention scores as about ten separate passes
over memory (mask arithmetic, softmax, the maxima for the log-sum-exp); one fused C++ pass
makes the LSH kernel's forward about a quarter faster on CPU. The LSH kernel's row gathers
are fused with the work that follows them the same way (``csrc/sorted_rows.cpp``), and so
are the hash's argmax over [x, -x] (``csrc/hashing.cpp``) and the feed-forward's bias and
ReLU (``csrc/feed_forward.cpp``); the sort by bucket is a counting sort
(``csrc/hashing.cpp``). Where it applies, the whole LSH kernel runs chunk by chunk
(``csrc/lsh_chunks.cpp``), its small matrix products through the BLAS that PyTorch links.
The kernels are optional: every caller keeps its PyTorch path, which the tests hold the
native one against.

Decisions:
- Compiled on first use (``torch.utils.cpp_extension.load``, 55 s once on 2 busy cores; the
  result is cached under ``TORCH_EXTENSIONS_DIR``, default ``~/.cache/torch_extensions``),
  not at install time, so that installing the package needs no compiler. Without one, or if
  the build fails, a warning says so once and the PyTorch path runs.
- ``-march=native``: the build is for this CPU. Its name carries a hash of the CPU's feature
  flags, so a cache shared between different machines never loads another CPU's build.
  ``-mprefer-vector-width=512``: on AVX-512 CPUs gcc otherwise vectorises with 256-bit
  registers; with 512 the LSH kernel's bf16 forward at 64K went from 69 to 54 ms (one head,
  medians of 7 calls; no effect where there is no AVX-512).
- Shared inline code lives in headers (``csrc/*.h``). The builder's cache key covers the
  sources and the flags only, so a hash of the headers is passed as a ``-D`` flag: a changed
  header rebuilds.
- ``csrc/lsh_chunks.cpp`` calls BLAS's ``sgemm_`` and, for bfloat16 rows, MKL's
  ``cblas_gemm_bf16bf16f32``, which PyTorch's CPU library exports (MKL on x86-64). They are
  declared weak: where one is missing the other kernels still load, and :func:`blas` tells
  the LSH kernel to run blockwise for that type.
- ``REFORMER_NATIVE=off`` skips the native kernels (``on``, the default, uses them when they
  build).
"""

from __future__ import annotations

import functools
import hashlib
import os
import platform
import shutil
import warnings
from pathlib import Path

import torch

ENV = "REFORMER_NATIVE"
CSRC = Path(__file__).parent / "csrc"
SOURCES = [CSRC / name for name in ("window_softmax.cpp", "sorted_rows.cpp", "lsh_chunks.cpp",
                                    "hashing.cpp", "feed_forward.cpp",
                                    "cpu_allocator.cpp")]
HEADERS = [CSRC / "softmax_row.h"]
CFLAGS = ["-O3", "-march=native", "-mprefer-vector-width=512", "-fopenmp", "-fno-trapping-math",
          "-fno-math-errno"]


def _cpu_tag() -> str:
    """A short hash of this CPU's model and feature flags (the instruction sets it may use)."""
    text = platform.machine()
    try:
        info = Path("/proc/cpuinfo").read_text()
        text += "".join(line for line in info.splitlines()
                        if line.startswith(("flags", "Features", "model name")))
    except OSError:
        text += platform.processor()
    return hashlib.sha1(text.encode()).hexdigest()[:10]


def _headers_flag() -> str:
    """A define carrying a hash of the headers: the builder's cache key covers the sources
    and the flags but not what the sources include, so a changed header must change a flag."""
    digest = hashlib.sha1(b"".join(h.read_bytes() for h in HEADERS)).hexdigest()[:10]
    return f"-DREFORMER_HEADERS_{digest}"


def _ensure_ninja() -> None:
    """Put the ``ninja`` wheel's binary on PATH when there is no system one (the builder
    runs ``ninja`` by name)."""
    if shutil.which("ninja"):
        return
    try:
        import ninja
    except ImportError:
        return
    os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")


def enabled() -> bool:
    setting = os.environ.get(ENV, "on")
    if setting not in ("on", "off"):
        raise ValueError(f"{ENV}={setting!r} is not understood; use 'on' (the default: native "
                         "CPU kernels when they compile) or 'off' (PyTorch ops only)")
    return setting == "on"


@functools.cache
def _load() -> bool:
    """Build (or find in the cache) and load the kernels once per process; False on failure."""
    try:
        from torch.utils.cpp_extension import load

        _ensure_ninja()
        load(name=f"reformer_native_{_cpu_tag()}", sources=[str(s) for s in SOURCES],
             extra_cflags=[*CFLAGS, _headers_flag()], extra_ldflags=["-fopenmp"],
             is_python_module=False, verbose=False)
        return True
    except Exception as error:  # no compiler, no ninja, a failed build: fall back
        warnings.warn(f"reformer: the native CPU kernels did not build ({str(error)[:300]}); "
                      "using PyTorch ops instead, which are slower. Install a C++ compiler "
                      f"and ninja, or set {ENV}=off to skip the attempt.", RuntimeWarning,
                      stacklevel=3)
        return False


def available() -> bool:
    """Whether the native kernels are enabled and built (building them on first call)."""
    return enabled() and _load()


def op(name: str, t: torch.Tensor, dtypes: tuple[torch.dtype, ...] = (torch.float32,)):
    """``torch.ops.reformer.<name>`` when it applies to ``t`` (on the CPU, of one of the
    ``dtypes`` the kernel takes) and the kernels are available, else None (the caller runs its
    PyTorch ops)."""
    if t.dtype not in dtypes or t.device.type != "cpu" or not available():
        return None
    return _resolve(name)


@functools.cache
def blas(dtype: torch.dtype = torch.float32) -> bool:
    """Whether the kernels that call BLAS (csrc/lsh_chunks.cpp) found PyTorch's matrix product
    for ``dtype``: sgemm for float32, MKL's gemm_bf16bf16f32 for bfloat16."""
    if dtype == torch.bfloat16:
        return bool(torch.ops.reformer.lsh_chunks_bf16_available())
    return dtype == torch.float32 and bool(torch.ops.reformer.lsh_chunks_available())


@functools.cache
def _resolve(name: str):
    return getattr(torch.ops.reformer, name)  # looked up once: called per block of rows
