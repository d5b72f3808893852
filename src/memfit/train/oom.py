"""Surviving out-of-memory: halve the micro-batch, keep the effective batch, redo the same step.

The controller wraps one effective batch's accumulation. On an OOM it drops the partial gradients
(the effective batch is re-run from its first micro-step, so no sample is lost or counted twice),
frees the allocator cache, halves the micro-batch and tries again. Accumulation is implied by the
micro-batch (rows / micro-batch micro-steps, the last one may be smaller), so the effective batch and
the token-normalised loss are unchanged. The settled size is resumable state (registry part `oom`).

Evaluation has a controller of its own (registry part `eval_oom`): an OOM while evaluating shrinks
the evaluation micro-batch only, and an OOM while generating the eval sample shortens the sample.

Also here: the allocator settings (expandable segments unless the user chose otherwise), which must
be in the environment before CUDA initialises. The "what would help" text shown when even micro-batch 1
does not fit is the caller's (`advice`: jobs/ passes memfit.plan.advice.planner_advice; train/ never
imports the planner).
"""

from __future__ import annotations

import contextlib
import gc
import importlib.metadata
import logging
import os
import re
from collections.abc import Callable
from typing import Any

import torch

from memfit.device import DeviceInfo, DoesNotFit, empty_cache, is_oom

log = logging.getLogger("memfit")


# Testing: live tensor bytes above N (memtrack.ByteLimit) raise a real torch.OutOfMemoryError inside the
# step, the CPU analogue of the CUDA allocator refusing a block (an end-to-end run exercises auto-fit).
LIVE_BYTES_ENV = "MEMFIT_TEST_LIVE_BYTES_LIMIT"
LIVE_BYTES_RANK_ENV = "MEMFIT_TEST_LIVE_BYTES_RANK"   # set: the limit applies on that torchrun RANK only


def injected_byte_limit():
    limit = os.environ.get(LIVE_BYTES_ENV)
    only = os.environ.get(LIVE_BYTES_RANK_ENV)
    if not limit or (only is not None and only != os.environ.get("RANK", "0")):
        return contextlib.nullcontext()
    from memfit.memtrack import ByteLimit
    return ByteLimit(int(limit))


GENERIC_ADVICE = ("What would help: --gradient-checkpointing, --optimizer adamw8bit, a shorter --seq-len "
                  "(--max-seq-len when fine-tuning), --lora/--qlora, or a smaller model.")


