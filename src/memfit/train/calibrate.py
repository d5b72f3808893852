"""Calibration from the run itself (issue 12): what a step really costs, next to what the plan said.

The first steps of a session are measured:
  - peak memory: on a GPU torch.cuda's max_memory_allocated since the session began (free to read); on
    the CPU the live-tensor tracker (memfit.memtrack) during the first TRACKED_STEPS steps only — its
    per-op dispatch overhead never stays in the hot loop. The CPU figure is the step's rise over what
    was live when it began, plus the job's own tensors then (weights, buffers, gradients, optimizer
    state, the batch), so the rest of the process (tokenizer, data buffers) is not counted: the quantity
    the plan's trace predicts (peak_tensor_bytes).
  - step time: the mean over the steps after the tracked ones and the first (warm-up) step, up to
    CALIBRATE_STEPS; from then on the figures are fixed and logged once beside the plan's, with the
    sessions the job needs at the measured pace (`sessions`, given by jobs/: the plan's arithmetic).
The one timing of each step is here (`clock`, injectable). What the run forecasts uses the measured
figures: before calibration every step goes to the deadline's window as it is; at calibration the
window's steps so far (the tracked ones run under the tracker's dispatch overhead, the first is a
warm-up) are replaced by the calibrated mean, and the bar's rate, so its ETA, becomes the mean of the
same window (the calibrated figure, then each later step: RECENT_STEPS of them).
Every evaluation row carries plan_peak_bytes, measured_peak_bytes, plan_step_s, measured_step_s (the
plan's figures are None where there is no plan; the measured ones None until measured).
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable
from typing import Any

import torch

log = logging.getLogger("memfit")
clock: Callable[[], float] = time.perf_counter    # tests replace it for exact figures
TRACKED_STEPS = 2      # two, so the second runs with the optimizer state the first allocated
CALIBRATE_STEPS = 10
RECENT_STEPS = 20     # = train.deadline's step window


class Calibration:
    def __init__(self, device, plan_peak_bytes: int | None = None, plan_step_s: float | None = None,
                 tracked_steps: int = TRACKED_STEPS, calibrate_steps: int = CALIBRATE_STEPS):
        self.device = device
        self.plan_peak_bytes, self.plan_step_s = plan_peak_bytes, plan_step_s
        self.tracked_steps, self.calibrate_steps = tracked_steps, calibrate_steps
        self.measured_peak_bytes: int | None = None
        self.measured_step_s: float | None = None
        self._times: list[float] = []
        self._recent: deque[float] = deque(maxlen=RECENT_STEPS)   # the bar's pace, after calibration
        self.deadline = None         # train.deadline.Deadline: the loop hands it over
        self.sessions: Callable[[float, int], str | None] | None = None   # (step s, start step) -> a line
        self._tracker = None
        self._t0 = 0.0
        self._base = 0
        self.start(0)

    @classmethod
    def for_plan(cls, plan, device) -> "Calibration":
        if plan is None:
            return cls(device)
        peak = plan.memory.peak_allocated if device.type == "cuda" else plan.memory.peak_tensor_bytes
        return cls(device, int(peak), float(plan.time.step_seconds))

    def start(self, start_step: int, deadline=None) -> None:
        """The session's first step is start_step + 1 (a resume measures its own first steps)."""
        self.deadline = deadline
        self._recent.clear()
        self.first = start_step + 1
        self.tracked_until = start_step + (self.tracked_steps if self.device.type == "cpu" else 0)
        self.calibrated_at = start_step + self.calibrate_steps
        if self.device.type == "cuda":
            from memfit.device import reset_peak
            reset_peak(self.device)

    # ------------------------------------------------------------------ around each step
    def begin(self, step: int, model: torch.nn.Module, optimizer) -> None:
        """Before step `step` (1-based) reads its batch."""
        if self.first <= step <= self.tracked_until:
            from memfit.memtrack import LiveTensorTracker
            self._tracker = LiveTensorTracker(count_existing=True)
            self._tracker.__enter__()
            self._base = self._tracker.current_bytes - _own_bytes(model, optimizer)
        self._t0 = clock()

    def end(self, step: int) -> float:
        """After the optimizer step of `step`; the tracker's window closes here. Returns its seconds."""
        secs = clock() - self._t0
        if self._tracker is not None:
            self.close()
        elif step > self.first and step <= self.calibrated_at:     # tracked and warm-up steps excluded
            self._times.append(secs)
            self.measured_step_s = sum(self._times) / len(self._times)
        elif step > self.calibrated_at and self._recent:
            self._recent.append(secs)
        if self.deadline is not None:
            self.deadline.record("step", secs)
        if self.device.type == "cuda":
            from memfit.device import memory_stats
            self.measured_peak_bytes = int(memory_stats(self.device).get("max_allocated", 0)) or None
        if step == self.calibrated_at:
            self._calibrated()
        return secs

    def _calibrated(self) -> None:
        """The end of the window: the measured step time replaces the estimates from here on."""
        text = self.line()
        step_s = self.measured_step_s
        if step_s:
            self._recent.append(step_s)
            if self.deadline is not None:
                self.deadline.calibrate(step_s)
            line = self.sessions(step_s, self.first - 1) if self.sessions is not None else None
            if line:
                text += "\n" + line
        log.info(text)

    def step_seconds(self) -> float | None:
        """The measured pace for the bar's ETA: None until calibrated (the bar keeps its own rate)."""
        return sum(self._recent) / len(self._recent) if self._recent else None

    def close(self) -> None:
        """Leave the tracker (the end of a tracked step, or an exception inside one)."""
        tracker, self._tracker = self._tracker, None
        if tracker is None:
            return
        tracker.__exit__(None, None, None)
        peak = tracker.peak_bytes - self._base
        self.measured_peak_bytes = max(self.measured_peak_bytes or 0, peak)

    # ------------------------------------------------------------------ reporting
    def fields(self) -> dict[str, Any]:
        return {"plan_peak_bytes": self.plan_peak_bytes, "measured_peak_bytes": self.measured_peak_bytes,
                "plan_step_s": self.plan_step_s, "measured_step_s": self.measured_step_s}

    def line(self) -> str:
        """The one log line at the end of the calibration window."""
        return (f"calibrated: step {_pair(self.measured_step_s, self.plan_step_s, _secs)}, "
                f"peak {_pair(self.measured_peak_bytes, self.plan_peak_bytes, _mib)}")

    def errors(self) -> dict[str, float | None]:
        """The plan's error against the measurement, in % of the measurement (None: nothing to compare)."""
        return {"peak_error_pct": _err(self.measured_peak_bytes, self.plan_peak_bytes),
                "step_error_pct": _err(self.measured_step_s, self.plan_step_s)}

    def closing(self) -> str:
        """The closing summary's lines: the plan beside what this session measured."""
        why = "" if self.measured_step_s else f" (timed from step {max(self.first + 1, self.tracked_until + 1)})"
        return ("plan vs measured (this session):\n"
                f"  peak memory: {_pair(self.measured_peak_bytes, self.plan_peak_bytes, _mib)}\n"
                f"  step time: {_pair(self.measured_step_s, self.plan_step_s, _secs)}{why}")


