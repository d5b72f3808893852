"""Issue 18, resume half: a refused resume changes nothing; damaged checkpoints are named, never
silently replaced by a fresh start; a crafted state.pt is one more kind of damage. Real runs of a tiny
GPT-2 (`memfit train`, in-process through memfit.cli.main where no process needs killing)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
import chaos as H  # noqa: E402  (the harness shared with bench/chaos.py)

from memfit import cli  # noqa: E402
from run_helpers import copy_run, snapshot  # noqa: E402


def train(args: list[str], capsys) -> tuple[int, str]:
    rc = cli.main(["train", *args])
    out = capsys.readouterr()
    return rc, out.err + out.out


@pytest.mark.parametrize("change", [["--target-params", "400k"], ["--data", "OTHER"], ["--arch", "llama"]])
def test_a_resume_with_other_model_or_data_is_refused_before_anything_is_written(tmp_path, finished_run,
                                                                                 corpus, capsys, change):
    d = copy_run(finished_run, tmp_path / "run")
    if change[1] == "OTHER":
        (tmp_path / "other.txt").write_text((corpus / "train.txt").read_text()[:30_000].upper())
        change = ["--data", str(tmp_path / "other.txt")]
    before = snapshot(d)
    rc, err = train(H.train_args(d, corpus, 6, save_every=2, eval_every=4, log_every=1, extra=change)
                    + ["--resume", "auto"], capsys)
    assert rc == 2, err
    assert change[0] in err and "Traceback" not in err and "--resume weights:" in err, err
    assert snapshot(d) == before, "a refused resume changed the run directory"


def test_resume_of_another_models_checkpoint_is_exit_2_before_writing(tmp_path, finished_run, corpus, capsys):
    src = copy_run(finished_run, tmp_path / "src")
    ckpt = src / "checkpoints" / "step-4"
    new = tmp_path / "new"
    args = H.train_args(new, corpus, 6, extra=["--target-params", "400k", "--resume", str(ckpt)])
    rc, err = train(args, capsys)
    assert rc == 2 and "--target-params" in err and "Traceback" not in err, err
    (src / "config.yaml").unlink()             # no config to compare with: the weights' shapes are
    rc, err = train(args, capsys)
    assert rc == 2 and "holds another model" in err and "Traceback" not in err, err
    assert not new.exists()


def _flip(p: Path) -> None:
    data = bytearray(p.read_bytes())
    data[len(data) // 2] ^= 0xFF
    p.write_bytes(bytes(data))


def test_all_states_damaged_is_exit_2_keeping_them_and_weights_path_starts_a_new_run(tmp_path, finished_run,
                                                                                    corpus, capsys):
    d = copy_run(finished_run, tmp_path / "run")
    for s in (2, 4):
        _flip(d / "checkpoints" / f"step-{s}" / "state.pt")
    kept = {k: v for k, v in snapshot(d).items() if k.startswith(("checkpoints", "best", "final_model"))}
    args = H.train_args(d, corpus, 6, save_every=2, eval_every=4, log_every=1) + ["--resume", "auto"]
    rc, err = train(args, capsys)
    assert rc == 2, err
    assert "Traceback" not in err and "step-2" in err and "step-4" in err and "state.pt is corrupt" in err, err
    step4 = d / "checkpoints" / "step-4"
    assert f"--resume weights:{step4}" in err, err
    assert {k: v for k, v in snapshot(d).items() if k.startswith(("checkpoints", "best", "final_model"))} == kept

    # the offered remedy: a new run from step-4's weights only, at step 0
    new = tmp_path / "new"
    rc, err = train(H.train_args(new, corpus, 2, save_every=2, eval_every=2, log_every=1)
                    + ["--resume", f"weights:{step4}"], capsys)
    assert rc == 0, err
    log = (new / "memfit.log").read_text()
    assert f"NEW RUN from the weights of {step4}" in log
    rows = [r for r in H.history(new) if r["kind"] == "train"]
    assert [r["step"] for r in rows] == [1, 2]
    fresh = next(r for r in H.history(finished_run) if r["kind"] == "train" and r["step"] == 1)
    # same seed and data, so step 1 sees the fresh run's first batch, but with 4 steps of training behind it
    assert rows[0]["loss"] < fresh["loss"] - 0.05, (rows[0]["loss"], fresh["loss"])


def test_a_crafted_state_file_is_damage_not_a_traceback(tmp_path, finished_run, corpus, capsys):
    """A state.pt with a pickled object the safe loader refuses, manifest updated so the hashes pass."""
    import argparse

    import torch

    from memfit.ckpt.formats import sha256_file
    d = copy_run(finished_run, tmp_path / "run")
    step4 = d / "checkpoints" / "step-4"
    torch.save({"loop": argparse.Namespace(step=4)}, step4 / "state.pt")
    m = json.loads((step4 / "manifest.json").read_text())
    n, digest = sha256_file(step4 / "state.pt")
    m["files"]["state.pt"] = {"bytes": n, "sha256": digest}
    (step4 / "manifest.json").write_text(json.dumps(m))
    rc, err = train(H.train_args(d, corpus, 6, save_every=2, eval_every=4, log_every=1)
                    + ["--resume", "auto"], capsys)
    assert rc == 0, err
    log = (d / "memfit.log").read_text()
    assert "step-4 is unusable" in log and "safe loader" in log and "falling back" in log, log
    assert "resumed from" in log and "step-2" in log.split("resumed from", 1)[1].splitlines()[0]
    assert "weights_only" not in log + err and "Traceback" not in err
    assert [r["step"] for r in H.history(d) if r["kind"] == "train"] == [1, 2, 3, 4, 5, 6]
