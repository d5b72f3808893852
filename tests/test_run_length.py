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