class OOMController:
    """The micro-batch size one kind of work (train, eval) runs at, and how it recovers from OOM.

    regrow: after `regrow_after` clean runs at a shrunken size, try double (up to the configured size);
    when that OOMs again the wait before the next try doubles, so a size that does not fit is not
    retried every few steps.
    """

    def __init__(self, micro_batch_size: int, device: DeviceInfo, inject_above_tokens: int | None = None,
                 regrow: bool = False, regrow_after: int = 200, advice: str | Callable[[], str] = "",
                 what: str = "train") -> None:
        self.micro_batch_size = micro_batch_size
        self.initial = micro_batch_size          # the configured size: the ceiling for regrowth
        self.device = device
        self.inject_above_tokens = inject_above_tokens
        self.regrow = regrow
        self.regrow_after = regrow_after
        self.advice = advice            # the planner's suggestions (or a callable making them), shown when nothing fits
        self.what = what
        self.clean_steps = 0
        self.regrow_failures = 0
        self.generate_tokens: int | None = None  # cap on new tokens per sample after a generation OOM
        self.events: list[dict[str, Any]] = []   # drained by the loop into history

    # A real torch.OutOfMemoryError when a micro-batch is too large: lets CPU tests and demos
    # exercise exactly the code path a CUDA OOM takes.
    def check(self, micro_batch: dict[str, torch.Tensor]) -> None:
        if self.inject_above_tokens is None:
            return
        tokens = micro_batch["input_ids"].numel() if "input_ids" in micro_batch else \
            next(iter(micro_batch.values())).shape[0]
        self.check_tokens(tokens)

    def check_tokens(self, tokens: int) -> None:
        if self.inject_above_tokens is not None and tokens > self.inject_above_tokens:
            raise torch.OutOfMemoryError(
                f"injected OOM: micro-batch of {tokens} tokens > limit {self.inject_above_tokens}")

    def run(self, step: int | None, optimizer: torch.optim.Optimizer | None, model: torch.nn.Module | None,
            fn: Callable[[int], Any], what: str | None = None,
            scaler: torch.amp.GradScaler | None = None, agree: Callable[[bool], bool] | None = None) -> Any:
        """fn(micro_batch_size) does the whole effective batch; retried smaller on OOM.

        optimizer/model: whose gradients a failed attempt leaves behind (None for evaluation).
        agree: on N ranks, "did any rank run out of memory" (an all-reduce every rank reaches after each
        attempt), so all of them shrink together and redo the step, and none waits for another.
        """
        what = what or self.what
        regrowing = False
        if self.regrow and self.micro_batch_size < self.initial and \
                self.clean_steps >= self.regrow_after * 2 ** self.regrow_failures:
            self._change(step, min(self.initial, self.micro_batch_size * 2),
                         f"regrow after {self.clean_steps} clean steps", what, "regrow")
            regrowing = True
        while True:
            reason = None
            try:
                with injected_byte_limit():
                    out = fn(self.micro_batch_size)
            except Exception as exc:  # filtered by is_oom just below
                if not is_oom(exc):
                    raise
                reason = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
            if agree is not None and agree(reason is not None) and reason is None:
                reason = "another rank ran out of memory at this micro-batch"
            if reason is None:
                self.clean_steps += 1
                return out
            # Outside the except block: the exception, its traceback and the frames it holds (which
            # pin the failed attempt's activations) are gone, so the memory can really be freed.
            self.free(optimizer, model, scaler)
            if self.micro_batch_size <= 1:
                raise DoesNotFit(self._does_not_fit(step, what, reason)) from None
            if regrowing:
                self.regrow_failures += 1
                reason = f"regrow failed: {reason}"
                regrowing = False
            self._change(step, max(1, self.micro_batch_size // 2), reason, what, "shrink")

    def generate(self, step: int | None, fn: Callable[[int], Any], max_new_tokens: int,
                 prompt_tokens: int = 0) -> Any:
        """fn(n) generates n new tokens for one prompt; on OOM the sample is shortened (halved, and the
        cap is kept for later samples). Returns None when not even one new token fits."""
        n = max_new_tokens if self.generate_tokens is None else min(max_new_tokens, self.generate_tokens)
        while True:
            try:
                self.check_tokens(prompt_tokens + n)   # the sequence length the KV cache reaches
                return fn(n)
            except Exception as exc:
                if not is_oom(exc):
                    raise
                reason = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
            self.free()
            new = n // 2
            event = {"kind": "oom", "step": step, "what": "generate", "change": "shrink",
                     "old_max_new_tokens": n, "new_max_new_tokens": new, "reason": reason}
            log.warning(f"step {step}: generation out of memory at {n} new tokens -> "
                        + (f"{new}" if new else "no sample") + f" ({reason})")
            self.events.append(event)
            self.generate_tokens = new
            if new < 1:
                return None
            n = new

    def free(self, optimizer: torch.optim.Optimizer | None = None, model: torch.nn.Module | None = None,
             scaler: torch.amp.GradScaler | None = None) -> None:
        """Drop a failed attempt: its gradients, any per-step GradScaler record, cached blocks."""
        if optimizer is not None:
            optimizer.zero_grad(set_to_none=True)
        elif model is not None:
            model.zero_grad(set_to_none=True)
        reset_scaler_step(scaler)
        gc.collect()
        empty_cache(self.device)

    def _does_not_fit(self, step: int | None, what: str, reason: str) -> str:
        if what == "eval":   # no gradients or optimizer state here: the training knobs do not apply
            return (f"out of memory at evaluation micro-batch 1 (step {step}): {reason}. What would help: "
                    "shorter sequences (--seq-len, --max-seq-len), or --eval-every 0 (evaluate at the end only).")
        advice = self.advice
        if callable(advice):
            try:
                advice = advice()
            except Exception as e:  # noqa: BLE001 - advice is best effort
                log.debug(f"no planner advice: {e!r}")
                advice = ""
        return (f"out of memory at micro-batch 1 ({what}, step {step}): {reason}. "
                + (advice or GENERIC_ADVICE))

    def _change(self, step: int | None, new: int, reason: str, what: str, change: str) -> None:
        event = {"kind": "oom", "step": step, "what": what, "change": change,
                 "old_micro_batch": self.micro_batch_size, "new_micro_batch": new, "reason": reason}
        (log.info if change == "regrow" else log.warning)(
            f"step {step}: {what} micro-batch {self.micro_batch_size} -> {new} ({reason})")
        self.micro_batch_size = new
        self.clean_steps = 0
        self.events.append(event)

    def drain(self) -> list[dict[str, Any]]:
        """The changes since the last drain (for the history)."""
        events, self.events = self.events, []
        return events

    def state_dict(self) -> dict[str, Any]:
        return {"micro_batch_size": self.micro_batch_size, "initial": self.initial,
                "clean_steps": self.clean_steps, "regrow_failures": self.regrow_failures}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        saved_initial = state.get("initial")
        if saved_initial is not None and int(saved_initial) != self.initial:
            # The user asked for another micro-batch (or effective batch) on resume: honour that.
            log.info(f"{self.what} micro-batch: the checkpoint ran at {state['micro_batch_size']} of "
                     f"{saved_initial} configured; now configured {self.initial}: starting at {self.initial}")
            return
        self.micro_batch_size = min(int(state["micro_batch_size"]), self.initial)
        self.clean_steps = int(state.get("clean_steps", 0))
        self.regrow_failures = int(state.get("regrow_failures", 0))


def reset_scaler_step(scaler: torch.amp.GradScaler | None) -> None:
    """Forget a GradScaler's per-step record (unscale_ done, found-inf tensors) left by a failed attempt.

    accumulate() only calls scaler.scale(), which records nothing per step, so after an OOM there the
    scaler is already consistent (same scale, same growth tracker); this matters when the attempt got
    as far as unscale_() - otherwise the redo's unscale_() raises "unscale_() has already been called".
    """
    if scaler is None or not scaler.is_enabled():
        return
    states = getattr(scaler, "_per_optimizer_states", None)
    if states:
        states.clear()   # a defaultdict: the next unscale_() starts from a fresh READY record


# --- the CUDA caching allocator's settings ------------------------------------------------------------

ALLOC_VARS = ("PYTORCH_ALLOC_CONF", "PYTORCH_CUDA_ALLOC_CONF")
DEFAULT_ALLOC_CONF = "expandable_segments:True"
_set_by_memfit: str | None = None


def _torch_version() -> tuple[int, int]:
    try:
        m = re.match(r"(\d+)\.(\d+)", importlib.metadata.version("torch"))
        return (int(m.group(1)), int(m.group(2))) if m else (0, 0)
    except importlib.metadata.PackageNotFoundError:
        return (0, 0)


def configure_allocator(environ: dict[str, str] | None = None) -> str | None:
    """Ask for expandable segments when the user set neither PYTORCH_ALLOC_CONF nor
    PYTORCH_CUDA_ALLOC_CONF. Returns the name set, or None when the user's setting stands.

    Must run before CUDA initialises (the allocator reads the variable once). torch >= 2.11 reads
    PYTORCH_ALLOC_CONF; older releases only honour PYTORCH_CUDA_ALLOC_CONF for CUDA (2.9/2.10
    silently ignore expandable_segments given under the new name), so the name follows the version.
    """
    global _set_by_memfit
    env = os.environ if environ is None else environ
    if any(v in env for v in ALLOC_VARS):
        return None
    name = "PYTORCH_ALLOC_CONF" if _torch_version() >= (2, 11) else "PYTORCH_CUDA_ALLOC_CONF"
    env[name] = DEFAULT_ALLOC_CONF
    if environ is None:
        _set_by_memfit = name
    return name


def allocator_report(device: DeviceInfo) -> tuple[str, bool | None]:
    """(one line for the log, whether expandable segments are in effect: None when unknown / CPU).

    Call after the model is on the device: on CUDA the answer is read back from the allocator itself.
    """
    given = {v: os.environ[v] for v in ALLOC_VARS if v in os.environ}
    origin = (f"{_set_by_memfit}={given.get(_set_by_memfit, '?')} (set by memfit: the user set neither "
              f"PYTORCH_ALLOC_CONF nor PYTORCH_CUDA_ALLOC_CONF)") if _set_by_memfit else \
        ", ".join(f"{k}={v}" for k, v in given.items()) + " (the user's)" if given else "no allocator variables set"
    if device.type != "cuda":
        return f"allocator: {origin}; CPU run, the CUDA allocator settings do not apply", None
    parsed = None
    getter = getattr(torch._C, "_accelerator_getAllocatorSettings", None)   # absent in older torch
    if getter is not None:
        parsed = getter()   # the string the allocator parsed
    expandable: bool | None = None
    try:
        expandable = bool(torch.cuda.memory._snapshot()["allocator_settings"]["expandable_segments"])
    except Exception:  # noqa: BLE001 - private API: fall back to the parsed string
        text = parsed if parsed is not None else ",".join(given.values())
        m = re.search(r"expandable_segments:\s*(\w+)", text or "")
        expandable = (m.group(1).lower() == "true") if m else False
    line = f"allocator: {origin}; in effect: expandable_segments={expandable}" + \
        (f" (allocator settings {parsed!r})" if parsed else "")
    if _set_by_memfit and not expandable:
        line += (" - NOT in effect: CUDA was initialised before memfit could set it; set "
                 f"os.environ['{_set_by_memfit}'] = '{DEFAULT_ALLOC_CONF}' before using CUDA")
    return line, expandable
