"""What each step processed and how fast, from host timing and counts known on the host.

Nothing here reads a device tensor, so the bar can move every step without a device sync: the input
tokens come from the effective batch's attention_mask (it is on the CPU before the micro-batches are
moved), the rows from its shape. Rates are over the window since the last logged step.
"""

from __future__ import annotations

import time
from typing import Any, Callable

import torch

clock: Callable[[], float] = time.perf_counter   # the meter's only clock: tests replace it for exact rates


def batch_counts(batch: dict[str, Any]) -> tuple[int | None, int]:
    """(non-padding input tokens, rows) of an effective batch: the attention_mask's sum, else the
    size of input_ids; None tokens when the batch has neither (a custom module's features)."""
    mask, ids = batch.get("attention_mask"), batch.get("input_ids")
    rows = next(iter(batch.values())).shape[0] if batch else 0
    if torch.is_tensor(mask):
        return int(mask.sum()), rows
    if torch.is_tensor(ids):
        return ids.numel(), rows
    return None, rows


class StepMeter:
    """Counts since the window began (the last logged step) and the rates over it."""

    def __init__(self) -> None:
        self.t0 = self.now = clock()
        self.tokens = self.loss_tokens = self.examples = 0

    def add(self, tokens: int, loss_tokens: int, examples: int) -> dict[str, float]:
        """Count one step and return the window's rates (one clock reading per step)."""
        self.tokens += tokens
        self.loss_tokens += loss_tokens
        self.examples += examples
        self.now = clock()
        dt = max(self.now - self.t0, 1e-9)
        rates = {"tokens_per_s": self.tokens / dt, "examples_per_s": self.examples / dt}
        if self.loss_tokens not in (self.tokens, self.examples):   # LM label tokens: shown separately
            rates["loss_tokens_per_s"] = self.loss_tokens / dt
        return rates

    def reset(self) -> None:
        """Start a new window at the last reading."""
        self.t0 = self.now
        self.tokens = self.loss_tokens = self.examples = 0


def slow_fields(row: dict[str, Any]) -> dict[str, str]:
    """The bar's fields that read the device (loss, memory): refreshed on logged steps only."""
    slow = {"loss": f"{row['loss']:.3f}", "ram": f"{row['rss_mb']:.0f}MB"}
    if "gpu_alloc_mb" in row:
        slow["gpu"] = f"{row['gpu_alloc_mb']:.0f}/{row['gpu_reserved_mb']:.0f}MB"
    return slow


def fast_fields(row: dict[str, Any], rates: dict[str, float], micro_batch: int,
                left: str | None) -> dict[str, Any]:
    """The bar's host-known fields, every step: lr, tok/s, the micro-batch, the time left to the deadline."""
    fast: dict[str, Any] = {"lr": f"{row['lr']:.2e}", "tok/s": f"{rates['tokens_per_s']:.0f}", "mb": micro_batch}
    if left is not None:
        fast["left"] = left
    return fast
