"""Issue 4 end to end: real `memfit train` runs killed, stopped, corrupted, squeezed and resumed.

One tiny job (a ~185k-parameter GPT-2, B4 x T32, 24 steps, a checkpoint every 4 steps, an evaluation
every 8, a history row every 3) is trained once without interruption (the reference) and then again
with interruptions; every interrupted-and-resumed run must end bit-identical to the reference (final
and best/ weights compared with torch.equal, history.jsonl row by row without the wall-clock keys).

Processes use one thread (OMP_NUM_THREADS=1; in-process runs torch.set_num_threads(1)): bit-exactness
needs the same thread count and precision before and after a resume. The precision is the default
(`auto`: bf16 autocast on this CPU, which has native bf16; fp32 elsewhere); `python bench/chaos.py
--precision fp32` checks fp32 the same way.

Speed (the file takes ~2-3 minutes on 2 shared cores): a `memfit train` process spends most of its
time importing torch/transformers, so the subprocess chains (the reference; SIGKILL by the hook, SIGKILL
at a random point, resume to the end; SIGTERM, then a read-only resume; the --time-limit sessions)
start in background threads when the module's fixture is created, and the checks that need no real
process kill run meanwhile in-process through memfit.cli.main. The --time-limit sessions are the only
real-time ones: until they are done everything else runs at nice 10. MEMFIT_E2E_SEED=<n> replays the
random kill points of a failed run (the seed is in the failure messages).
"""

from __future__ import annotations

import json
import shutil
import signal
import threading
import time

import pytest
from e2e_chains import (  # the subprocess chains and helpers (tests/e2e_chains.py)
    E2E,
    EVAL,
    LOG,
    ROOT,
    SAVE,
    H,
    N,
    _seed,
    _verify,
)


@pytest.fixture(scope="module")
def e2e(tmp_path_factory):
    e = E2E(tmp_path_factory.mktemp("e2e"))
    yield e
    e.close()


# ---------------------------------------------------------------- Ctrl-C as KeyboardInterrupt + --mirror-to

def test_keyboard_interrupt_saves_and_the_mirror_survives_losing_the_run_dir(e2e, tmp_path, monkeypatch):
    from memfit.train import loop
    run, mirror = tmp_path / "run", tmp_path / "drive"
    calls, cut = {"n": 0}, 14
    real = loop.accumulate

    def accumulate(*a, **k):        # a notebook's Ctrl-C arriving just after the backward of step 14
        stats = real(*a, **k)
        calls["n"] += 1
        if calls["n"] == cut:
            raise KeyboardInterrupt
        return stats

    monkeypatch.setattr(loop, "accumulate", accumulate)
    handlers = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    argv = H.train_args(run, e2e.corpus, N, SAVE, EVAL, LOG, ["--mirror-to", str(mirror)])
    assert e2e.inprocess(argv) == 75
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == handlers   # restored
    log = (run / "memfit.log").read_text()
    assert "KeyboardInterrupt (computing gradients): redoing this step's gradients" in log
    assert f"saved step-{cut} (full" in log
    manifest, problems = _verify(mirror / "checkpoints" / f"step-{cut}")    # copied to the mirror
    assert problems == [] and manifest["kind"] == "full"
    assert (mirror / "checkpoints" / "latest").read_text().strip() == f"step-{cut}"
    history_cut = H.history(run)

    monkeypatch.setattr(loop, "accumulate", real)
    shutil.rmtree(run)                                   # the machine's disk is gone; the mirror is not
    assert e2e.inprocess([*argv, "--resume", "auto"]) == 0
    log = (run / "memfit.log").read_text()
    assert f"resumed from {mirror / 'checkpoints' / f'step-{cut}'}" in log
    assert (mirror / "checkpoints" / "latest").read_text().strip() == f"step-{N}"
    assert H.checkpoint_steps(mirror)[-1] == N and len(H.checkpoint_steps(mirror)) <= 4     # same keep-K

    ref = e2e.ref()
    assert history_cut == [r for r in H.history(ref) if r["step"] <= cut]   # the redone step is exact
    assert H.same_weights(ref / "final_model/model.safetensors", run / "final_model/model.safetensors") is None
    # history.jsonl was on the lost disk (it is not mirrored): the resumed run has the rows after the cut
    assert H.history(run) == [r for r in H.history(ref) if r["step"] > cut]


