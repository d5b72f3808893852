"""--eval-strategy / --save-strategy epoch (issue 17): a real 3-epoch fine-tune saves and evaluates at
exactly the epoch-end steps, and nowhere else."""

from __future__ import annotations

import json


from memfit import config as C
from memfit.cli import main
from memfit.run_length import with_epoch_cadence
from run_helpers import tiny_lm_folder


def test_three_epochs_checkpoint_and_evaluate_at_each_epoch_end(tmp_path):
    rows = [{"prompt": f"Question {i}:", "completion": f" answer {i}."} for i in range(30)]
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    run = tmp_path / "run"
    rc = main(["finetune", "--model", str(tiny_lm_folder(tmp_path / "lm")), "--data", str(data),
               "--val-fraction", "0.2", "--batch-size", "4", "--packing", "off", "--epochs", "3",
               "--save-strategy", "epoch",
               "--eval-strategy", "epoch", "--eval-batches", "1", "--sample-tokens", "0", "--precision", "fp32",
               "--log-every", "1", "--quiet", "--output-dir", str(run)])
    assert rc == 0
    events = [json.loads(x) for x in (run / "history.jsonl").read_text().splitlines()]
    steps = max(e.get("step", 0) for e in events)
    assert steps % 3 == 0 and steps >= 6, steps       # 3 epochs of whole steps
    per = steps // 3
    ckpts = sorted(int(p.name.split("-")[1]) for p in (run / "checkpoints").glob("step-*"))
    assert ckpts == [per, 2 * per, 3 * per]
    evals = sorted({e["step"] for e in events if "val_loss" in e})
    assert [s for s in evals if s < steps] == [per, 2 * per]    # and the final evaluation at the last step


def test_strategy_steps_leaves_the_cadence_alone_and_epoch_replaces_it():
    cfg = C.Config(task="finetune").replace(train={"eval_every": 7}, checkpoint={"save_every": 5})
    assert with_epoch_cadence(cfg, 12) == cfg
    e = with_epoch_cadence(cfg.replace(train={"eval_strategy": "epoch"}, checkpoint={"save_strategy": "epoch"}),
                           12.0)
    assert (e.train.eval_every, e.checkpoint.save_every) == (12, 12)
    # an estimated pretraining epoch of 10.4 steps is 11 whole steps, as total_steps counts one epoch
    assert with_epoch_cadence(cfg.replace(train={"eval_strategy": "epoch"}), 10.4).train.eval_every == 11


def test_a_strategy_outside_its_choices_is_exit_2(tmp_path, capsys):
    rc = main(["finetune", "--model", "x", "--eval-strategy", "no", "--save-strategy", "best",
               "--output-dir", str(tmp_path / "r")])
    err = capsys.readouterr().err
    assert rc == 2 and "eval_strategy" in err and "save_strategy" in err
    assert not (tmp_path / "r").exists()
