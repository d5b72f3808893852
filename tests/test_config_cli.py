"""Typed config and the CLI's bad-input contract: exit 2 and one message naming every problem."""

import subprocess
import sys

import pytest

from memfit import config as C
from memfit.cli import main


def test_units_parse():
    assert C.parse_bytes("20GB") == 20 * 10**9
    assert C.parse_bytes("16GiB") == 16 * 2**30
    assert C.parse_duration("9h") == 32400.0
    assert C.parse_duration("1h30m") == 5400.0
    assert C.parse_duration("60s") == 60.0
    assert C.parse_count("10M") == 10_000_000
    assert C.parse_count("1.5B") == 1_500_000_000
    with pytest.raises(ValueError):
        C.parse_duration("soon")


def test_yaml_roundtrip_and_flat_and_dotted_keys(tmp_path):
    cfg = C.from_dict({"lr": "3e-4", "train.batch_size": 4, "data": {"seq_len": 64},
                       "time_limit": "2h", "target_params": "5M"})
    assert cfg.optim.lr == 3e-4 and cfg.train.batch_size == 4 and cfg.data.seq_len == 64
    assert cfg.budget.time_limit == 7200.0 and cfg.model.target_params == 5_000_000
    C.save_yaml(cfg, tmp_path / "c.yaml")
    assert C.load_yaml(tmp_path / "c.yaml") == cfg
    with pytest.raises(dataclasses_frozen()):
        cfg.train.batch_size = 2


def dataclasses_frozen():
    import dataclasses
    return dataclasses.FrozenInstanceError


def test_every_problem_is_collected_at_once():
    with pytest.raises(C.ConfigError) as e:
        C.from_dict({"batch_size": "many", "precision": "fp8", "nonsense": 1})
    assert len(e.value.problems) == 3
    cfg = C.from_dict({"batch_size": 0, "lr": -1, "seq_len": 1, "keep_last": -1})
    problems = C.validate(cfg)
    assert len(problems) == 4
    assert any("--batch-size" in p for p in problems) and any("--lr" in p for p in problems)


def test_effective_batch():
    assert C.from_dict({"batch_size": 4, "gradient_accumulation_steps": 8}).effective_batch() == 32
    assert C.from_dict({"batch_size": 4, "effective_batch": 64}).effective_batch() == 64
    assert C.from_dict({"batch_size": 4, "gradient_accumulation_steps": 8}).effective_batch(world_size=2) == 64


def test_cli_bad_input_exits_2_listing_every_problem(tmp_path, capsys):
    # five independent mistakes: a missing file, an unknown corpus, a bad number, a bad choice, a bad range
    code = main(["train", "--data", str(tmp_path / "missing.txt"), "nosuchcorpus", "--batch-size", "0",
                 "--precision", "fp8", "--lr", "-1", "--output-dir", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert code == 2
    assert err.count("\n  - ") == 5, err
    for needle in ("missing.txt", "nosuchcorpus", "--batch-size", "fp8", "--lr"):
        assert needle in err
    assert not (tmp_path / "run").exists()  # nothing written before the problems are fixed


def test_cli_refuses_a_different_run_in_the_output_dir(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    C.save_yaml(C.Config(task="pretrain").replace(optim={"lr": 0.5}), run / "config.yaml")
    before = (run / "config.yaml").read_text()
    code = main(["train", "--output-dir", str(run)])
    err = capsys.readouterr().err
    assert code == 2 and "different run" in err and "--resume auto" in err and "--overwrite" in err
    assert (run / "config.yaml").read_text() == before


def test_help_is_fast_and_documents_flags():
    out = subprocess.run([sys.executable, "-X", "importtime", "-m", "memfit.cli", "train", "--help"],
                         capture_output=True, text=True, check=True)
    for flag in ("--data", "--target-params", "--arch", "--seq-len", "--batch-size",
                 "--gradient-accumulation-steps", "--epochs", "--max-steps", "--lr", "--warmup-steps",
                 "--seed", "--precision", "--gradient-checkpointing", "--optimizer", "--max-examples",
                 "--subset-ratio", "--eval-every", "--output-dir", "--report-to", "--time-limit",
                 "--disk-budget", "--resume"):
        assert flag in out.stdout, flag
    imported = out.stderr
    assert "| torch" not in imported and "transformers" not in imported  # --help stays light


def test_shipped_example_configs_load_and_validate():
    from pathlib import Path
    files = sorted((Path(__file__).parent.parent / "configs").glob("*.yaml"))
    assert files
    for f in files:
        cfg = C.load_yaml(f)
        assert C.validate(cfg) == [], f
