#!/usr/bin/env bash
# Create benchmarks/.venv-anchors: the benchmark's own environment with the anchor libraries
# (Hugging Face transformers, reformer-pytorch), matplotlib for the plots, and this package.
# The anchors never enter the package's dependencies (pyproject.toml).
#
# torch is installed FIRST and by exact pin: on the CPU build machine torch==2.13.0 resolves to
# a local wheel; any other spec may download a multi-GB CUDA build. Every later install either
# cannot move torch (no torch requirement) or is made with --no-deps and its light
# dependencies named explicitly, so nothing replaces the pinned torch.
#
# Usage: bash benchmarks/setup_anchors.sh      (TORCH_SPEC=torch==2.x to pick another build)
set -euo pipefail
HERE="$(cd "$(dirname "$0")" && pwd)"
ROOT="$(dirname "$HERE")"
VENV="$HERE/.venv-anchors"
PY="${PYTHON:-$(command -v python3.11 || command -v python3)}"
TORCH_SPEC="${TORCH_SPEC:-torch==2.13.0}"
PIP=("$VENV/bin/python" -m pip install -q --disable-pip-version-check)

test -x "$VENV/bin/python" || "$PY" -m venv "$VENV"
"${PIP[@]}" "$TORCH_SPEC"
TORCH_BEFORE="$("$VENV/bin/python" -c 'import torch; print(torch.__version__)' 2>/dev/null)"

# The anchors and their light dependencies, pinned for reproducible numbers (requirements file).
"${PIP[@]}" --no-deps -r "$HERE/requirements-anchors.txt"
# Our package, editable, without re-resolving torch.
"${PIP[@]}" --no-deps -e "$ROOT"

TORCH_AFTER="$("$VENV/bin/python" -c 'import torch; print(torch.__version__)' 2>/dev/null)"
if [ "$TORCH_BEFORE" != "$TORCH_AFTER" ]; then
    echo "setup_anchors: torch changed from $TORCH_BEFORE to $TORCH_AFTER; fix the pins" >&2
    exit 1
fi
"$VENV/bin/python" -m pip check
"$VENV/bin/python" - <<'PY'
from importlib.metadata import version

from transformers import ReformerModelWithLMHead  # noqa: F401  (the HF anchor must exist)

names = ("torch", "transformers", "reformer-pytorch", "matplotlib", "reformer")
print("anchors ready: " + ", ".join(f"{n} {version(n)}" for n in names))
PY
touch "$VENV/.installed"
