"""The session deadline: stop while there is still time to save, evaluate and export.

A notebook session ends hard (Kaggle at 9 h / 12 h, Colab whenever). `--time-limit` is counted from the
start of the *process* (the platform's clock starts with the kernel, not with training), `--deadline` is a
clock time. After every optimizer step the loop asks `should_stop()`: it says yes once

    time left < SAFETY x (one more step + a save + an evaluation + the export) + a margin

where each term is the slowest of its recent measurements (a save/eval/export measured in an earlier
session of the same run counts too: the durations are part of the resumable state). SAFETY (1.5) covers
a machine that gets slower after the measurement (other processes on the same cores: measured 2x on a
shared 2-core box, where the slowest recent value already carries part of it).
"""

from __future__ import annotations

import datetime as _dt
import math
import time
from collections import deque
from collections.abc import Callable
from typing import Any

KINDS = ("step", "save", "eval", "export")
_WINDOW = {"step": 20, "save": 3, "eval": 3, "export": 3}
SAFETY = 1.5


def process_start_time() -> float:
    """Wall-clock (epoch) start of this process; what a session limit is counted from."""
    try:
        import psutil
        return float(psutil.Process().create_time())
    except Exception:
        return time.time()


def parse_deadline(text: str, now: float | None = None) -> float:
    """'2026-11-22T18:00' (local time unless it carries an offset) or '18:00' / '18:00:30' (the next time
    the clock shows it) -> epoch seconds."""
    now = time.time() if now is None else now
    text = text.strip()
    try:
        t = _dt.time.fromisoformat(text)
    except ValueError:
        t = None
    if t is not None:
        today = _dt.datetime.fromtimestamp(now).date()
        when = _dt.datetime.combine(today, t)
        ts = when.timestamp()
        return ts if ts > now else (when + _dt.timedelta(days=1)).timestamp()
    try:
        return _dt.datetime.fromisoformat(text).timestamp()
    except ValueError:
        raise ValueError(f"--deadline {text!r}: expected a clock time like 18:00 or 2026-11-22T18:00") from None


def fmt_duration(s: float) -> str:
    s = max(0, round(s))
    h, rem = divmod(s, 3600)
    m, sec = divmod(rem, 60)
    if h:
        return f"{h}h{m:02d}m"
    if m:
        return f"{m}m{sec:02d}s"
    return f"{sec}s"