def test_keyboard_interrupt_during_the_update_keeps_the_last_checkpoint(e2e, tmp_path, monkeypatch, capsys):
    import torch
    run, calls, real = tmp_path / "run", {"n": 0}, torch.nn.utils.clip_grad_norm_

    from torch._subclasses.fake_tensor import FakeTensor

    def clip(params, *a, **k):      # lands between backward and optimizer step: state may be half-updated
        params = [params] if isinstance(params, torch.Tensor) else list(params)
        # The run's plan traces the step on fake tensors first: only the real updates count.
        if not any(isinstance(p, FakeTensor) or p.is_meta for p in params):
            calls["n"] += 1
            if calls["n"] == 6:
                raise KeyboardInterrupt
        return real(params, *a, **k)

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", clip)
    assert e2e.inprocess(H.train_args(run, e2e.corpus, N, SAVE, EVAL, LOG)) == 75
    assert H.checkpoint_steps(run) == [SAVE]                         # nothing written after step 4
    assert "no new checkpoint is written; the last good one is kept" in (run / "memfit.log").read_text()
    assert "--resume auto continues from the newest checkpoint" in capsys.readouterr().out


# ---------------------------------------------------------------- a disk budget of two checkpoints

def test_disk_budget_of_two_checkpoints(e2e, tmp_path):
    ref = e2e.ref()
    full = H.du(ref / "checkpoints" / f"step-{N}")
    light = min(H.du(ref / "checkpoints" / f"step-{s}") for s in H.checkpoint_steps(ref))
    best, final = H.du(ref / "best"), H.du(ref / "final_model")
    rest = H.du(ref) - H.du(ref / "checkpoints") - best - final
    budget = 2 * full + best + rest + light // 2          # a third checkpoint (even a light one) never fits
    run = tmp_path / "run"
    peak = {"bytes": 0, "ckpts": 0}
    stop = threading.Event()

    def watch():
        while not stop.is_set():
            peak["bytes"] = max(peak["bytes"], H.du(run))
            peak["ckpts"] = max(peak["ckpts"], len(H.checkpoint_steps(run)))
            time.sleep(0.002)

    t = threading.Thread(target=watch, daemon=True)
    t.start()
    try:
        rc = e2e.inprocess(H.train_args(run, e2e.corpus, N, SAVE, EVAL, LOG, ["--disk-budget", str(budget)]))
    finally:
        stop.set()
        t.join()
    peak["bytes"] = max(peak["bytes"], H.du(run))
    log = (run / "memfit.log").read_text()
    assert rc == 0                                                    # the run kept going to the end
    assert "to keep the run directory within its disk budget" in log
    assert peak["bytes"] <= budget, f"usage peaked at {peak['bytes']} > budget {budget}"
    assert peak["ckpts"] <= 2 and len(H.checkpoint_steps(run)) <= 2
    _, problems = _verify(run / "best")                               # best/ survived every pruning
    assert problems == []
    best_eval = min((r for r in H.history(run) if r["kind"] == "eval"), key=lambda r: r["val_loss"])
    assert json.loads((run / "best" / "metrics.json").read_text())["step"] == best_eval["step"]
    assert (run / "final_model" / "model.safetensors").exists()
    assert not H.compare_runs(ref, run)                               # the budget changed nothing else


# ---------------------------------------------------------------- a damaged newest checkpoint

