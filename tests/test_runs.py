"""`memfit runs` (issue 17) on real tiny runs: a finished one, a running one (a live process holding
run.lock), the same one stopped by SIGINT with a resume command that really continues it to the end,
one that does not fit, and bad input."""

from __future__ import annotations

import json
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
import chaos as H

from memfit.ckpt.io import dir_bytes
from memfit.cli import main
from memfit.jobs.runs import describe


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    return H.make_corpus(tmp_path_factory.mktemp("corpus"))


def _runs_json(capsys, *args) -> list[dict]:
    assert main(["runs", "--json", *args]) == 0
    return json.loads(capsys.readouterr().out)


def test_finished_and_failed_runs(tmp_path, corpus, capsys):
    runs = tmp_path / "runs"
    assert main(["train", *H.train_args(runs / "done", corpus, 6, save_every=4, eval_every=3)]) == 0
    rc = main(["train", *H.train_args(runs / "oom", corpus, 6, extra=["--inject-oom-above-tokens", "1",
                                                                      "--preflight", "off"])])
    assert rc == 3
    capsys.readouterr()
    done, oom = _runs_json(capsys, str(runs))
    hist = json.loads((runs / "done" / "training_history.json").read_text())
    best = min((r for r in hist["eval"] if r.get("phase") != "before"), key=lambda r: r["val_loss"])
    assert (done["run"], done["status"], done["step"], done["total_steps"]) == (str(runs / "done"), "finished", 6, 6)
    assert done["best"] == {"metric": "val_loss", "value": best["val_loss"], "step": best["step"]}
    assert done["size_bytes"] == dir_bytes(runs / "done") and done["resume"] is None and done["job"] == "pretrain"
    assert oom["status"] == "failed" and oom["reason"].startswith("does not fit: "), oom
    assert oom["resume"] is None
    assert main(["runs", str(runs)]) == 0
    table = capsys.readouterr().out
    assert "finished" in table and f"val_loss {best['val_loss']:.4g} @{best['step']}" in table and "failed" in table
    assert main(["runs", str(runs / "done")]) == 0            # one run directory lists itself
    assert capsys.readouterr().out.count("  finished  ") == 1


@pytest.mark.slow    # two training processes (~20 s on 2 shared cores)
def test_running_then_stopped_then_resumed_with_the_printed_command(tmp_path, corpus, capsys):
    run = tmp_path / "runs" / "long"
    run.parent.mkdir()
    log = tmp_path / "out.log"
    proc = H.start(H.train_args(run, corpus, 40, save_every=4, eval_every=20), log)
    try:
        while not (run / "checkpoints" / "step-4").is_dir():   # an event, not a delay
            assert proc.poll() is None, log.read_text()
            time.sleep(0.05)
        live = describe(run)
        assert live["status"] == "running" and live["reason"] == f"PID {proc.pid}" and live["step"] >= 4
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=600) == 75, log.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
    (r,) = _runs_json(capsys, str(run.parent))
    summary = json.loads((run / "training_history.json").read_text())["summary"]
    assert r["status"] == "stopped" and r["reason"] == "received SIGINT" == summary["reason"]
    assert r["step"] == summary["step"] < 40 and r["checkpoint"] == summary["step"]
    assert r["resume"] == f"memfit train --config {run}/config.yaml --resume auto --output-dir {run}"
    assert main(["runs", str(run.parent)]) == 0
    assert f"    resume: {r['resume']}" in capsys.readouterr().out
    argv = shlex.split(r["resume"])
    done = subprocess.run([*H.memfit_cmd(), *argv[1:]], env=H.child_env(), capture_output=True, text=True,
                          cwd=tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    (after,) = _runs_json(capsys, str(run.parent))
    assert (after["status"], after["step"], after["resume"]) == ("finished", 40, None)
    events = json.loads((run / "training_history.json").read_text())["events"]
    assert [e["kind"] for e in events] == ["stop", "resume"] and events[1]["step"] == r["step"]


def test_bad_dir_is_exit_2_and_no_runs_is_said(tmp_path, capsys, monkeypatch):
    assert main(["runs", str(tmp_path / "nope")]) == 2
    assert "no such directory" in capsys.readouterr().err
    (tmp_path / "f").write_text("x")
    assert main(["runs", str(tmp_path / "f")]) == 2
    monkeypatch.chdir(tmp_path)
    assert main(["runs"]) == 0 and "no runs yet" in capsys.readouterr().out
