"""``reformer build-kernels``: build the native CPU kernels now, not at first use.

A cluster job, a container image or CI can run it once, so that no training run pays the
build (about a minute) at its first step. Cached builds are reused: the command then only
loads them and says where they are.
"""

from __future__ import annotations

import argparse

from reformer import _native


def cmd_build_kernels(args: argparse.Namespace) -> int:
    if not _native.enabled():
        print(f"the native CPU kernels are off ({_native.ENV}=off): nothing to build")
        return 0
    try:
        build = _native.build()
    except Exception as error:  # the compiler's message: one line, and what to do
        first = str(error).strip().splitlines()[0] if str(error).strip() else repr(error)
        raise ValueError(f"the native CPU kernels did not build ({first[:300]}); install a "
                         f"C++ compiler (g++) and retry, or set {_native.ENV}=off to run on "
                         "PyTorch ops alone") from error
    how = "found built" if build.seconds is None else f"built in {build.seconds:.0f} s"
    print(f"native CPU kernels: {how}, cached in {build.directory}")
    return 0


def add_parsers(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("build-kernels", help="build the native CPU kernels ahead of first use",
                       description=__doc__.split("\n\n")[0] + " The cache lives in "
                       "$TORCH_EXTENSIONS_DIR (default ~/.cache/torch_extensions).")
    p.set_defaults(func=cmd_build_kernels)