def _err(measured: float | None, planned: float | None) -> float | None:
    return round(100 * (planned - measured) / measured, 2) if measured and planned else None


def _mib(b: float) -> str:
    return f"{b / 2**20:.2f} MiB"


def _secs(s: float) -> str:
    return f"{s:.4g}s"


def _pair(measured: float | None, planned: float | None, fmt: Callable[[float], str]) -> str:
    """'9.1ms measured, plan 7ms (-23.1%)'; 'not measured' / 'no plan' where one is missing."""
    text = f"{fmt(measured)} measured" if measured else "not measured"
    if not planned:
        return text + ", no plan"
    err = _err(measured, planned)
    return text + f", plan {fmt(planned)}" + (f" ({err:+.1f}%)" if err is not None else "")


def _own_bytes(model: torch.nn.Module, optimizer) -> int:
    """Bytes of the job's tensors live between steps: weights, buffers, gradients, optimizer state."""
    seen: set[int] = set()
    total = 0

    def add(t) -> None:
        nonlocal total
        if isinstance(t, torch.Tensor) and not t.is_meta:
            st = t.untyped_storage()
            if id(st) not in seen:
                seen.add(id(st))
                total += st.nbytes()

    for p in model.parameters():
        add(p)
        add(p.grad)
    for b in model.buffers():
        add(b)
    for state in getattr(optimizer, "state", {}).values():
        for v in state.values():
            add(v)
    return total


__all__ = ["Calibration"]