@pytest.mark.parametrize("damage", ["flip", "truncate"])
def test_damaged_newest_checkpoint_falls_back_to_the_previous(e2e, tmp_path, damage, capsys):
    run = tmp_path / "run"
    shutil.copytree(e2e.ref(), run)
    newest = run / "checkpoints" / f"step-{N}"
    if damage == "flip":
        target = newest / "model.safetensors"
        data = bytearray(target.read_bytes())
        data[len(data) // 2] ^= 0x01
        target.write_bytes(bytes(data))
        expect = "model.safetensors is corrupt (sha256"
    else:
        target = newest / "state.pt"
        size = target.stat().st_size
        with open(target, "r+b") as f:
            f.truncate(size // 2)
        expect = f"state.pt is {size // 2} bytes, the manifest says {size} (truncated)"
    argv = [a for a in H.train_args(run, e2e.corpus, N, SAVE, EVAL, LOG) if a != "--quiet"]
    capsys.readouterr()
    assert e2e.inprocess([*argv, "--resume", "auto"]) == 0
    shown = capsys.readouterr()
    text = shown.out + shown.err                                      # what the user sees
    assert expect in text and f"step-{N} is unusable" in text and "falling back" in text
    assert f"resumed from {run / 'checkpoints' / f'step-{N - SAVE}'}" in text
    assert not H.compare_runs(e2e.ref(), run), H.compare_runs(e2e.ref(), run)


# ---------------------------------------------------------------- SIGKILL at random points

def test_sigkilled_runs_resume_bit_identical(e2e):
    res = e2e.chaos_future.result()
    # P1: the hook really killed it inside its 2nd save (step 8), after writing the marker.
    assert res["p1_rc"] == -signal.SIGKILL
    assert res["p1_marker"] is not None and res["p1_marker"]["step"] == 2 * SAVE
    assert res["p1_marker"]["phase"] == "state"
    assert "step-4" in res["p1_names"] and "step-8" not in res["p1_names"]
    assert any(n.startswith(".tmp-step-8-") for n in res["p1_names"])      # the half-written save
    assert "removing unfinished save .tmp-step-8-" in res["log"]
    # P2: a real SIGKILL at a random point; nothing installed was damaged.
    assert res["p2_rc"] == -signal.SIGKILL, _seed(res["p2_at"])
    assert res["p2_bad"] == [], _seed(res["p2_at"])
    # P3 finished; final weights, best/ and history equal the uninterrupted run's.
    assert res["p3_rc"] == 0, res["out"][-3000:]
    assert res["log"].count("checkpoint: resumed from") == 2
    problems = H.compare_runs(e2e.ref(), e2e.work / "chaos")
    assert not problems, _seed(f"(kill {res['p2_at']}): {problems}")


# ---------------------------------------------------------------- SIGTERM

def test_sigterm_saves_a_complete_checkpoint_and_exits_75(e2e):
    res = e2e.term_future.result()
    assert res["rc"] == 75, res["out"][-3000:]
    assert "| 75 |" in (ROOT / "README.md").read_text()                     # the documented code
    assert res["step"] is not None and res["step"] >= res["at"]
    assert "resume with: memfit train" in res["out"] and "--resume auto" in res["out"]
    assert "received SIGTERM" in res["log"]
    manifest, problems = res["verify"]
    assert problems == [] and manifest["kind"] == "full" and manifest["step"] == res["step"]
    assert max(res["ckpts"]) == res["step"]
    assert H.history(e2e.work / "term") == [r for r in H.history(e2e.ref()) if r["step"] <= res["step"]]


# ---------------------------------------------------------------- --resume PATH (read-only)

def test_resume_from_a_read_only_checkpoint_into_a_new_run_dir(e2e):
    res = e2e.term_future.result()
    ro, ref, new, stop = res.get("ro"), e2e.ref(), e2e.work / "continued", res["step"]
    assert ro is not None, "the SIGTERM run left no checkpoint to continue"
    assert ro["rc"] == 0, (e2e.work / "ro.out").read_text()[-3000:]
    assert ro["after"] == ro["before"]                            # nothing written, moved or set aside
    log = (new / "memfit.log").read_text()
    assert f"resumed from {ro['src'] / f'step-{stop}'}" in log
    assert H.same_weights(ref / "final_model/model.safetensors", new / "final_model/model.safetensors") is None
    assert H.history(new) == [r for r in H.history(ref) if r["step"] > stop]


# ---------------------------------------------------------------- --time-limit 60s

def test_time_limit_stops_in_time_then_resume_finishes(e2e):
    res = e2e.tl_future.result()
    note = f"{res['calibration']}, {res['steps']} steps"
    assert res["rc1"] == 75, f"{note}: exit {res['rc1']}\n{res['out1'][-3000:]}"
    assert res["took"] < 60.0, f"{note}: exited {res['took']:.1f}s after its start"
    stop = res["stop"]
    assert 0 < stop < res["steps"]
    manifest, problems = res["verify"]                                     # a full checkpoint...
    assert problems == [] and manifest["kind"] == "full"
    last = res["history1"][-1]
    assert last["kind"] == "eval" and last["step"] == stop                 # ...an evaluation...
    assert res["export_is_step"]                                           # ...and the export, of that step
    assert "the time limit is near" in res["log1"]
    # The printed resume command, run as the next session, finishes the run.
    assert res["cmd"][0] == "memfit" and res["cmd"][-2:] == ["--resume", "auto"]
    assert res["rc2"][-1] == 0, (e2e.work / f"{res['run'].name}-2.out").read_text()[-3000:]
    train = [r["step"] for r in res["history"] if r["kind"] == "train"]
    assert train == sorted(set(train)) and train[-1] == res["steps"]        # no step missing or twice
    assert (res["run"] / "final_model" / "model.safetensors").exists()
