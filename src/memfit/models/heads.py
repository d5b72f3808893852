"""Which causal LMs' heads the chunked loss may take over, and the bypass that lets it.

The chunked loss (models/chunked_ce.py) needs the final hidden states and the head's weight. Running
the whole model with its head's forward swapped for the identity keeps every wrapper in the call
(peft, DDP's gradient hooks, gradient checkpointing, packing's position_ids) and only skips the
[B, T, V] matmul. That is exact only where the model returns `lm_head(hidden)` untouched: the
families below (read in transformers' modeling files: no logit soft-capping or scaling after the
head), a plain nn.Linear head (not a LoRA- or 4-bit-wrapped one, no accelerate offload hook, no
forward hooks that would see hidden states instead of logits).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

EXACT_MODEL_TYPES = frozenset({
    "llama", "mistral", "qwen2", "qwen3", "gpt2", "gpt_neox", "phi", "phi3", "olmo", "olmo2",
    "smollm3", "stablelm", "starcoder2", "gemma", "falcon", "bloom", "gptj", "opt"})


def _inner(model: torch.nn.Module) -> torch.nn.Module:
    """Through DDP (.module) and torch.compile (._orig_mod) to the model that has the head."""
    for _ in range(4):
        if hasattr(model, "get_output_embeddings"):
            return model
        nxt = getattr(model, "module", None) or getattr(model, "_orig_mod", None)
        if not isinstance(nxt, torch.nn.Module):
            break
        model = nxt
    return model


def chunkable_head(model: torch.nn.Module) -> torch.nn.Linear | None:
    """The model's LM head if the chunked loss computes exactly what the model would, else None."""
    m = _inner(model)
    get = getattr(m, "get_output_embeddings", None)
    config = getattr(m, "config", None)
    if get is None or getattr(config, "model_type", None) not in EXACT_MODEL_TYPES:
        return None
    head = get()
    if type(head) is not torch.nn.Linear or hasattr(head, "_hf_hook"):
        return None
    if head._forward_hooks or head._forward_pre_hooks or "forward" in vars(head):
        return None
    return head


def _identity(x: torch.Tensor) -> torch.Tensor:
    return x


@contextlib.contextmanager
def head_bypassed(head: torch.nn.Module) -> Iterator[None]:
    """Within: `head(x)` returns x (the model's `.logits` are its final hidden states)."""
    head.forward = _identity   # an instance attribute shadows the class's forward
    try:
        yield
    finally:
        del head.forward
