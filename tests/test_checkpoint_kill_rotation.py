"""A real SIGKILL half-way through the keep-K rotation's deletion of an old checkpoint (test-only hook,
phase `delete`) must not leave a half-deleted step-<N>/ whose manifest lists files that are gone: every
installed checkpoint still verifies, after the kill and after `--resume auto` goes on."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

from memfit.ckpt.io import KILL_ENV, KILL_MARKER_ENV, verify_checkpoint
from memfit.ckpt.policy import list_checkpoints

TESTS = Path(__file__).parent
SCRIPT = """
import sys
sys.path.insert(0, {tests!r})
from test_checkpoint import Rig
r = Rig({run!r}, keep_last=2)
for s in range(1, 5):
    r.step()
    r.ck.save(s)
print("finished without being killed")
"""


def _problems(run: Path) -> dict[str, list[str]]:
    out = {}
    for e in list_checkpoints(run / "checkpoints"):
        _, problems = verify_checkpoint(e.path)
        if problems:
            out[e.path.name] = problems
    return out


def test_sigkill_while_rotation_deletes_an_old_checkpoint_leaves_every_installed_one_valid(tmp_path):
    run, marker = tmp_path / "run", tmp_path / "killed.json"
    env = {**os.environ, KILL_ENV: "3:delete", KILL_MARKER_ENV: str(marker), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-c", SCRIPT.format(tests=str(TESTS), run=str(run))],
                          env=env, check=False, capture_output=True, text=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stdout + proc.stderr
    info = json.loads(marker.read_text())       # killed after save #3, one file into deleting step-1
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
