"""A real SIGKILL in the middle of writing a checkpoint (test-only hook) leaves the last good one intact."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from memfit.ckpt.io import KILL_ENV, KILL_MARKER_ENV

TESTS = Path(__file__).parent
SCRIPT = """
import sys
sys.path.insert(0, {tests!r})
from test_checkpoint import Rig
r = Rig({run!r}, keep_last=3)
for s in range(1, 4):
    r.step()
    r.ck.save(s)
print("finished without being killed")
"""


@pytest.mark.parametrize("phase", ["state", "manifest"])
def test_sigkill_during_save_keeps_last_good_checkpoint(tmp_path, phase):
    run, marker = tmp_path / "run", tmp_path / "killed.json"
    env = {**os.environ, KILL_ENV: f"2:{phase}", KILL_MARKER_ENV: str(marker), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-c", SCRIPT.format(tests=str(TESTS), run=str(run))],
                          env=env, check=False, capture_output=True, text=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stdout + proc.stderr
    info = json.loads(marker.read_text())                    # the kill happened inside save #2
    assert info["step"] == 2 and info["phase"] == phase
    tmp = Path(info["tmp"])
    assert tmp.parent == run / "checkpoints" and tmp.name.startswith(".tmp-step-2-") and tmp.is_dir()
    assert (tmp / "model.safetensors").exists()
    assert (tmp / "manifest.json").exists() == (phase == "manifest")
    names = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert "step-2" not in names and "step-1" in names
    assert (run / "checkpoints" / "latest").read_text().strip() == "step-1"

    from test_checkpoint import Rig
    again = Rig(run, keep_last=3)
    assert not tmp.exists() and "unfinished save" in again.text()
    assert again.ck.resume("auto") == 1 and again.loop["step"] == 1
