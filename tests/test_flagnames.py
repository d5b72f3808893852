"""HF Trainer habits (issue 17): their flag names get memfit's in one exit-2 message, and every argparse
error is shown under the subcommand's usage, never the top-level one."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from memfit.cli import build_parser, main

ROOT = Path(__file__).resolve().parents[1]
HF = {"--learning_rate": "--lr", "--num_train_epochs": "--epochs", "--per_device_train_batch_size": "--batch-size",
      "--gradient_accumulation_steps": "--gradient-accumulation-steps", "--auto_find_batch_size": "--auto-fit",
      "--warmup_ratio": "--warmup-ratio", "--eval_strategy": "--eval-strategy", "--save_strategy": "--save-strategy",
      "--output_dir": "--output-dir", "--save_total_limit": "--keep-last", "--logging_steps": "--log-every",
      "--eval_steps": "--eval-every", "--save_steps": "--save-every", "--weight_decay": "--weight-decay",
      "--max_steps": "--max-steps"}
VALUES = {"--learning_rate": "2e-4", "--num_train_epochs": "3", "--per_device_train_batch_size": "8",
          "--gradient_accumulation_steps": "4", "--auto_find_batch_size": None, "--warmup_ratio": "0.1",
          "--eval_strategy": "epoch", "--save_strategy": "epoch", "--output_dir": "out", "--save_total_limit": "2",
          "--logging_steps": "5", "--eval_steps": "50", "--save_steps": "50", "--weight_decay": "0.01",
          "--max_steps": "10"}


def _argv():
    out = []
    for flag, value in VALUES.items():
        out += [flag] if value is None else [flag, value]
    return out


def _error(argv, capsys) -> str:
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    return capsys.readouterr().err


@pytest.mark.parametrize("command", ["train", "finetune", "classify"])
def test_every_hf_name_gets_memfit_s_in_one_message(command, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    err = _error([command, *_argv()], capsys)
    assert err.startswith(f"usage: memfit {command} ") and "usage: memfit [-h]" not in err
    assert err.count("error:") == 1 and f"{len(VALUES)} unknown options" in err
    for flag, name in HF.items():
        value = VALUES[flag]
        want = f"  {flag}: did you mean {name}{' ' + value if value else ''}?"
        assert want in err, (want, err)
    assert not any(tmp_path.iterdir())          # refused before anything is written


@pytest.mark.parametrize("command", ["train", "finetune", "classify"])
def test_the_suggestions_are_accepted_by_the_same_subcommand(command, capsys):
    err = _error([command, *_argv()], capsys)
    suggested = []
    for m in re.finditer(r"did you mean (--[a-z0-9-]+)( [^ ?]+)?\?", err):
        suggested += [m.group(1)] + ([m.group(2).strip()] if m.group(2) else [])
    args, extras = build_parser().parse_known_args([command, *suggested])
    assert extras == [] and args.command == command
    assert getattr(args, "optim.lr") == "2e-4" and getattr(args, "train.epochs") == "3"
    assert getattr(args, "checkpoint.save_strategy") == "epoch" and getattr(args, "budget.auto_fit") is True


def test_other_hf_habits_and_unknown_flags(capsys):
    err = _error(["finetune", "stray", "--max_seq_length", "512", "--lora_r", "16", "--fp16", "--load_best_model_at_end",
                  "--lr_scheduler_type", "cosine", "--frobnicate"], capsys)
    assert "--max_seq_length: did you mean --max-seq-len 512?" in err
    assert "--lora_r: did you mean --lora-r 16?" in err
    assert "--fp16: did you mean --precision fp16?" in err
    assert "--load_best_model_at_end: best/ is always kept" in err
    assert "--lr_scheduler_type: memfit's schedule is linear warmup then cosine" in err
    assert "--frobnicate: not a memfit option" in err and "unexpected argument(s) stray" in err
    assert "--save-evry: did you mean --save-every?" in _error(["train", "--save-evry", "5"], capsys)


@pytest.mark.parametrize("argv, prog", [
    (["train", "--batch-size"], "memfit train"),                 # a flag without its value
    (["finetune", "--lora", "--lora", "--epochs"], "memfit finetune"),
    (["merge", "--out", "x"], "memfit merge"),                   # a required flag missing
    (["eval", "--model", "m", "--data", "d", "--batch-size", "many"], "memfit eval"),   # a bad int
    (["data", "inspect", "--nope"], "memfit data inspect"),
    (["doctor", "--jsn"], "memfit doctor"),
])
def test_every_argparse_error_shows_the_subcommand_usage(argv, prog, capsys):
    err = _error(argv, capsys)
    assert err.startswith(f"usage: {prog}") and f"{prog}: error:" in err and "usage: memfit [-h]" not in err
    assert len(err.splitlines()) <= 6, err      # the usage is one line, not 30 lines of flags


def test_the_installed_command_exits_2():
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"))
    r = subprocess.run([sys.executable, "-m", "memfit.cli", "train", "--learning_rate", "1e-3"],
                       capture_output=True, text=True, env=env)
    assert r.returncode == 2 and "--learning_rate: did you mean --lr 1e-3?" in r.stderr and not r.stdout
