"""Deadline arithmetic: stop when time left < step + save + eval + export + margin."""

from __future__ import annotations

import datetime as dt
import time

import pytest

from memfit.train.deadline import Deadline, fmt_duration, parse_deadline, process_start_time


class Clock:
    def __init__(self, t: float = 0.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def test_stop_arithmetic():
    clock = Clock(10.0)
    d = Deadline(time_limit_s=100, deadline=None, process_start=0.0, margin_s=5, clock=clock)
    assert d.remaining() == 90
    assert not d.should_stop()                          # nothing measured: only the margin is needed
    d.record("step", 1.0)
    d.record("step", 2.0)
    d.record("save", 3.0)
    d.record("eval", 4.0)
    # export not measured yet: the save time stands in for it; x1.5 for a machine that slows down
    assert d.needed() == 1.5 * (2.0 + 3.0 + 4.0 + 3.0) + 5
    assert not d.should_stop(now=100 - 23.01)
    assert d.should_stop(now=100 - 22.99)
    d.record("export", 1.0)
    assert d.needed() == 1.5 * (2.0 + 3.0 + 4.0 + 1.0) + 5
    assert "left of the session" in d.reason(now=90)


def test_slowest_recent_measurement_counts_and_old_ones_age_out():
    d = Deadline(60, None, process_start=0.0, margin_s=0, clock=Clock(0))
    d.record("eval", 9.0)
    for s in (1.0, 1.0, 1.0):
        d.record("eval", s)
    assert d.estimate("eval") == 1.0                    # window of 3: the slow first eval aged out
    for s in [5.0] + [1.0] * 19:
        d.record("step", s)
    assert d.estimate("step") == 5.0
    d.record("step", 1.0)
    assert d.estimate("step") == 1.0
    d.set_prior("export", 7.0)
    assert d.estimate("export") == 7.0


def test_no_limit_never_stops():
    d = Deadline(None, None, process_start=0.0)
    assert d.remaining() is None and not d.should_stop()
    d.record("step", 1.0)
    assert d.eta_text(5, 10).startswith("ETA 5s")


def test_default_margin_scales_with_the_limit():
    assert Deadline(60, None, process_start=0.0).margin_s == 5.0
    assert Deadline(3600, None, process_start=0.0).margin_s == 180.0
    assert Deadline(9 * 3600, None, process_start=0.0).margin_s == 300.0


def test_time_limit_counts_from_process_start():
    start = process_start_time()
    assert start <= time.time()
    d = Deadline(3600, None, process_start=start)   # (this test process may be older than a minute)
    assert 3600 - (time.time() - start) - 1 <= d.remaining() <= 3600


def test_state_carries_durations_not_the_stop_time():
    a = Deadline(100, None, process_start=0.0, clock=Clock(50))
    a.record("save", 12.0)
    a.record("step", 0.5)
    b = Deadline(1000, None, process_start=0.0, clock=Clock(0))
    b.load_state_dict(a.state_dict())
    assert b.estimate("save") == 12.0 and b.estimate("step") == 0.5
    assert b.remaining() == 1000


def test_parse_deadline():
    now = dt.datetime(2026, 3, 1, 12, 0).timestamp()
    assert parse_deadline("18:00", now) == dt.datetime(2026, 3, 1, 18, 0).timestamp()
    assert parse_deadline("08:30", now) == dt.datetime(2026, 3, 2, 8, 30).timestamp()   # next occurrence
    assert parse_deadline("2026-03-05T09:15", now) == dt.datetime(2026, 3, 5, 9, 15).timestamp()
    with pytest.raises(ValueError, match="clock time"):
        parse_deadline("tomorrow", now)
    d = Deadline(None, "18:00", process_start=now, clock=Clock(now))
    assert d.remaining() == 6 * 3600
    both = Deadline(3600, "18:00", process_start=now, clock=Clock(now))
    assert both.remaining() == 3600                     # the earlier of the two


def test_eta_text():
    clock = Clock(0.0)
    d = Deadline(600, None, process_start=0.0, margin_s=10, clock=clock)
    for _ in range(5):
        d.record("step", 2.0)
    assert d.eta_text(100, 200).startswith("ETA 3m20s") and d.eta_text(100, 200).endswith("10m00s left")
    d.record("save", 20.0)
    text = d.eta_text(100, 400)                         # 600 s of steps > 600 s left
    assert "> 10m00s left: stops ~step" in text
    # (600 - 1.5 x (save 20 + export 20) - margin 10) / 2 s per step = 265 more steps
    assert text.endswith("step 365")


def test_fmt_duration():
    assert [fmt_duration(s) for s in (5, 65, 3725)] == ["5s", "1m05s", "1h02m"]


def test_calibration_replaces_the_steps_measured_before_it():
    d = Deadline(100, None, process_start=0.0, margin_s=0, clock=Clock(0))
    for s in (9.0, 9.0, 6.5, 6.0):       # tracked steps (tracker overhead), then real ones
        d.record("step", s)
    assert d.estimate("step") == 9.0
    d.calibrate(6.2)                     # the calibrated mean stands for the window so far
    assert d.estimate("step") == 6.2 and d.mean_step() == 6.2
    d.record("step", 7.0)
    assert d.estimate("step") == 7.0 and d.mean_step() == 6.6
