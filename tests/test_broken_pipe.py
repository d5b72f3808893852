"""`memfit ... | head` (issue 17): when stdout's reader goes away memfit only stops printing: nothing on stderr
(no BrokenPipeError traceback, no 'Exception ignored'), the exit code is the command's own (a plan's fit verdict
survives `| head`), and a training run trains on, its lines kept in memfit.log. Real subprocesses, a real pipe whose read end
is closed before memfit writes a byte (so every run sees the broken pipe, whatever the timing)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _memfit_into_closed_pipe(*args: str, cwd: Path) -> tuple[int, str]:
    read, write = os.pipe()
    os.close(read)                          # no reader, ever: the first write fails with EPIPE
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"), HF_HUB_OFFLINE="1")
    try:
        r = subprocess.run([sys.executable, "-m", "memfit.cli", *args], stdout=write, stderr=subprocess.PIPE,
                           env=env, cwd=cwd, timeout=600, check=False)
    finally:
        os.close(write)
    return r.returncode, r.stderr.decode()


@pytest.mark.parametrize("args", [("--help",), ("train", "--help"), ("runs",)])
def test_a_closed_stdout_ends_the_command_quietly(tmp_path, args):
    rc, err = _memfit_into_closed_pipe(*args, cwd=tmp_path)
    assert (rc, err) == (0, "")


@pytest.mark.slow    # a plan (a fake-tensor trace, ~8 s on 2 shared cores)
def test_plan_into_a_closed_pipe_is_quiet(tmp_path):
    rc, err = _memfit_into_closed_pipe("plan", "--target-params", "300k", "--seq-len", "32", "--vocab-size", "512",
                                       "--max-examples", "4", "--batch-size", "4", cwd=tmp_path)
    assert (rc, err) == (0, "")


@pytest.mark.slow    # a 3-step training run in a subprocess (~30 s on 2 shared cores)
def test_training_whose_reader_went_away_finishes_and_logs(tmp_path):
    rc, err = _memfit_into_closed_pipe("train", "--data", "shakespeare", "--target-params", "300k", "--seq-len",
                                       "32", "--vocab-size", "512", "--max-examples", "4", "--batch-size", "4",
                                       "--max-steps", "3", "--eval-every", "0", "--sample-tokens", "0",
                                       "--output-dir", "run", cwd=tmp_path)
    assert rc == 0, err
    assert "memfit: error" not in err and "Traceback" not in err and "BrokenPipe" not in err and "Logging error" not in err, err
    assert (tmp_path / "run" / "final_model" / "config.json").is_file()
    assert "run directory:" in (tmp_path / "run" / "memfit.log").read_text()
