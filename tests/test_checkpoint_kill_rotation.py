"""A real SIGKILL half-way through the keep-K rotation's deletion of an old checkpoint (test-only hook,
phase `delete`) must not leave a half-deleted step-<N>/ whose manifest lists files that are gone: every
installed checkpoint still verifies, after the kill and after `--resume auto` goes on."""

from __future__ import annotations

from pathlib import Path

from killharness import run_killed

from memfit.ckpt.io import verify_checkpoint
from memfit.ckpt.policy import list_checkpoints


def _problems(run: Path) -> dict[str, list[str]]:
    out = {}
    for e in list_checkpoints(run / "checkpoints"):
        _, problems = verify_checkpoint(e.path)
        if problems:
            out[e.path.name] = problems
    return out


def test_sigkill_while_rotation_deletes_an_old_checkpoint_leaves_every_installed_one_valid(tmp_path):
    run = tmp_path / "run"
    info = run_killed(run, "3:delete", keep_last=2, saves=4)   # after save #3, one file into deleting step-1
    assert info["step"] == 3 and info["phase"] == "delete"
    assert _problems(run) == {}
    steps = [e.step for e in list_checkpoints(run / "checkpoints")]
    assert steps == [2, 3]            # step-1 is gone as a whole (its remains are under .del-)

    from test_checkpoint import Rig
    again = Rig(run, keep_last=2)
    assert again.ck.resume("auto") == 3 and again.loop["step"] == 3
    assert not any(p.name.startswith(".") and p.is_dir() for p in (run / "checkpoints").iterdir())
    again.step()
    again.ck.save(4)
    assert [e.step for e in list_checkpoints(run / "checkpoints")] == [3, 4]
    assert _problems(run) == {}
