"""Shared test set-up: offline always, small deterministic models."""

import atexit
import os
import shutil
import tempfile

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("MPLBACKEND", "Agg")

# The dequantized-GGUF cache (finetune/load.py) of this test session: a temporary folder, never the user's
# ~/.cache; spawned memfit processes inherit it. SmolLM2 is dequantized into it once per session.
if "MEMFIT_CACHE" not in os.environ:
    _cache = tempfile.mkdtemp(prefix="memfit-test-cache-")
    os.environ["MEMFIT_CACHE"] = _cache
    atexit.register(shutil.rmtree, _cache, True)

import pytest  # noqa: E402


@pytest.fixture
def tiny_gpt2():
    """A 2-layer, 64-wide GPT-2 with a 256-token vocabulary, built from config (seeded)."""
    import torch

    from memfit.models import build_causal_lm, make_shape
    torch.manual_seed(0)
    return build_causal_lm(make_shape("gpt2", 2, 64, 256, 64))
