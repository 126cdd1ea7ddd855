"""Native CPU kernels (C++ in ``csrc/``), compiled on first use with PyTorch's JIT builder.

PyTorch runs the masked softmax of a block of attention scores as about ten separate passes
over memory (mask arithmetic, softmax, the maxima for the log-sum-exp); one fused C++ pass
makes the LSH kernel's forward about a quarter faster on CPU. The LSH kernel's row gathers
are fused with the work that follows them the same way (``csrc/sorted_rows.cpp``), and so
are the hash's argmax over [x, -x] (``csrc/hashing.cpp``), the feed-forward's bias and
ReLU (``csrc/feed_forward.cpp``) and keyed dropout masks (``csrc/dropout.cpp``); the sort by
bucket is a counting sort (``csrc/hashing.cpp``). Where it applies, the whole LSH kernel runs
chunk by chunk (``csrc/lsh_chunks.cpp``), its small matrix products through the BLAS that
PyTorch links.
The kernels are optional: every caller keeps its PyTorch path, which the tests hold the
native one against.

Decisions:
- Compiled on first use (``torch.utils.cpp_extension.load``: 55-100 s once on 2 busy cores),
  not at install time, so that installing the package needs no compiler; ``reformer
  build-kernels`` (run by ``make test`` and ``make demo``) does it ahead, e.g. once per
  cluster image. Without a compiler, or if the build fails, a warning says so once and the
  PyTorch path runs.
- Our own cache key, not the builder's: the build lives in
  ``$TORCH_EXTENSIONS_DIR/reformer_native_<key>`` (default ``~/.cache/torch_extensions``),
  ``<key>`` a hash of the sources, headers, flags, this CPU, and the PyTorch and Python
  versions, and a finished build leaves a ``built`` marker beside the library. With the
  marker there the library is loaded directly and the builder is never called: it used to
  rebuild from scratch (95-101 s) whenever another ``ninja`` came first on PATH (the
  system's 1.11 against the venv's 1.13: "command line changed"). A build runs the ``ninja``
  of the ``ninja`` wheel (a dependency) where it is installed, else the one on PATH.
- A build is announced on the ``reformer`` logger (start, and end with its time); the CLI
  prints those lines, the library itself prints nothing.
- ``-march=native``: the build is for this CPU. Its name carries a hash of the CPU's feature
  flags, so a cache shared between different machines never loads another CPU's build.
  ``-mprefer-vector-width=512``: on AVX-512 CPUs gcc otherwise vectorises with 256-bit
  registers; with 512 the LSH kernel's bf16 forward at 64K went from 69 to 54 ms (one head,
  medians of 7 calls; no effect where there is no AVX-512).
- Shared inline code lives in headers (``csrc/*.h``); the key covers them, so a changed
  header rebuilds.
- ``csrc/lsh_chunks.cpp`` calls BLAS's ``sgemm_`` and, for bfloat16 rows, MKL's
  ``cblas_gemm_bf16bf16f32``, which PyTorch's CPU library exports (MKL on x86-64). They are
  declared weak: where one is missing the other kernels still load, and :func:`blas` tells
  the LSH kernel to run blockwise for that type.
- ``REFORMER_NATIVE=off`` skips the native kernels (``on``, the default, uses them when they
  build).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import logging
import os
import platform
import sys
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

ENV = "REFORMER_NATIVE"
CSRC = Path(__file__).parent / "csrc"
SOURCES = [CSRC / name for name in ("window_softmax.cpp", "sorted_rows.cpp", "lsh_chunks.cpp",
                                    "hashing.cpp", "feed_forward.cpp", "dropout.cpp",
                                    "cpu_allocator.cpp")]
HEADERS = [CSRC / "softmax_row.h"]
CFLAGS = ["-O3", "-march=native", "-mprefer-vector-width=512", "-fopenmp", "-fno-trapping-math",
          "-fno-math-errno"]
LDFLAGS = ["-fopenmp"]
BUILT_MARKER = "built"

log = logging.getLogger("reformer")


@dataclass(frozen=True)
class Build:
    """Where the kernels were found or built, and how long the build took (None: cached)."""

    directory: Path
    seconds: float | None


def _cpu_tag() -> str:
    """This CPU's model and feature flags (the instruction sets -march=native may use)."""
    text = platform.machine()
    try:
        info = Path("/proc/cpuinfo").read_text()
        text += "".join(line for line in info.splitlines()
                        if line.startswith(("flags", "Features", "model name")))
    except OSError:
        text += platform.processor()
    return text


def build_name() -> str:
    """``reformer_native_<key>``: the key hashes all that the built library depends on."""
    digest = hashlib.sha1()
    for part in (_cpu_tag(), torch.__version__, sys.version, *CFLAGS, *LDFLAGS):
        digest.update(part.encode() + b"\0")
    for path in (*SOURCES, *HEADERS):
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
    return f"reformer_native_{digest.hexdigest()[:12]}"


def build_directory() -> Path:
    root = os.environ.get("TORCH_EXTENSIONS_DIR") or Path.home() / ".cache" / "torch_extensions"
    return Path(root) / build_name()


@contextlib.contextmanager
def _wheel_ninja() -> Iterator[None]:
    """The ``ninja`` wheel's binary first on PATH while building (the builder runs ``ninja``
    by name), so that every build of a venv uses one ninja whatever PATH says."""
    try:
        import ninja
    except ImportError:
        yield
        return
    path = os.environ.get("PATH", "")
    os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + path
    try:
        yield
    finally:
        os.environ["PATH"] = path


def enabled() -> bool:
    setting = os.environ.get(ENV, "on")
    if setting not in ("on", "off"):
        raise ValueError(f"{ENV}={setting!r} is not understood; use 'on' (the default: native "
                         "CPU kernels when they compile) or 'off' (PyTorch ops only)")
    return setting == "on"


def build() -> Build:
    """Load the kernels, building them first unless a finished build is cached; raises
    what the build raised (no compiler, a compile error)."""
    from torch.utils.cpp_extension import load

    directory, name = build_directory(), build_name()
    library = directory / f"{name}.so"
    if (directory / BUILT_MARKER).is_file() and library.is_file():
        torch.ops.load_library(str(library))
        return Build(directory, None)
    log.info("reformer: building the native CPU kernels (once per machine and version, about "
             "a minute) in %s", directory)
    start = time.monotonic()
    directory.mkdir(parents=True, exist_ok=True)
    with _wheel_ninja():  # copies of the flags: the builder may append to its arguments
        load(name=name, sources=[str(s) for s in SOURCES], extra_cflags=list(CFLAGS),
             extra_ldflags=list(LDFLAGS), build_directory=str(directory),
             is_python_module=False, verbose=False)
    (directory / BUILT_MARKER).write_text(f"{torch.__version__}\n")
    seconds = time.monotonic() - start
    log.info("reformer: built the native CPU kernels in %.0f s", seconds)
    return Build(directory, seconds)


@functools.cache
def _load() -> bool:
    """Build (or find in the cache) and load the kernels once per process; False on failure."""
    try:
        build()
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
