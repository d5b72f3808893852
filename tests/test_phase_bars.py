"""One progress bar per phase (issue 17): `memfit eval`, `merge` and `export` each draw one memfit bar, in
place (carriage returns, never a line per item), and no third-party bar; --quiet draws none. The GGUF
dequantization loop gets the same one-bar settings."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from run_helpers import tiny_lm_folder

ROOT = Path(__file__).resolve().parents[1]
FRAME = re.compile(r"^(?P<desc>\w[\w ]*(?:: [\w ]+)?): +(?:\d+%\|[^|]*\| *)?(?P<n>\d+)(?:/(?P<total>\d+))?\w* \[")


def _memfit(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("TRANSFORMERS_", "HF_HUB_DISABLE", "HF_DATASETS", "DATASETS_", "TQDM_"))}
    env.update(PYTHONPATH=str(ROOT / "src"), HF_HUB_OFFLINE="1")
    r = subprocess.run([sys.executable, "-m", "memfit.cli", *args], capture_output=True, env=env, cwd=cwd)
    # decoded by hand: text=True would turn tqdm's carriage returns into newlines
    return subprocess.CompletedProcess(r.args, r.returncode, r.stdout.decode(), r.stderr.decode())


def _frames(stderr: str) -> list[tuple[int, re.Match]]:
    """(line, match) for every redraw of every tqdm bar in `stderr`: tqdm starts each with a carriage
    return and ends a closed bar with a newline, so a bar drawn in place is one line."""
    assert "\x1b[" not in stderr, stderr
    return [(i, m) for i, line in enumerate(stderr.split("\n")) for piece in line.split("\r")
            if (m := FRAME.match(piece.strip()))]


def _one_bar(stderr: str, desc: str) -> re.Match:
    """The last frame of the one bar `stderr` holds: named `desc` (no third-party bar), on one line."""
    frames = _frames(stderr)
    assert frames, stderr
    assert {m["desc"] for _, m in frames} == {desc}, stderr
    assert len({i for i, _ in frames}) == 1, stderr
    return frames[-1][1]


@pytest.mark.slow     # two evaluations in subprocesses (~18 s on 2 shared cores)
def test_eval_shows_one_bar_that_counts_batches_and_quiet_hides_it(tmp_path):
    tiny_lm_folder(tmp_path / "lm")
    r = _memfit("eval", "--model", "lm", "--data", "shakespeare", "--seq-len", "32", "--batch-size", "2",
                "--max-batches", "3", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    last = _one_bar(r.stderr, "eval")
    assert (last["n"], last["total"]) == ("3", "3"), r.stderr
    assert "tokens 186" in r.stdout, r.stdout     # 3 batches x 2 rows x 31 predicted tokens
    q = _memfit("eval", "--model", "lm", "--data", "shakespeare", "--seq-len", "32", "--batch-size", "2",
                "--max-batches", "3", "--quiet", cwd=tmp_path)
    assert q.returncode == 0 and q.stdout == r.stdout and "\r" not in q.stderr and not _frames(q.stderr), q.stderr


@pytest.mark.slow     # a merge in a subprocess (~11 s on 2 shared cores)
def test_merge_shows_one_stage_bar(tmp_path):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM
    tiny_lm_folder(tmp_path / "lm")
    torch.manual_seed(0)
    peft = get_peft_model(AutoModelForCausalLM.from_pretrained(tmp_path / "lm"),
                          LoraConfig(r=2, target_modules=["c_attn"], fan_in_fan_out=True))
    peft.save_pretrained(tmp_path / "adapter")
    r = _memfit("merge", "--base", "lm", "--adapter", "adapter", "--out", "merged", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    last = _one_bar(r.stderr, "merge")
    assert (last["n"], last["total"]) == ("5", "5") and "done" in last.string, r.stderr
    assert (tmp_path / "merged" / "model.safetensors").is_file()


@pytest.mark.slow     # a 3-step training run, then export, in subprocesses (~25 s on 2 shared cores)
def test_export_shows_one_stage_bar(tmp_path):
    r = _memfit("train", "--data", "shakespeare", "--target-params", "300k", "--seq-len", "32", "--vocab-size",
                "512", "--max-examples", "4", "--batch-size", "4", "--max-steps", "2", "--eval-every", "0",
                "--sample-tokens", "0", "--output-dir", "run", "--quiet", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    e = _memfit("export", "--run", "run", "--out", "exp", cwd=tmp_path)
    assert e.returncode == 0, e.stderr
    last = _one_bar(e.stderr, "export")
    assert (last["n"], last["total"]) == ("4", "4"), e.stderr
    assert "exported" in e.stdout and (tmp_path / "exp" / "model.safetensors").is_file()


def test_gguf_dequantize_loop_gets_one_bar_redrawn_at_most_once_a_second(monkeypatch):
    from transformers import modeling_gguf_pytorch_utils as gguf_utils

    from memfit import console
    from memfit.models.load import _one_gguf_bar
    # bars on, as a command without --quiet sets them (an earlier in-process quiet job leaves the switch on)
    monkeypatch.setattr(console, "PHASE_BARS_OFF", False)
    before = gguf_utils.tqdm
    with _one_gguf_bar():
        bar = gguf_utils.tqdm(range(5), desc="Converting and de-quantizing GGUF tensors...")
        assert (bar.desc, bar.mininterval, bar.unit) == ("gguf: dequantize", 1.0, "tensor")
        assert list(bar) == [0, 1, 2, 3, 4]
    assert gguf_utils.tqdm is before


def test_quiet_turns_the_gguf_dequantize_bar_off():
    """--quiet reaches the GGUF bar in models/ (below metrics.py) through memfit.console's switch."""
    from transformers import modeling_gguf_pytorch_utils as gguf_utils

    from memfit.metrics import quiet_libraries
    from memfit.models.load import _one_gguf_bar
    try:
        for quiet in (True, False):
            quiet_libraries(verbose=True, quiet=quiet)
            with _one_gguf_bar():
                assert gguf_utils.tqdm(range(3)).disable is quiet
    finally:
        quiet_libraries(verbose=True, quiet=False)


def test_quiet_lasts_one_command_and_leaves_the_environment_alone():
    """--quiet in one in-process command (a notebook cell, a test) must not silence later commands or the
    subprocesses they start: it once set TQDM_DISABLE in os.environ, which broke a later --verbose run."""
    import os

    from memfit import console, metrics
    metrics.quiet_libraries(verbose=False, quiet=True)
    assert console.PHASE_BARS_OFF and "TQDM_DISABLE" not in os.environ
    metrics.quiet_libraries(verbose=True, quiet=False)
    assert not console.PHASE_BARS_OFF and "TQDM_DISABLE" not in os.environ
