"""Issue 18: `--epochs` with `--max-steps` (whichever comes first, and the log says which); fp16 on a CPU
warns that it is emulated (as bf16 does)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
import chaos as H


def test_the_rule():
    from memfit.run_length import total_steps
    assert total_steps(1.0, 3, 10.2) == (3, "--max-steps 3 comes before the end of --epochs 1 (11 steps)")
    assert total_steps(1.0, 50, 10.2) == (11, "--epochs 1 ends at step 11, before --max-steps 50")
    assert total_steps(None, 7, 10.2)[0] == 7
    assert total_steps(2.0, None, 10.2)[0] == 21
    assert total_steps(None, None, 500.0, default_cap=200)[0] == 200      # the quick default job
    assert total_steps(1.0, None, 500.0, default_cap=200)[0] == 500       # --epochs 1: the whole epoch


def _args(run: Path, corpus: Path, extra: list[str]) -> list[str]:
    args = H.train_args(run, corpus, 1, save_every=100, eval_every=0, log_every=1)
    i = args.index("--max-steps")
    return args[:i] + args[i + 2:] + extra


def _train_steps(run: Path) -> list[int]:
    rows = [json.loads(x) for x in (run / "history.jsonl").read_text().splitlines()]
    return [r["step"] for r in rows if r["kind"] == "train"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    # ~3 kB of training text: one epoch of B4 x T32 blocks is about ten steps
    return H.make_corpus(tmp_path_factory.mktemp("corpus"), train_chars=3_000, val_chars=1_500)


def test_epochs_and_max_steps_whichever_comes_first(corpus, tmp_path):
    from memfit.cli import main
    run = tmp_path / "a"
    assert main(["train", *_args(run, corpus, ["--epochs", "1", "--max-steps", "3", "--precision", "fp16"])]) == 0
    log = (run / "memfit.log").read_text()
    assert _train_steps(run) == [1, 2, 3]
    assert "training stops at step 3: --max-steps 3 comes before the end of --epochs 1" in log
    assert "fp16 on a CPU is emulated and slow" in log

    run = tmp_path / "b"
    assert main(["train", *_args(run, corpus, ["--epochs", "1", "--max-steps", "60"])]) == 0
    log = (run / "memfit.log").read_text()
    steps = _train_steps(run)
    assert 3 < len(steps) < 60 and steps == list(range(1, len(steps) + 1))
    assert f"training stops at step {len(steps)}: --epochs 1 ends at step {len(steps)}, before --max-steps 60" in log


def test_the_plan_prices_the_default_jobs_capped_length():
    """Neither --epochs nor --max-steps: the plan's job is the run's (run_length.job_steps, one rule with
    the default job's cap), not the whole epoch the planner estimates."""
    from memfit.cli import build_parser, config_from_args
    from memfit.plan import make_plan
    from memfit.plan.block import plan_block
    from memfit.run_length import DEFAULT_CAPS
    argv = ["plan", "--data", "shakespeare", "--target-params", "150k", "--vocab-size", "512", "--seq-len", "32",
            "--batch-size", "4", "--gpu", "cpu", "--precision", "fp32"]
    plan = make_plan(config_from_args(build_parser().parse_args(argv), "pretrain"), engine="analytic")
    assert plan.time.epoch_steps > DEFAULT_CAPS["pretrain"] == 200
    assert plan.time.total_steps == 200 and plan.time.total_seconds == 200 * plan.time.step_seconds
    assert "job 200 steps" in plan_block(plan)
    with_epoch = make_plan(config_from_args(build_parser().parse_args([*argv, "--epochs", "1"]), "pretrain"),
                           engine="analytic")
    assert with_epoch.time.total_steps == plan.time.epoch_steps      # --epochs 1: the whole epoch


def test_the_default_job_runs_the_length_its_plan_printed(tmp_path):
    """A real `memfit train` with neither --epochs nor --max-steps on a corpus of ~900 steps per epoch:
    the plan block (memfit.log), plan.json and the run's own length line all say 200. (A real in-process
    run stopped by its time limit after a step: ~3 s.)"""
    from memfit.cli import main
    big = H.make_corpus(tmp_path / "corpus")           # 60 kB: at B1 x T32 one epoch is ~900 steps
    run = tmp_path / "run"
    rc = main(["train", *_args(run, big, ["--batch-size", "1", "--time-limit", "3s"])])
    assert rc in (0, 75)                               # the time limit stops it resumably after a step or so
    log = (run / "memfit.log").read_text()
    assert "training stops at step 200: no --epochs/--max-steps given: training 200 of the" in log
    assert "job 200 steps" in log
    assert json.loads((run / "plan.json").read_text())["total_steps"] == 200
