"""Shared test set-up: offline always, small deterministic models."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("MPLBACKEND", "Agg")

import pytest  # noqa: E402


@pytest.fixture
def tiny_gpt2():
    """A 2-layer, 64-wide GPT-2 with a 256-token vocabulary, built from config (seeded)."""
    import torch

    from memfit.models import build_causal_lm, make_shape
    torch.manual_seed(0)
    return build_causal_lm(make_shape("gpt2", 2, 64, 256, 64))
