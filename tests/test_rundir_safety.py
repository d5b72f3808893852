"""Issue 18, run-directory half: --overwrite removes only what memfit wrote, one process per run
directory (run.lock), refused runs change nothing. Real `memfit train` processes on a tiny GPT-2."""

from __future__ import annotations

import signal
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
import chaos as H  # noqa: E402  (the harness shared with bench/chaos.py)

from memfit import cli  # noqa: E402
from run_helpers import copy_run, snapshot  # noqa: E402


def main(args: list[str], capsys) -> tuple[int, str]:
    rc = cli.main(["train", *args])
    return rc, capsys.readouterr().err


def test_overwrite_refuses_a_directory_that_is_not_a_memfit_run(tmp_path, corpus, capsys):
    d = tmp_path / "mine"
    d.mkdir()
    (d / "notes.txt").write_text("my notes")
    (d / "data.txt").write_text((corpus / "train.txt").read_text())
    before = snapshot(d)
    rc, err = main(H.train_args(d, corpus, 2) + ["--overwrite"], capsys)
    assert rc == 2, err
    assert "not a memfit run directory" in err and "nothing was removed" in err
    assert snapshot(d) == before


def test_overwrite_removes_only_memfit_files_and_refuses_foreign_ones(tmp_path, finished_run, corpus, capsys):
    d = copy_run(finished_run, tmp_path / "run")
    listed = set((d / ".memfit-files").read_text().split())
    present = {p.name for p in d.iterdir()}
    assert present <= listed, f"written but not recorded: {present - listed}"
    assert {"config.yaml", "tokenizer", "checkpoints", "best", "final_model", "history.jsonl",
            "training_history.json", "plots", "memfit.log", "run.lock", ".memfit-files"} <= listed

    (d / "notes.txt").write_text("mine")
    before = snapshot(d)
    args = H.train_args(d, corpus, 2, save_every=2, eval_every=2, log_every=1) + ["--overwrite"]
    rc, err = main(args, capsys)
    assert rc == 2, err
    assert "notes.txt" in err and "did not write" in err
    assert snapshot(d) == before, "a refused --overwrite changed the directory"

    (d / "notes.txt").unlink()
    rc, err = main(args, capsys)
    assert rc == 0, err
    assert H.checkpoint_steps(d) == [2]        # the old step-4 is gone with the rest of the old run
    assert [r["step"] for r in H.history(d) if r["kind"] == "train"] == [1, 2]


def test_run_without_config_but_with_checkpoints_is_resumed_never_overwritten(tmp_path, finished_run, corpus,
                                                                              capsys):
    d = copy_run(finished_run, tmp_path / "run")
    (d / "config.yaml").unlink()
    before = snapshot(d)
    args = H.train_args(d, corpus, 4, save_every=2, eval_every=4, log_every=1)
    rc, err = main(args, capsys)
    assert rc == 2, err
    assert "--overwrite" not in err, err
    assert "--resume auto" in err, err
    assert snapshot(d) == before
    # a different run's options on a directory with checkpoints: the remedy is resuming, not --overwrite
    copy_run(finished_run, tmp_path / "run2")
    rc, err = main(H.train_args(tmp_path / "run2", corpus, 4, extra=["--lr", "5e-4"]), capsys)
    assert rc == 2 and "--overwrite" not in err and "--resume auto" in err, err
    # and the remedy works: it resumes from step-4 (the run is complete, so it only finishes)
    rc, err = main(args + ["--resume", "auto"], capsys)
    assert rc == 0, err
    assert "resumed from" in (d / "memfit.log").read_text()


@pytest.mark.slow
def test_second_process_on_a_run_directory_exits_2_and_a_killed_holder_blocks_nothing(tmp_path, corpus):
    d = tmp_path / "run"
    args = H.train_args(d, corpus, 10, save_every=2, eval_every=10, log_every=1) + ["--resume", "auto"]
    a = H.start(args, tmp_path / "a.out")
    try:
        H.wait_step(d, 3, a, timeout=300)
        a.send_signal(signal.SIGSTOP)          # A holds the lock, mid-training, while B starts
        before = snapshot(d)
        b = H.run(args, tmp_path / "b.out", timeout=300)
        out_b = (tmp_path / "b.out").read_text()
        assert b == 2, out_b
        assert f"PID {a.pid}" in out_b and "Traceback" not in out_b, out_b
        assert snapshot(d) == before, "the refused process wrote into the run directory"
    finally:
        a.kill()          # the lock is the kernel's (flock on an open descriptor): SIGKILL releases it
        a.wait()
    assert (d / "run.lock").read_text().strip() == str(a.pid)      # a stale lock file is left behind
    rc = H.run(args, tmp_path / "c.out", timeout=300)
    assert rc == 0, (tmp_path / "c.out").read_text()[-3000:]
    assert "resumed from" in (d / "memfit.log").read_text()
    steps = [r["step"] for r in H.history(d) if r["kind"] == "train"]
    assert steps == list(range(1, 11)), steps           # one writer at a time: every step once, in order
