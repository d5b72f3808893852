"""Issue 10 item 7: training_history.json has the same summary for every job kind (status, stop reason, step,
best metric), stop and resume events are in the history, a memfit.fit stopped by a signal returns its
metrics, and the plot has every step's training loss (not only the logged steps)."""

import json
import signal

import pytest
from run_helpers import tiny_bert_folder, tiny_lm_folder
from test_api_fit import new_model, ns
from test_train_e2e import small_corpus

import memfit
from memfit.cli import main
from memfit.plots import step_losses

COMMON = ["--max-steps", "4", "--eval-every", "2", "--log-every", "3", "--batch-size", "4", "--quiet",
          "--eval-batches", "2"]


def _job_args(kind, tmp_path):
    if kind == "train":
        return ["train", "--data", str(small_corpus(tmp_path / "data")), "--target-params", "150k",
                "--vocab-size", "512", "--seq-len", "16", "--sample-tokens", "0"], "val_loss", min
    if kind == "finetune":
        rows = [{"instruction": f"Add {a} and 3.", "input": "", "output": f"{a + 3}."} for a in range(10, 40)]
        (tmp_path / "t.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        return ["finetune", "--model", str(tiny_lm_folder(tmp_path / "lm")), "--data", str(tmp_path / "t.jsonl"),
                "--precision", "fp32", "--sample-tokens", "0"], "val_loss", min
    words = ["alpha", "beta gamma", "delta epsilon", "theta"]
    lines = ["text,label"] + [f"{words[i % 4]} {words[(i * 7) % 4]},{'ab'[i % 2]}" for i in range(40)]
    (tmp_path / "d.csv").write_text("\n".join(lines) + "\n")
    return ["classify", "--model", str(tiny_bert_folder(tmp_path / "bert")), "--data", str(tmp_path / "d.csv"),
            "--precision", "fp32", "--val-fraction", "0.25"], "f1", max


@pytest.mark.parametrize("kind", ["train", "finetune", "classify"])
def test_every_cli_job_writes_the_summary(tmp_path, kind):
    args, metric, better = _job_args(kind, tmp_path)
    run = tmp_path / "run"
    assert main(args + COMMON + ["--output-dir", str(run)]) == 0
    hist = json.loads((run / "training_history.json").read_text())
    s = hist["summary"]
    evals = [r for r in hist["eval"] if r.get("phase") != "before"]
    best = better(evals, key=lambda r: r[metric])
    assert (s["status"], s["reason"], s["step"], s["total_steps"], s["exit_code"]) == ("finished", "", 4, 4, 0)
    assert s["best"] == {"metric": metric, "value": best[metric], "step": best["step"]}
    assert s["final_model"] == str(run / "final_model") and s["metrics"][metric] == evals[-1][metric]
    assert s["tokens"] == hist["train"][-1]["tokens"]
    # logged at steps 1, 3, 4 only, yet every step's loss is there for the plot
    assert [r["step"] for r in hist["train"]] == [1, 3, 4]
    steps, losses = step_losses(hist["train"])
    assert steps == [1, 2, 3, 4] and losses[2] == hist["train"][1]["loss"] and losses[3] == hist["train"][2]["loss"]
    assert (run / "plots" / "training.png").stat().st_size > 20_000


def test_fit_stop_and_resume_are_recorded_and_metrics_returned(tmp_path):
    opts = {**ns["OPTIONS"], "inject_oom_above_tokens": None, "eval_every": 6, "log_every": 4, "save_every": 100}
    ref = memfit.fit(new_model(), ns["make_data"](96), loss_fn=ns["loss_fn"], eval_data=ns["make_data"](32, 1),
                     output_dir=tmp_path / "ref", **opts)

    def ctrl_c(step, row):
        if step == 5:
            signal.raise_signal(signal.SIGINT)
    model = new_model()
    run = tmp_path / "run"
    first = memfit.fit(model, ns["make_data"](96), loss_fn=ns["loss_fn"], eval_data=ns["make_data"](32, 1),
                       output_dir=run, on_step=ctrl_c, **opts)
    assert first.status == "stopped" and first.step == 5
    assert set(first.metrics) == {"train_loss"}             # no evaluation yet: the training loss
    ref_steps, ref_losses = step_losses([r for r in ref.history if r["kind"] == "train"])
    assert first.metrics["train_loss"] == ref_losses[4]
    s = json.loads((run / "training_history.json").read_text())["summary"]
    assert (s["status"], s["reason"], s["step"], s["exit_code"], s["best"]) == \
        ("stopped", "received SIGINT", 5, 75, None)
    second = memfit.fit(model, ns["make_data"](96), loss_fn=ns["loss_fn"], eval_data=ns["make_data"](32, 1),
                        output_dir=run, resume="auto", **opts)
    assert second.status == "finished" and second.metrics["val_loss"] == ref.metrics["val_loss"]
    hist = json.loads((run / "training_history.json").read_text())
    assert [(e["kind"], e["step"]) for e in hist["events"]] == [("stop", 5), ("resume", 5)]
    assert hist["events"][0]["reason"] == "received SIGINT" and hist["events"][1]["checkpoint"] == "step-5"
    s = hist["summary"]
    best = min(hist["eval"], key=lambda r: r["val_loss"])
    assert (s["status"], s["step"], s["best"]) == ("finished", 10, {"metric": "val_loss",
                                                                     "value": best["val_loss"], "step": best["step"]})
    steps, losses = step_losses(hist["train"])      # every step once, the same as the uninterrupted run
    assert steps == ref_steps == list(range(1, 11)) and losses == ref_losses
