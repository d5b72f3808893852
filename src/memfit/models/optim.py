"""Optimizers (AdamW fused/foreach, 8-bit AdamW) and the warmup + cosine schedule."""

from __future__ import annotations

import logging
import math

import torch


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Decay matrices only: biases and norm gains (1-D tensors) are not regularised (GPT-2/nanoGPT)."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups


def eight_bit_available() -> str | None:
    """None if bitsandbytes' 8-bit AdamW can be used here, else why not."""
    try:
        import bitsandbytes.optim  # noqa: F401
    except Exception as e:  # ImportError, or a broken CUDA setup raising RuntimeError
        return f"bitsandbytes could not be imported ({type(e).__name__}: {e}); pip install bitsandbytes"
    return None


def build_optimizer(model: torch.nn.Module, name: str, lr: float, weight_decay: float,
                    betas: tuple[float, float], device_type: str) -> torch.optim.Optimizer:
    groups = param_groups(model, weight_decay)
    if name == "adamw":
        # fused is one kernel per step on CPU and CUDA (torch >= 2.4); foreach is the fallback.
        try:
            return torch.optim.AdamW(groups, lr=lr, betas=betas, fused=True)
        except (RuntimeError, TypeError):
            return torch.optim.AdamW(groups, lr=lr, betas=betas, foreach=True)
    import bitsandbytes as bnb
    if name == "paged_adamw8bit" and device_type != "cuda":
        # Paged memory is a CUDA unified-memory feature; on CPU the state is ordinary memory anyway.
        # A log line, not warnings.warn: that printed the file, line and source of this call to the console.
        logging.getLogger("memfit").info("optimizer: paged_adamw8bit pages only on CUDA; on this CPU it runs as "
                                         "adamw8bit (the same 8-bit state)")
        name = "adamw8bit"
    cls = bnb.optim.PagedAdamW8bit if name == "paged_adamw8bit" else bnb.optim.AdamW8bit
    # bitsandbytes keeps 32-bit state for tensors under min_8bit_size (4096) elements.
    return cls(groups, lr=lr, betas=betas)


def warmup_cosine(optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int,
                  min_lr_ratio: float) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warmup to the peak, cosine decay to peak * min_lr_ratio at total_steps."""
    warmup_steps = min(warmup_steps, max(total_steps - 1, 0))

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / (warmup_steps + 1)
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes held by the optimizer's state tensors (what 8-bit saves)."""
    total = 0
    for st in optimizer.state.values():
        for v in st.values():
            if torch.is_tensor(v):
                total += v.numel() * v.element_size()
    return total
