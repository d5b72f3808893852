"""The kill-test harness: a child process runs a test_checkpoint.Rig that trains and saves, with the
test-only hook MEMFIT_TEST_KILL_DURING_SAVE=<save no>:<phase> set, and is really SIGKILLed there."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

from memfit.ckpt.io import KILL_ENV, KILL_MARKER_ENV

TESTS = Path(__file__).parent
SCRIPT = """
import sys
sys.path.insert(0, {tests!r})
from test_checkpoint import Rig
r = Rig({run!r}, keep_last={keep_last})
for s in range(1, {saves} + 1):
    r.step()
    r.ck.save(s)
print("finished without being killed")
"""


def run_killed(run: Path, kill: str, *, keep_last: int, saves: int) -> dict:
    """Save steps 1..`saves` in `run` with the kill hook `kill` ("N:phase"); assert the child died of
    SIGKILL and return the hook's marker ({step, phase, pid, tmp, time})."""
    marker = run.parent / f"killed-{run.name}.json"
    env = {**os.environ, KILL_ENV: kill, KILL_MARKER_ENV: str(marker), "HF_HUB_OFFLINE": "1"}
    code = SCRIPT.format(tests=str(TESTS), run=str(run), keep_last=keep_last, saves=saves)
    proc = subprocess.run([sys.executable, "-c", code], env=env, check=False, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stdout + proc.stderr
    return json.loads(marker.read_text())
