"""Which attention kernel transformers runs (--attn-implementation, its own `attn_implementation` set at
model load), and whether this machine can run it.

    sdpa               torch's fused scaled_dot_product_attention: no T x T matrix is kept for backward
    eager              transformers' matmul-softmax-matmul: each layer keeps its attention probabilities
                       (B x H x T x T) for backward; the planner prices them (plan/analytic, the trace)
    flash_attention_2  the flash-attn package's kernels: CUDA only, half precision
"""

from __future__ import annotations

import importlib.util

CHOICES = ("sdpa", "eager", "flash_attention_2")


def attention_problem(name: str, precision: str) -> str | None:
    """Why this machine cannot train with `name` (a run's check: exit 2 before anything is written)."""
    if name != "flash_attention_2":
        return None
    import torch
    if not torch.cuda.is_available():
        return ("--attn-implementation flash_attention_2 needs a CUDA GPU (this machine has none); use sdpa "
                "(fused, no T x T matrix) or eager")
    if importlib.util.find_spec("flash_attn") is None:
        return ("--attn-implementation flash_attention_2 needs the flash-attn package (pip install flash-attn); "
                "or use sdpa, whose flash kernel needs nothing more")
    if precision == "fp32":
        return "--attn-implementation flash_attention_2 runs in fp16/bf16 only: use --precision auto, bf16 or fp16"
    return None
