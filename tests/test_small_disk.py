"""Issue 18, small and full disks, on a real tmpfs: the free-space margin scales with the checkpoint; a
disk or --disk-budget that cannot hold one checkpoint is exit 2 before anything is written; a disk filled
mid-run stops resumably (75) with every older checkpoint intact and the disk named; exit 75 only when a
checkpoint exists."""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
import chaos as H
import diskfill

MB = 1_000_000


@pytest.fixture
def tmpfs(tmp_path):
    mounted = []

    def mount(size: int) -> Path:
        where = tmp_path / f"disk{len(mounted)}"
        why = diskfill.mount_tmpfs(where, size)
        if why:
            if os.environ.get("CI"):
                pytest.fail(why)
            pytest.skip(why)
        mounted.append(where)
        return where

    yield mount
    for where in mounted:
        diskfill.umount(where)


def _args(run: Path, corpus: Path, steps: int, save_every: int, extra=()) -> list[str]:
    return H.train_args(run, corpus, steps, save_every, eval_every=steps, log_every=1,
                        extra=["--keep-last", "3", *extra])


def _verified(run: Path, step: int) -> bool:
    from memfit.ckpt.io import verify_checkpoint
    return verify_checkpoint(run / "checkpoints" / f"step-{step}")[1] == []


def _wait(cond, proc, timeout: float = 300) -> None:
    t0 = time.monotonic()
    while not cond() and proc.poll() is None and time.monotonic() - t0 < timeout:
        time.sleep(0.005)


def test_a_small_disk_gets_checkpoints_best_and_final_model(tmpfs, corpus):
    disk = tmpfs(24 * MB)            # the old margin alone (256 MiB) was ten times this disk
    run = disk / "run"
    assert H.run(_args(run, corpus, 8, 4), disk.parent / "small.out") == 0, (disk.parent / "small.out").read_text()
    assert H.checkpoint_steps(run) == [4, 8] and _verified(run, 8)
    assert (run / "best" / "model.safetensors").exists()
    assert (run / "final_model" / "model.safetensors").exists()


@pytest.mark.parametrize("budget", ["1KB", "0"])
def test_a_budget_below_one_checkpoint_is_exit_2_before_anything_is_written(budget, corpus, tmp_path, capsys):
    from memfit.cli import main
    run = tmp_path / "run"
    assert main(["train", *_args(run, corpus, 8, 4, ["--disk-budget", budget])]) == 2
    err = capsys.readouterr().err
    assert "cannot hold one checkpoint of this model" in err and "--disk-budget" in err
    assert not run.exists()                                   # nothing written


def test_a_disk_below_one_checkpoint_is_exit_2_before_anything_is_written(tmpfs, corpus, capsys):
    from memfit.cli import main
    disk = tmpfs(3 * MB)
    run = disk / "run"
    assert main(["train", *_args(run, corpus, 8, 4)]) == 2
    err = capsys.readouterr().err
    assert f"the disk at {disk}" in err and "cannot hold one checkpoint" in err
    assert not run.exists()


@pytest.mark.slow       # ~25-32 s on 2 shared cores: two real runs on the tmpfs
def test_disk_filled_mid_run_stops_resumably_keeping_every_checkpoint(tmpfs, corpus):
    disk = tmpfs(40 * MB)
    run, out = disk / "run", disk.parent / "fill.out"
    args = _args(run, corpus, 60, 6)
    proc = H.start(args, out)
    _wait(lambda: 12 in H.checkpoint_steps(run), proc)
    filler = diskfill.fill(disk, 600_000)        # another program fills the disk: below the margin
    kept = H.checkpoint_steps(run)
    assert proc.wait(300) == 75, out.read_text()[-3000:]
    text = out.read_text() + (run / "memfit.log").read_text()
    assert H.checkpoint_steps(run) == kept and 12 in kept      # nothing deleted "to make room"
    assert all(_verified(run, s) for s in kept)
    assert f"no room on the disk at {disk} (" in text and " free of " in text
    assert "stopped resumably at step" in text and "--resume auto" in text
    assert not (run / "final_model").exists()
    filler.unlink()                                              # room again: the resume finishes
    assert H.run([*args, "--resume", "auto"], out) == 0, out.read_text()[-3000:]
    assert (run / "final_model" / "model.safetensors").exists()
    train = [r["step"] for r in H.history(run) if r["kind"] == "train"]
    assert train == list(range(1, 61))


def test_a_stop_with_nothing_saved_is_not_exit_75(tmpfs, corpus):
    disk = tmpfs(40 * MB)
    run, out = disk / "run", disk.parent / "sigint.out"
    proc = H.start(_args(run, corpus, 400, 1000), out)          # no periodic save before the stop
    H.wait_step(run, 3, proc)
    diskfill.fill(disk, 600_000)
    proc.send_signal(signal.SIGINT)
    rc = proc.wait(300)
    text = out.read_text()
    assert rc == 1, text[-3000:]
    assert "nothing was saved" in text and "stopped resumably" not in text
    assert "free space" in text and H.checkpoint_steps(run) == []
