"""Surviving out-of-memory: halve the micro-batch, keep the effective batch, redo the same step.

The controller wraps one effective batch's accumulation. On an OOM it drops the partial gradients
(the effective batch is re-run from its first micro-step, so no sample is lost or counted twice),
frees the allocator cache, halves the micro-batch and tries again. Accumulation is implied by the
micro-batch (rows / micro-batch micro-steps), so the effective batch and the token-normalised loss
are unchanged. The settled size is resumable state.
"""

from __future__ import annotations

import gc
import logging
from typing import Any, Callable

import torch

from memfit.device import DeviceInfo, empty_cache, is_oom

log = logging.getLogger("memfit")


class DoesNotFit(RuntimeError):
    """OOM at micro-batch 1: the CLI prints this and exits 3."""


class OOMController:
    def __init__(self, micro_batch_size: int, device: DeviceInfo, inject_above_tokens: int | None = None,
                 regrow: bool = False, regrow_after: int = 200, advice: str = "") -> None:
        self.micro_batch_size = micro_batch_size
        self.initial = micro_batch_size
        self.device = device
        self.inject_above_tokens = inject_above_tokens
        self.regrow = regrow
        self.regrow_after = regrow_after
        self.advice = advice            # the planner's suggestions, shown when nothing fits
        self.clean_steps = 0
        self.events: list[dict[str, Any]] = []   # drained by the loop into history

    # A real torch.OutOfMemoryError when a micro-batch is too large: lets CPU tests and demos
    # exercise exactly the code path a CUDA OOM takes.
    def check(self, micro_batch: dict[str, torch.Tensor]) -> None:
        if self.inject_above_tokens is None:
            return
        tokens = micro_batch["input_ids"].numel() if "input_ids" in micro_batch else \
            next(iter(micro_batch.values())).shape[0]
        if tokens > self.inject_above_tokens:
            raise torch.OutOfMemoryError(
                f"injected OOM: micro-batch of {tokens} tokens > limit {self.inject_above_tokens}")

    def run(self, step: int, optimizer: torch.optim.Optimizer, model: torch.nn.Module,
            fn: Callable[[int], Any], what: str = "train") -> Any:
        """fn(micro_batch_size) does the whole effective batch; retried smaller on OOM."""
        if self.regrow and self.clean_steps >= self.regrow_after and self.micro_batch_size < self.initial:
            self._change(step, min(self.initial, self.micro_batch_size * 2), "regrow after clean steps", what)
            self.clean_steps = 0
        while True:
            try:
                out = fn(self.micro_batch_size)
                self.clean_steps += 1
                return out
            except Exception as exc:  # noqa: BLE001 - filtered by is_oom just below
                if not is_oom(exc):
                    raise
                reason = str(exc).splitlines()[0][:200]
                # Free the partial step: gradients of the micro-steps done so far, the exception's
                # frames (they pin activations), then the allocator's cached blocks.
                optimizer.zero_grad(set_to_none=True) if optimizer is not None else model.zero_grad(True)
                del exc
                gc.collect()
                empty_cache(self.device)
                if self.micro_batch_size <= 1:
                    raise DoesNotFit(
                        f"out of memory at micro-batch 1 ({what}, step {step}): {reason}."
                        + (f" {self.advice}" if self.advice else
                           " What would help: --gradient-checkpointing, --optimizer adamw8bit, a shorter "
                           "--seq-len, --lora/--qlora, or a smaller model.")) from None
                self._change(step, max(1, self.micro_batch_size // 2), reason, what)
                self.clean_steps = 0

    def _change(self, step: int, new: int, reason: str, what: str) -> None:
        event = {"kind": "oom", "step": step, "what": what, "old_micro_batch": self.micro_batch_size,
                 "new_micro_batch": new, "reason": reason}
        log.warning(f"step {step}: {what} micro-batch {self.micro_batch_size} -> {new} ({reason})")
        self.micro_batch_size = new
        self.events.append(event)

    def state_dict(self) -> dict[str, Any]:
        return {"micro_batch_size": self.micro_batch_size, "clean_steps": self.clean_steps}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.micro_batch_size = int(state["micro_batch_size"])
        self.clean_steps = int(state.get("clean_steps", 0))