class Deadline:
    """Durations of step/save/eval/export and the stop time; `state_dict` carries the durations."""

    def __init__(self, time_limit_s: float | None, deadline: str | None, process_start: float | None = None,
                 margin_s: float | None = None, clock: Callable[[], float] = time.time) -> None:
        self.clock = clock
        self.start = process_start_time() if process_start is None else process_start
        stops = []
        if time_limit_s:
            stops.append(self.start + float(time_limit_s))
        if deadline:
            stops.append(parse_deadline(deadline, now=clock()))
        self.stop_at: float | None = min(stops) if stops else None
        self.limit_s = None if self.stop_at is None else self.stop_at - self.start
        if margin_s is None:   # 5% of the session, between 5 s and 5 min
            margin_s = 5.0 if self.limit_s is None else min(300.0, max(5.0, 0.05 * self.limit_s))
        self.margin_s = float(margin_s)
        self.safety = SAFETY
        self._recent: dict[str, deque] = {k: deque(maxlen=_WINDOW[k]) for k in KINDS}
        self._priors: dict[str, float] = {}
        self._prior_steps: dict[str, float] = {}

    # ------------------------------------------------------------------ measurements
    def record(self, what: str, seconds: float) -> None:
        if what not in self._recent:
            self._recent[what] = deque(maxlen=3)
        if seconds >= 0 and math.isfinite(seconds):
            self._recent[what].append(float(seconds))

    def calibrate(self, step_s: float) -> None:
        """The run's calibration (train/calibrate.py) measured its pace: the steps recorded so far (the
        tracked ones carry the live-tensor tracker's overhead, the first is a warm-up) give way to the
        calibrated mean; later steps join it in the window."""
        self._recent["step"].clear()
        self.record("step", step_s)

    def set_prior(self, what: str, seconds: float) -> None:
        """An estimate used until `what` has been measured (e.g. export time from the model size)."""
        self._priors[what] = float(seconds)

    def set_prior_steps(self, what: str, steps: float) -> None:
        """Until `what` is measured, estimate it as `steps` times the mean optimizer step (an evaluation
        of k batches costs about k/3 steps: forward only)."""
        self._prior_steps[what] = float(steps)

    def estimate(self, what: str) -> float:
        """The slowest recent duration of `what` (conservative); before any measurement its prior
        (the larger of a fixed one and one in steps), and for the export (measured once, at the very
        end) the save time as a stand-in."""
        rec = self._recent.get(what)
        if rec:
            return max(rec)
        guess = 0.0
        if what in self._priors or what in self._prior_steps:
            step = self.mean_step() or 0.0
            guess = max(self._priors.get(what, 0.0), self._prior_steps.get(what, 0.0) * step)
        if what == "export" and self._recent["save"]:
            guess = max(guess, max(self._recent["save"]))
        return guess

    def mean_step(self) -> float | None:
        rec = self._recent["step"]
        return sum(rec) / len(rec) if rec else None

    def needed(self) -> float:
        return self.safety * sum(self.estimate(k) for k in KINDS) + self.margin_s

    # ------------------------------------------------------------------ decisions
    def remaining(self, now: float | None = None) -> float | None:
        if self.stop_at is None:
            return None
        return self.stop_at - (self.clock() if now is None else now)

    def past_margin(self) -> bool:
        """Only the safety margin is left: work that can be cut (the final summary's validation) stops."""
        left = self.remaining()
        return left is not None and left < self.margin_s

    def should_stop(self, now: float | None = None) -> bool:
        left = self.remaining(now)
        return left is not None and left < self.needed()

    def reason(self, now: float | None = None) -> str:
        left = self.remaining(now)
        if left is None:
            return "no time limit"
        parts = " + ".join(f"{k} {self.estimate(k):.1f}s" for k in KINDS)
        return (f"{fmt_duration(left)} left of the session, and finishing needs {self.safety:g} x ({parts}) "
                f"+ margin {self.margin_s:.0f}s = {self.needed():.1f}s")

    def eta_text(self, steps_done: int, total_steps: int | None = None, now: float | None = None) -> str:
        """'ETA 12m05s (18:32), 41m left' or, when the run will not finish in time,
        'ETA 2h10m > 41m left: stops ~step 640'."""
        now = self.clock() if now is None else now
        step_s = self.mean_step()
        left = self.remaining(now)
        bits = []
        if step_s is not None and total_steps:
            eta = max(0, total_steps - steps_done) * step_s
            finish = _dt.datetime.fromtimestamp(now + eta).strftime("%H:%M")
            bits.append(f"ETA {fmt_duration(eta)} ({finish})")
            reserve = self.needed() - self.safety * self.estimate("step")
            if left is not None and eta > left - reserve:
                usable = left - reserve
                stop_at = steps_done + max(0, int(usable // max(step_s, 1e-9)))
                return f"{bits[0]} > {fmt_duration(left)} left: stops ~step {min(stop_at, total_steps)}"
        if left is not None:
            bits.append(f"{fmt_duration(left)} left")
        return ", ".join(bits)

    # ------------------------------------------------------------------ resumable state
    def state_dict(self) -> dict[str, Any]:
        return {"recent": {k: list(v) for k, v in self._recent.items()}, "priors": dict(self._priors)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        # The stop time is this session's (its own --time-limit and process start); only durations carry.
        for k, values in state.get("recent", {}).items():
            self._recent.setdefault(k, deque(maxlen=3)).extend(float(v) for v in values)
        self._priors.update(state.get("priors", {}))
