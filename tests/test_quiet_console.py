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
    r = subprocess.run([sys.executable, "-m", "memfit.cli", "finetune", "--model", str(model), "--data",
                        str(data), "--lora", "--batch-size", "4", "--max-steps", "2", "--eval-every", "0",
                        "--sample-tokens", "0", "--precision", "fp32", "--output-dir", str(tmp_path / name),
                        "--quiet", *extra], capture_output=True, env=env)
    # decoded by hand: text=True reads with universal newlines, which turn a bar's "\r" into "\n"
    return subprocess.CompletedProcess(r.args, r.returncode, r.stdout.decode(), r.stderr.decode())


def third_party_noise(text: str) -> list[str]:
    """What of a library's own console output `text` holds: ANSI escapes, a tqdm bar or a redraw in place,
    load reports, warnings."""
    found = [what for what, present in (("ANSI escape", "\x1b[" in text), ("tqdm bar", BAR.search(text)),
                                         ("carriage return", "\r" in text), ("load report", "LOAD REPORT" in text))
             if present]
    return found + re.findall(r"\w*Warning\b", text)


@pytest.mark.slow    # a LoRA fine-tune in a subprocess (~20 s on 2 shared cores)
def test_lora_finetune_console_has_no_third_party_noise(tmp_path):
    r = _finetune(tmp_path, "quiet")
    assert r.returncode == 0, r.stderr
    for where, text in (("stdout", r.stdout), ("stderr", r.stderr)):
        assert third_party_noise(text) == [], (where, text)


def test_the_noise_check_sees_a_bar_redrawn_in_place_and_a_warning():
    """The check above can fail: a tqdm redraw (carriage returns, read as bytes) and peft's UserWarning."""
    redraw = "train:  50%|#####     | 1/2 [00:01<00:01]\rtrain: 100%|##########| 2/2 [00:02<00:00]\n"
    assert third_party_noise(redraw) == ["tqdm bar", "carriage return"]
    assert third_party_noise("\rstep 3/10") == ["carriage return"]
    assert third_party_noise("peft/tuners/lora/layer.py:2760: UserWarning: fan_in_fan_out is set to False") == \
        ["UserWarning"]


def test_gpt2_lora_gets_no_fan_in_fan_out_warning(tiny_gpt2):
    """GPT-2's linears are Conv1D: memfit tells peft so (fan_in_fan_out=True) instead of peft warning on every
    GPT-2 LoRA fine-tune that it set it itself; the adapter still trains the same modules."""
    import warnings

    from memfit.models.lora import apply_lora
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        peft_model = apply_lora(tiny_gpt2, r=2, alpha=4, dropout=0.0)
    assert [str(w.message) for w in caught if "fan_in_fan_out" in str(w.message)] == []
    assert peft_model.peft_config["default"].fan_in_fan_out is True
    assert any(n.endswith("c_attn.lora_A.default.weight") for n, _ in peft_model.named_parameters())


@pytest.mark.slow    # two fine-tunes in subprocesses (~30 s on 2 shared cores)
def test_verbose_shows_the_libraries_output_again(tmp_path):
    quiet = _finetune(tmp_path, "q")
    loud = _finetune(tmp_path, "v", "--verbose")
    assert quiet.returncode == 0 and loud.returncode == 0, loud.stderr
    assert len(loud.stdout + loud.stderr) > len(quiet.stdout + quiet.stderr), (quiet.stderr, loud.stderr)
    assert BAR.search(loud.stderr) and not BAR.search(quiet.stderr)   # transformers' shard-writing bar


def test_paged_adamw8bit_on_cpu_is_a_log_line_not_a_python_warning(tiny_gpt2):
    """memfit's own notice that paging needs CUDA: one memfit log line (it was warnings.warn, which printed the
    file, line number and source line of the call to the console)."""
    import logging
    import warnings

    from memfit.models.optim import build_optimizer
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append
    logger = logging.getLogger("memfit")
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            opt = build_optimizer(tiny_gpt2, "paged_adamw8bit", 1e-3, 0.0, (0.9, 0.999), "cpu")
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    assert type(opt).__name__ == "AdamW8bit"
    assert [str(w.message) for w in caught if "paged" in str(w.message)] == []
    assert [r.getMessage() for r in records] == [
        "optimizer: paged_adamw8bit pages only on CUDA; on this CPU it runs as adamw8bit (the same 8-bit state)"]
