"""Issue 10 item 12 and issue 18 (time): after the last step the run saves first, then evaluates and
exports; a signal during the last step still finishes the run; a signal during the final evaluation or
export stops within seconds (exit 75, "run `--resume auto` to finish the export") and the resume only
finishes them; the final validation is bounded by --eval-batches and by the time left."""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
import chaos as H

N = 6


def _argv(run: Path, corpus: Path, extra=()) -> list[str]:
    return ["train", *H.train_args(run, corpus, N, save_every=4, eval_every=100, log_every=1, extra=list(extra))]


def _main(argv: list[str]) -> int:
    import torch

    from memfit.cli import main
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return main(argv)
    finally:
        torch.set_num_threads(threads)


def _train_steps(run: Path) -> list[int]:
    return [r["step"] for r in H.history(run) if r["kind"] == "train"]


def test_sigint_during_the_last_step_saves_and_finishes(corpus, tmp_path, monkeypatch, capsys):
    from memfit.train import loop
    run, calls, real = tmp_path / "run", {"n": 0}, loop.accumulate

    def accumulate(*a, **k):      # a real SIGINT to this process, delivered inside the last step
        calls["n"] += 1
        if calls["n"] == N:
            os.kill(os.getpid(), signal.SIGINT)
        return real(*a, **k)

    monkeypatch.setattr(loop, "accumulate", accumulate)
    assert _main(_argv(run, corpus)) == 0
    log = (run / "memfit.log").read_text()
    assert "SIGINT arrived during the last step: saving, then finishing" in log
    assert "stopped resumably" not in capsys.readouterr().out
    assert _train_steps(run) == list(range(1, N + 1))
    assert [r["step"] for r in H.history(run) if r["kind"] == "eval"] == [N]
    assert (run / "final_model" / "model.safetensors").exists()
    assert H.same_weights(run / "checkpoints" / f"step-{N}" / "model.safetensors",
                          run / "final_model" / "model.safetensors") is None


def test_a_signal_during_the_export_stops_at_once_and_resume_only_finishes(corpus, tmp_path, monkeypatch, capsys):
    import memfit.export as export
    run, real, when = tmp_path / "run", export.export_hf, {}

    def slow_export(*a, **k):     # an export that would take minutes; SIGTERM arrives in the middle
        when["signal"] = time.monotonic()
        os.kill(os.getpid(), signal.SIGTERM)
        for _ in range(600):
            time.sleep(0.1)
        return real(*a, **k)

    monkeypatch.setattr(export, "export_hf", slow_export)
    assert _main(_argv(run, corpus)) == 75
    took = time.monotonic() - when["signal"]
    out = capsys.readouterr().out
    assert took < 10, f"stopped {took:.1f}s after the signal"
    assert "received SIGTERM while exporting final_model/" in out
    assert "run `--resume auto` to finish the export" in out and "resume with: memfit" in out
    assert not (run / "final_model").exists()
    assert not [p for p in run.iterdir() if p.name.startswith("final_model.tmp")]
    assert H.checkpoint_steps(run)[-1] == N                                # saved before the export

    monkeypatch.setattr(export, "export_hf", real)
    assert _main([*_argv(run, corpus), "--resume", "auto"]) == 0
    log = (run / "memfit.log").read_text()
    assert f"resumed at step {N}" in log
    assert _train_steps(run) == list(range(1, N + 1))                      # nothing trained again
    assert [r["step"] for r in H.history(run) if r["kind"] == "eval"] == [N]
    assert H.same_weights(run / "checkpoints" / f"step-{N}" / "model.safetensors",
                          run / "final_model" / "model.safetensors") is None


@pytest.mark.slow
def test_sigterm_during_a_long_final_validation_stops_within_10s(corpus, tmp_path):
    """A real subprocess whose final evaluation covers a large validation set (--eval-batches 0)."""
    big = tmp_path / "big"
    big.mkdir()
    (big / "train.txt").write_text((corpus / "train.txt").read_text())
    (big / "val.txt").write_text((corpus / "train.txt").read_text() * 20)   # ~1.2 MB: minutes to score
    run, out = tmp_path / "run", tmp_path / "run.out"
    args = H.train_args(run, big, N, save_every=4, eval_every=100, log_every=1, extra=["--eval-batches", "0"])
    proc = H.start(args, out)
    t0 = time.monotonic()
    while f"saved step-{N}" not in H.log_since(run, 0) and proc.poll() is None and time.monotonic() - t0 < 300:
        time.sleep(0.02)
    time.sleep(1.0)                                     # inside the final validation
    assert proc.poll() is None, out.read_text()[-2000:]
    t_sig = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    rc = proc.wait(60)
    took = time.monotonic() - t_sig
    text = out.read_text()
    assert rc == 75 and took < 10, (rc, took, text[-2000:])
    assert "received SIGTERM while evaluating" in text and "run `--resume auto` to finish the export" in text
    # the resume (here with a bounded evaluation) finishes without training again
    assert H.run([*args, "--eval-batches", "2", "--resume", "auto"], out) == 0, out.read_text()[-2000:]
    assert _train_steps(run) == list(range(1, N + 1))
    assert (run / "final_model" / "model.safetensors").exists()


def test_final_validation_is_bounded_by_eval_batches(corpus, tmp_path):
    run = tmp_path / "run"
    assert _main(_argv(run, corpus)) == 0                   # --eval-batches 2, B4 x T32
    summary = json.loads((run / "training_history.json").read_text())["summary"]
    assert summary["val_batches"] == 2 and summary["val_tokens"] == 2 * 4 * 31


def test_final_validation_stops_at_the_deadline_margin():
    import torch

    from memfit.precision import Precision
    from memfit.train.deadline import Deadline
    from memfit.train.evaluate import evaluate_loss
    now = [0.0]
    d = Deadline(60, None, process_start=0.0, margin_s=5, clock=lambda: now[0])
    model = torch.nn.Linear(1, 1)

    def loss_fn(m, mb):                                    # every batch takes 10 s of the session
        now[0] += 10.0
        return torch.tensor(2.0), 1

    batches = ({"input_ids": torch.zeros(1, 2, dtype=torch.long)} for _ in range(20))
    out = evaluate_loss(model, batches, Precision("fp32", "cpu", ""), 1, 0, "cpu", loss_fn=loss_fn,
                        stop=d.past_margin)
    assert out["val_batches"] == 6 and now[0] == 60.0       # batch 7 would start with 0 s < 5 s margin left


def test_the_deadline_reserve_has_a_safety_factor():
    from memfit.train.deadline import Deadline
    d = Deadline(100, None, process_start=0.0, margin_s=5, clock=lambda: 0.0)
    for what, s in (("step", 2.0), ("step", 4.0), ("save", 3.0), ("eval", 4.0), ("export", 1.0)):
        d.record(what, s)
    assert d.needed() == pytest.approx(1.5 * (4.0 + 3.0 + 4.0 + 1.0) + 5)   # the slowest of each, x1.5
