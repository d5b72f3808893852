"""A real SIGKILL in the middle of writing a checkpoint (test-only hook) leaves the last good one intact."""

from __future__ import annotations

from pathlib import Path

import pytest
from killharness import run_killed


@pytest.mark.parametrize("phase", ["state", "manifest"])
def test_sigkill_during_save_keeps_last_good_checkpoint(tmp_path, phase):
    run = tmp_path / "run"
    info = run_killed(run, f"2:{phase}", keep_last=3, saves=3)   # the kill happened inside save #2
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
