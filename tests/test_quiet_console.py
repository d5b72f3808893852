"""Quiet console (issue 17): a real LoRA fine-tune in a subprocess prints no third-party progress bar, load
report, FutureWarning or ANSI escape; --verbose brings transformers' own output back."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from run_helpers import tiny_lm_folder

ROOT = Path(__file__).resolve().parents[1]
BAR = re.compile(r"\d+%\|")            # tqdm's "45%|####" (memfit's own bar is off under --quiet)


def _finetune(tmp_path, name, *extra):
    rows = [{"prompt": f"Q{i}:", "completion": f" A{i}."} for i in range(16)]
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    model = tmp_path / "lm"
    if not model.exists():
        tiny_lm_folder(model)
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("TRANSFORMERS_", "HF_HUB_DISABLE", "HF_DATASETS", "DATASETS_"))}
    env.update(PYTHONPATH=str(ROOT / "src"), HF_HUB_OFFLINE="1")
    return subprocess.run([sys.executable, "-m", "memfit.cli", "finetune", "--model", str(model), "--data",
                           str(data), "--lora", "--batch-size", "4", "--max-steps", "2", "--eval-every", "0",
                           "--sample-tokens", "0", "--precision", "fp32", "--output-dir", str(tmp_path / name),
                           "--quiet", *extra], capture_output=True, text=True, env=env)


def test_lora_finetune_console_has_no_third_party_noise(tmp_path):
    r = _finetune(tmp_path, "quiet")
    assert r.returncode == 0, r.stderr
    for where, text in (("stdout", r.stdout), ("stderr", r.stderr)):
        assert "\x1b[" not in text, (where, text)
        assert not BAR.search(text) and "\r" not in text, (where, text)
        assert "LOAD REPORT" not in text and "FutureWarning" not in text and "DeprecationWarning" not in text, \
            (where, text)


@pytest.mark.slow    # two fine-tunes in subprocesses (~30 s on 2 shared cores)
def test_verbose_shows_the_libraries_output_again(tmp_path):
    quiet = _finetune(tmp_path, "q")
    loud = _finetune(tmp_path, "v", "--verbose")
    assert quiet.returncode == 0 and loud.returncode == 0, loud.stderr
    assert len(loud.stdout + loud.stderr) > len(quiet.stdout + quiet.stderr), (quiet.stderr, loud.stderr)
    assert BAR.search(loud.stderr) and not BAR.search(quiet.stderr)   # transformers' shard-writing bar
