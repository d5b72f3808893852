"""Issue 10 item 2: best/ and every checkpoint are complete models (weights + config + tokenizer) that load
with `memfit generate` and stock from_pretrained; --keep-last 0 keeps best/ only once the run finishes, and
the newest checkpoint until then (a stop stays resumable)."""

import json
import signal

import torch
from test_api_fit import new_model, ns
from test_train_e2e import small_corpus
from transformers import AutoModelForCausalLM, AutoTokenizer

import memfit
from memfit.cli import main

ARGS = ["--target-params", "150k", "--vocab-size", "512", "--seq-len", "16", "--batch-size", "4",
        "--max-steps", "4", "--eval-every", "2", "--eval-batches", "1", "--sample-tokens", "0", "--save-every",
        "2", "--quiet"]


def _logits(folder, ids):
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_best_and_checkpoints_load_with_from_pretrained_and_generate(tmp_path, capsys):
    data = small_corpus(tmp_path / "data")
    run = tmp_path / "run"
    assert main(["train", "--data", str(data), *ARGS, "--output-dir", str(run)]) == 0
    best_step = json.loads((run / "best" / "metrics.json").read_text())["step"]
    ids = AutoTokenizer.from_pretrained(run / "best")("ROMEO: What", return_tensors="pt")["input_ids"]
    ref = AutoTokenizer.from_pretrained(run / "tokenizer")("ROMEO: What", return_tensors="pt")["input_ids"]
    assert torch.equal(ids, ref)                      # the run's own tokenizer, not a default one
    for ck in (run / "checkpoints" / "step-2", run / "checkpoints" / "step-4", run / "best"):
        assert torch.equal(AutoTokenizer.from_pretrained(ck)("ROMEO: What", return_tensors="pt")["input_ids"],
                           ref), ck
        capsys.readouterr()
        assert main(["generate", "--model", str(ck), "--prompt", "ROMEO:", "--max-new-tokens", "5"]) == 0, ck
        assert capsys.readouterr().out.startswith("ROMEO:")
    # the weights are the ones of their step: the last checkpoint equals final_model/, best/ its step's
    assert torch.equal(_logits(run / "checkpoints" / "step-4", ids), _logits(run / "final_model", ids))
    assert torch.equal(_logits(run / "best", ids), _logits(run / "checkpoints" / f"step-{best_step}", ids))
    assert not torch.equal(_logits(run / "checkpoints" / "step-2", ids), _logits(run / "final_model", ids))


def test_keep_last_0_keeps_best_only_once_finished(tmp_path):
    data = small_corpus(tmp_path / "data")
    run = tmp_path / "run"
    assert main(["train", "--data", str(data), *ARGS, "--keep-last", "0", "--output-dir", str(run)]) == 0
    assert not list((run / "checkpoints").glob("step-*")) and not (run / "checkpoints" / "latest").exists()
    assert (run / "best" / "model.safetensors").exists() and (run / "final_model" / "config.json").exists()
    AutoTokenizer.from_pretrained(run / "best")
    AutoModelForCausalLM.from_pretrained(run / "best")


def test_keep_last_0_keeps_the_newest_checkpoint_while_running(tmp_path):
    def ctrl_c(step, row):
        if step == 5:
            signal.raise_signal(signal.SIGINT)
    opts = {**ns["OPTIONS"], "inject_oom_above_tokens": None, "save_every": 2, "keep_last": 0, "eval_every": 4}
    data = ns["make_data"](96)
    first = memfit.fit(new_model(), data, loss_fn=ns["loss_fn"], eval_data=ns["make_data"](16, 1),
                       output_dir=tmp_path / "run", on_step=ctrl_c, **opts)
    assert first.status == "stopped" and first.step == 5
    cks = tmp_path / "run" / "checkpoints"
    assert sorted(p.name for p in cks.glob("step-*")) == ["step-5"]     # step-2, step-4 superseded
    second = memfit.fit(new_model(), data, loss_fn=ns["loss_fn"], eval_data=ns["make_data"](16, 1),
                        output_dir=tmp_path / "run", resume="auto", **opts)
    assert second.status == "finished" and second.step == 10
    assert not list(cks.glob("step-*"))
    assert (tmp_path / "run" / "best" / "model.safetensors").exists()
    assert (tmp_path / "run" / "final_model" / "model.safetensors").exists()
