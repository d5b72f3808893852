"""--preflight on a real `memfit train` run (issue 12): the pre-flight's real steps run between building
the model and the first batch, read no data and draw no RNG, so the run's weights are bit-identical to
the same run without them; plan.json holds what they measured (the proof that they ran)."""

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

# dropout on: a pre-flight that drew from torch's RNG would shift every mask of the real run
FLAGS = ["--target-params", "150k", "--vocab-size", "512", "--seq-len", "32", "--batch-size", "2",
         "--effective-batch", "4", "--precision", "fp32", "--max-steps", "3", "--eval-every", "2",
         "--eval-batches", "1", "--sample-tokens", "0", "--dropout", "0.1", "--gpu", "cpu",
         "--disk-budget", "2GB", "--quiet"]


def data(corpus):
    return ["--data", str(corpus / "train.txt"), "--val-data", str(corpus / "val.txt"), "--text-split", "paragraph"]


def train(run, corpus, *extra):
    r = subprocess.run([sys.executable, "-m", "memfit.cli", "train", *FLAGS, *data(corpus),
                        "--output-dir", str(run), *extra], capture_output=True, text=True, env=dict(os.environ))
    assert r.returncode == 0, r.stderr[-3000:]
    return r


@pytest.mark.slow     # two real training subprocesses: ~30 s on 2 shared cores
def test_preflight_on_trains_bit_identically_and_records_its_peak(tmp_path, corpus):
    on, off = tmp_path / "on", tmp_path / "off"
    train(on, corpus, "--preflight", "on")
    train(off, corpus, "--preflight", "off")
    a = load_file(on / "final_model" / "model.safetensors")
    b = load_file(off / "final_model" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    plan_on = json.loads((on / "plan.json").read_text())
    plan_off = json.loads((off / "plan.json").read_text())
    pf = plan_on["preflight"]
    assert pf["ok"] and pf["micro_batch"] == 2 and not pf["shrunk"]
    # CPU: the live-tensor tracker's peak, within a few % of the plan's exact trace
    assert pf["measured_peak_bytes"] > 0 and pf["predicted_peak_bytes"] == plan_on["peak_tensor_bytes"]
    assert abs(pf["error_pct"]) < 5, pf
    assert "preflight" not in plan_off
    assert json.loads((on / "training_history.json").read_text())["summary"]["step"] == 3


@pytest.mark.parametrize("value,expected", [("on", "on"), ("OFF", "off"), (True, "on"), (False, "off")])
def test_preflight_switch_reads_yaml_booleans(value, expected):
    from memfit import config as C
    assert C.from_dict({"budget": {"preflight": value}}).budget.preflight == expected


def test_preflight_switch_refuses_other_values():
    from memfit import config as C
    with pytest.raises(C.ConfigError, match="preflight"):
        C.from_dict({"budget": {"preflight": "sometimes"}})


def test_eval_rows_carry_the_plan_beside_the_measured_step_and_peak(tmp_path, corpus, monkeypatch):
    """A real in-process run whose calibration clock advances 0.5 s per reading: the measured step time
    is exactly 0.5 s (steps 3-5: the tracked steps 1-2 and the warm-up step are not timed), the measured
    CPU peak comes from the live-tensor tracker of steps 1-2 and is within a few % of the plan's trace."""
    from memfit import cli
    from memfit.train import calibrate
    ticks = iter(range(10 ** 6))
    monkeypatch.setattr(calibrate, "clock", lambda: 0.5 * next(ticks))
    run = tmp_path / "calib"
    flags = [f for f in FLAGS if f not in ("--dropout", "0.1")]
    flags[flags.index("--max-steps") + 1], flags[flags.index("--eval-every") + 1] = "6", "5"
    assert cli.main(["train", *flags, *data(corpus), "--output-dir", str(run)]) == 0
    plan = json.loads((run / "plan.json").read_text())
    evals = json.loads((run / "training_history.json").read_text())["eval"]
    assert evals and evals[0]["step"] == 5
    row = evals[0]
    assert row["plan_peak_bytes"] == plan["peak_tensor_bytes"] and row["plan_step_s"] == plan["step_seconds"]
    assert row["measured_step_s"] == 0.5
    assert 0.9 < row["measured_peak_bytes"] / row["plan_peak_bytes"] < 1.1, row
    # the closing summary: the plan beside what was measured, in training_history.json and memfit.log
    pvm = json.loads((run / "training_history.json").read_text())["summary"]["plan_vs_measured"]
    assert pvm["measured_step_s"] == 0.5 and pvm["plan_step_s"] == plan["step_seconds"]
    assert pvm["step_error_pct"] == round(100 * (plan["step_seconds"] - 0.5) / 0.5, 2)
    assert pvm["measured_peak_bytes"] == row["measured_peak_bytes"]
    assert pvm["peak_error_pct"] == round(100 * (plan["peak_tensor_bytes"] - row["measured_peak_bytes"])
                                          / row["measured_peak_bytes"], 2)
    log_text = (run / "memfit.log").read_text()
    closing = log_text[log_text.rindex("plan vs measured (this session):"):].splitlines()
    assert closing[1].strip() == (f"peak memory: {row['measured_peak_bytes'] / 2**20:.2f} MiB measured, plan "
                                  f"{plan['peak_tensor_bytes'] / 2**20:.2f} MiB ({pvm['peak_error_pct']:+.1f}%)")
    assert closing[2].strip() == (f"step time: 0.5s measured, plan {plan['step_seconds']:.4g}s "
                                  f"({pvm['step_error_pct']:+.1f}%)")


@pytest.mark.slow     # a real 14-step in-process run: ~11 s on 2 shared cores
def test_the_measured_pace_feeds_the_bar_the_sessions_and_the_deadline(tmp_path, corpus, monkeypatch, capsys):
    """Calibration's clock scripted: the tracked steps 1-2 take 9000 s (the tracker's overhead), every
    later step 6000 s. From step 10 the measured 6000 s/step is the pace: the sessions line at
    calibration (20 h sessions hold 11 steps of it, the plan's ms estimate holds the whole job), the bar's
    rate (so its ETA), and the deadline's step window, where the slow tracked steps no longer count."""
    from memfit import cli
    from memfit.train import calibrate
    reads = iter(range(10 ** 6))
    now = [0.0]

    def clock():                   # two readings per step: its start, then its end
        i = next(reads)
        if i % 2:
            now[0] += 9000.0 if i // 2 + 1 <= 2 else 6000.0
        return now[0]

    monkeypatch.setattr(calibrate, "clock", clock)
    run = tmp_path / "pace"
    flags = [f for f in FLAGS if f not in ("--dropout", "0.1", "--quiet")]
    flags[flags.index("--max-steps") + 1], flags[flags.index("--eval-every") + 1] = "14", "100"
    assert cli.main(["train", *flags, *data(corpus), "--time-limit", "20h", "--output-dir", str(run)]) == 0
    log_text = (run / "memfit.log").read_text()
    assert ("calibrated: step 6000s measured" in log_text and "  sessions at the measured 6000s/step: needs ~2 "
            "sessions of 20.0 h; this one reaches step 11 of 14, then stops resumably") in log_text
    assert "sessions: the job fits this session of 20.0 h" in log_text       # the plan's own estimate
    bar = capsys.readouterr().err.replace("\r", "\n").splitlines()
    assert "6000.00s/step" in [b for b in bar if "14/14" in b][-1]
    state = torch.load(run / "checkpoints" / "step-14" / "state.pt", weights_only=True)
    assert state["deadline"]["recent"]["step"] == [6000.0] * 5    # calibrated figure + steps 11-14
