"""The plan under torchrun (issue 16): knobs and memory per device, the effective batch global — the same
figures the run's batch line prints (dist.env.global_batch). Before: the plan block of a `--nproc 2` run
said "effective 4" while its batch line said "effective 8", and the epoch had twice the steps the run took."""

from __future__ import annotations

import pytest

from memfit.plan import make_plan
from memfit.plan.block import plan_block
from memfit.plan.report import plan_to_json, render_plan

from test_plan_user import parse

ARGS = ("--target-params", "300k", "--seq-len", "64", "--vocab-size", "1024", "--epoch-tokens", "64000",
        "--epochs", "1")


def _plan(monkeypatch, world: int, *extra):
    monkeypatch.setenv("WORLD_SIZE", str(world))
    monkeypatch.setenv("RANK", "0")
    return make_plan(parse(*ARGS, *extra), engine="analytic")


def test_two_processes_plan_the_global_batch_and_per_device_knobs(monkeypatch):
    one = _plan(monkeypatch, 1, "--batch-size", "4")
    two = _plan(monkeypatch, 2, "--batch-size", "4")
    assert (one.effective_batch, two.effective_batch) == (4, 8)          # global: 4 x 1 x 2 processes
    assert (two.knobs.micro_batch, two.knobs.accumulation) == (4, 1)     # per device
    assert two.world == 2 and one.world == 1
    # each device runs the same 4 rows a step: the same memory and step time as one process
    assert two.memory.peak_tensor_bytes == one.memory.peak_tensor_bytes
    assert two.time.step_seconds == pytest.approx(one.time.step_seconds)
    # the epoch: 64,000 tokens / (8 rows x 64 tokens) = 125 steps, half of one process's 250
    assert (one.time.epoch_steps, two.time.epoch_steps) == (250, 125)
    assert "micro-batch 4 x 1 accumulation x 2 processes = effective 8" in plan_block(two)
    assert "processes" not in plan_block(one)
    assert plan_to_json(two)["world_size"] == 2 and "x 2 processes = effective 8" in render_plan(two)


def test_a_given_global_effective_batch_is_split_across_the_devices(monkeypatch):
    two = _plan(monkeypatch, 2, "--batch-size", "4", "--effective-batch", "16")
    assert two.effective_batch == 16
    assert (two.knobs.micro_batch, two.knobs.accumulation) == (4, 2)     # 16 rows = 4 x 2 x 2 processes
    one = _plan(monkeypatch, 1, "--batch-size", "4", "--effective-batch", "8")
    assert two.time.step_seconds == pytest.approx(one.time.step_seconds)  # 8 rows per device either way
