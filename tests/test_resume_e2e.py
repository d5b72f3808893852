"""Issue 4 end to end: real `memfit train` runs killed, stopped, corrupted, squeezed and resumed.

One tiny job (a ~185k-parameter GPT-2, B4 x T32, 24 steps, a checkpoint every 4 steps, an evaluation
every 8) is trained once without interruption (the reference) and then again and again with
interruptions; every interrupted-and-resumed run must end bit-identical to the reference (final and
best/ weights compared with torch.equal, history.jsonl row by row without the wall-clock keys).

Processes use one thread (OMP_NUM_THREADS=1; the in-process runs set torch.set_num_threads(1)):
bit-exactness needs the same thread count and precision before and after a resume. The precision is
the default (`auto`: bf16 autocast on this CPU, which has native bf16; fp32 elsewhere);
bench/chaos.py --precision fp32 checks fp32 the same way.

To keep the file fast, the reference, the chaos sequence and the first session of the --time-limit
run overlap in time (background processes); checks that need no real process kill run in-process
through memfit.cli.main. MEMFIT_E2E_SEED=<n> replays the random kill points of a failed run.
"""

from __future__ import annotations

import json
import math
import os
import random
import re
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
import chaos as H  # noqa: E402  (the harness shared with bench/chaos.py)

N, SAVE, EVAL, LOG = 24, 4, 8, 3
SEED = int(os.environ.get("MEMFIT_E2E_SEED") or random.SystemRandom().randrange(1 << 30))
TL_DELAY = 25.0          # the --time-limit run's process sleeps this long before memfit starts in it


def _verify(path: Path):
    from memfit.ckpt.io import verify_checkpoint
    return verify_checkpoint(path)


class E2E:
    """The background processes of this module and what they left behind."""

    def __init__(self, work: Path) -> None:
        self.work = work
        self.corpus = H.make_corpus(work / "corpus")
        self.rng = random.Random(SEED)
        self.t_ref = time.time()
        self.ref_proc = H.start(self.args("ref"), work / "ref.out")
        self.ref_dir = work / "ref"
        self._chaos: dict | None = None
        self.tl_proc: subprocess.Popen | None = None

    def args(self, run: str, steps: int = N, extra=(), save_every: int = SAVE, eval_every: int = EVAL) -> list[str]:
        return H.train_args(self.work / run, self.corpus, steps, save_every, eval_every, LOG, list(extra))

    def ref(self) -> Path:
        rc = self.ref_proc.wait(600)
        assert rc == 0, (self.work / "ref.out").read_text()[-3000:]
        return self.ref_dir

    # ------------------------------------------------------------ the --time-limit run, session 1
    def maybe_start_time_limit(self, wait: bool = False) -> None:
        if self.tl_proc is not None or (self.ref_proc.poll() is None and not wait):
            return
        ref = self.ref()
        rows = H.history(ref, keep_timing=True)
        train = [r for r in rows if r["kind"] == "train"]
        step_s = (train[-1]["elapsed"] - train[0]["elapsed"]) / max(1, train[-1]["step"] - train[0]["step"])
        startup = max(3.0, train[0]["time"] - self.t_ref)
        window = max(5.0, 60.0 - TL_DELAY - startup - 8.0)     # training time left in the session
        self.tl_steps = max(40, math.ceil(2.0 * window / step_s))   # twice what should fit
        self.tl_calibration = f"step {step_s:.3f}s, start-up {startup:.1f}s, window {window:.0f}s"
        self.tl_t0 = time.time()
        self.tl_proc = H.start(self.args("tl", self.tl_steps, ["--time-limit", "60s"], save_every=25,
                                         eval_every=25), self.work / "tl.out", delay_s=TL_DELAY)

    # ------------------------------------------------------------ the chaos sequence
    def chaos(self) -> dict:
        """P1: killed by the hook while writing its 2nd checkpoint; P2: SIGKILL at a random moment of a
        random step; P3: SIGTERM at a random step (must exit 75); P4: resumed to the end."""
        if self._chaos is not None:
            return self._chaos
        run, out, res = self.work / "chaos", self.work / "chaos.out", {}
        marker = self.work / "killed-during-save.json"
        env = H.child_env({H.KILL_ENV: "2:state", H.MARKER_ENV: str(marker)})
        res["p1_rc"] = H.start(self.args("chaos"), out, env).wait(600)
        res["p1_marker"] = json.loads(marker.read_text()) if marker.exists() else None
        res["p1_names"] = sorted(p.name for p in (run / "checkpoints").iterdir())
        self.maybe_start_time_limit()

        resume = [*self.args("chaos"), "--resume", "auto"]
        base = max(H.checkpoint_steps(run), default=0)
        target = self.rng.randint(base + 1, base + 2 * SAVE)
        delay = self.rng.uniform(0.0, 0.25)
        proc = H.start(resume, out)
        while proc.poll() is None and H.last_step(run) < target:
            time.sleep(0.01)
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        res["p2_rc"], res["p2_at"] = proc.wait(600), f"step >= {target} + {delay:.2f}s"
        res["p2_bad"] = H.bad_checkpoints(run)
        self.maybe_start_time_limit()

        base = max(H.checkpoint_steps(run), default=0)
        target = min(N - 2, self.rng.randint(base + 1, base + 2 * SAVE))
        p3_out = self.work / "p3.out"
        proc = H.start(resume, p3_out)
        while proc.poll() is None and H.last_step(run) < target:
            time.sleep(0.01)
        proc.send_signal(signal.SIGTERM)
        res["p3_rc"], res["p3_at"] = proc.wait(600), target
        res["p3_out"] = p3_out.read_text()
        m = re.search(r"stopped resumably at step (\d+)", res["p3_out"])
        res["p3_step"] = int(m.group(1)) if m else None
        res["p3_ckpts"] = H.checkpoint_steps(run)
        if res["p3_step"] is not None:
            res["p3_verify"] = _verify(run / "checkpoints" / f"step-{res['p3_step']}")
        res["p3_log"] = (run / "memfit.log").read_text()
        self.maybe_start_time_limit()

        res["p4_rc"] = H.start(resume, out).wait(600)
        res["log"] = (run / "memfit.log").read_text()
        res["out"] = out.read_text()
        self._chaos = res
        return res


@pytest.fixture(scope="module")
def e2e(tmp_path_factory):
    e = E2E(tmp_path_factory.mktemp("e2e"))
    yield e
    for p in (e.ref_proc, e.tl_proc):
        if p is not None and p.poll() is None:
            p.kill()
            p.wait()


def _inprocess(argv: list[str]) -> int:
    """`memfit train ARGV` in this process (one thread, like the subprocesses)."""
    import torch

    from memfit import cli
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return cli.main(["train", *argv])
    finally:
        torch.set_num_threads(threads)


def _why(seed_note: str, problems) -> str:
    return f"{seed_note} (MEMFIT_E2E_SEED={SEED}): " + "; ".join(map(str, problems))


# ---------------------------------------------------------------- SIGKILL at random points

def test_sigkilled_runs_resume_bit_identical(e2e):
    res = e2e.chaos()
    # P1: the hook really killed it inside its 2nd save (step 8), after the marker.
    assert res["p1_rc"] == -signal.SIGKILL
    assert res["p1_marker"] is not None and res["p1_marker"]["step"] == 2 * SAVE
    assert res["p1_marker"]["phase"] == "state"
    assert "step-4" in res["p1_names"] and "step-8" not in res["p1_names"]
    assert any(n.startswith(".tmp-step-8-") for n in res["p1_names"])      # the half-written save
    assert "removing unfinished save .tmp-step-8-" in res["log"]
    # P2: a real SIGKILL at a random point; nothing installed was damaged.
    assert res["p2_rc"] == -signal.SIGKILL, res["p2_at"]
    assert res["p2_bad"] == []
    # P4 finished; final weights, best/ and history equal the uninterrupted run's.
    assert res["p4_rc"] == 0, res["out"][-3000:]
    assert res["log"].count("checkpoint: resumed from") == 3
    problems = H.compare_runs(e2e.ref(), e2e.work / "chaos")
    assert not problems, _why(f"kill points {res['p2_at']}, SIGTERM at {res['p3_at']}", problems)


# ---------------------------------------------------------------- SIGTERM

def test_sigterm_saves_a_complete_checkpoint_and_exits_75(e2e):
    res = e2e.chaos()
    assert res["p3_rc"] == 75, res["p3_out"][-3000:]
    assert "75" in (ROOT / "README.md").read_text()                        # the documented code
    assert res["p3_step"] is not None and res["p3_step"] >= res["p3_at"]
    assert "resume with: memfit train" in res["p3_out"] and "--resume auto" in res["p3_out"]
    assert "received SIGTERM" in res["p3_log"]
    manifest, problems = res["p3_verify"]
    assert problems == [] and manifest["kind"] == "full" and manifest["step"] == res["p3_step"]
    assert max(res["p3_ckpts"]) == res["p3_step"]


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
    assert _inprocess([*argv, "--resume", "auto"]) == 0
    shown = capsys.readouterr()
    text = shown.out + shown.err
    assert expect in text and f"step-{N} is unusable" in text and "falling back" in text
    assert f"resumed from {run / 'checkpoints' / f'step-{N - SAVE}'}" in text
    assert not H.compare_runs(e2e.ref(), run), H.compare_runs(e2e.ref(), run)


# ---------------------------------------------------------------- a disk budget of two checkpoints

def test_disk_budget_of_two_checkpoints(e2e, tmp_path):
    ref = e2e.ref()
    full = H.du(ref / "checkpoints" / f"step-{N}")
    light = min(H.du(ref / "checkpoints" / f"step-{s}") for s in H.checkpoint_steps(ref))
    best, final = H.du(ref / "best"), H.du(ref / "final_model")
    rest = H.du(ref) - H.du(ref / "checkpoints") - best - final
    budget = 2 * full + best + rest + light // 2         # a third checkpoint (even a light one) never fits
    run = tmp_path / "run"
    peak = {"bytes": 0, "ckpts": 0}
    stop = threading.Event()

    def watch():
        while not stop.is_set():
            peak["bytes"] = max(peak["bytes"], H.du(run))
            peak["ckpts"] = max(peak["ckpts"], len(H.checkpoint_steps(run)))
            time.sleep(0.003)

    t = threading.Thread(target=watch, daemon=True)
    t.start()
    try:
        rc = _inprocess(H.train_args(run, e2e.corpus, N, SAVE, EVAL, LOG, ["--disk-budget", str(budget)]))
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


# ---------------------------------------------------------------- --resume PATH (read-only)

def test_resume_from_a_read_only_checkpoint_into_a_new_run_dir(e2e, tmp_path):
    ref = e2e.ref()
    src = tmp_path / "input-dataset"
    shutil.copytree(ref / "checkpoints" / f"step-{N - SAVE}", src / f"step-{N - SAVE}")
    before = {p.relative_to(src): (p.stat().st_size, p.stat().st_mtime_ns) for p in src.rglob("*")}
    new = tmp_path / "continued"
    argv = [*H.train_args(new, e2e.corpus, N, SAVE, EVAL, LOG), "--resume", str(src / f"step-{N - SAVE}")]
    # A read-only mount (as on Kaggle's /kaggle/input), in a private mount namespace of the child only.
    mount = f"mount --bind {shlex.quote(str(src))} {shlex.quote(str(src))} && " \
            f"mount -o remount,ro,bind {shlex.quote(str(src))}"
    probe = subprocess.run(["unshare", "-m", "sh", "-c", f"{mount} && ! touch {shlex.quote(str(src))}/x"],
                           capture_output=True, check=False)
    if probe.returncode == 0:
        cmd = ["unshare", "-m", "sh", "-c", f'{mount} && exec "$@"', "sh", *H.memfit_cmd(), "train", *argv]
        proc = subprocess.run(cmd, env=H.child_env(), capture_output=True, text=True, timeout=600, check=False)
        rc, text = proc.returncode, proc.stdout + proc.stderr
    else:                    # no mount namespaces here: the same run, checking that nothing was written
        rc, text = _inprocess(argv), ""
    assert rc == 0, text[-3000:]
    after = {p.relative_to(src): (p.stat().st_size, p.stat().st_mtime_ns) for p in src.rglob("*")}
    assert after == before
    log = (new / "memfit.log").read_text()
    assert f"resumed from {src / f'step-{N - SAVE}'}" in log
    assert H.same_weights(ref / "final_model/model.safetensors", new / "final_model/model.safetensors") is None
    assert H.history(new) == [r for r in H.history(ref) if r["step"] > N - SAVE]


# ---------------------------------------------------------------- Ctrl-C as KeyboardInterrupt + --mirror-to

def test_keyboard_interrupt_saves_and_the_mirror_survives_losing_the_run_dir(e2e, tmp_path, monkeypatch):
    import memfit.train.loop as loop
    ref, run, mirror = e2e.ref(), tmp_path / "run", tmp_path / "drive"
    calls, cut = {"n": 0}, 14
    real = loop.accumulate

    def accumulate(*a, **k):        # a notebook's Ctrl-C landing just after the backward of step 14
        stats = real(*a, **k)
        calls["n"] += 1
        if calls["n"] == cut:
            raise KeyboardInterrupt
        return stats

    monkeypatch.setattr(loop, "accumulate", accumulate)
    handlers = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    argv = H.train_args(run, e2e.corpus, N, SAVE, EVAL, LOG, ["--mirror-to", str(mirror)])
    assert _inprocess(argv) == 75
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == handlers   # restored
    log = (run / "memfit.log").read_text()
    assert "KeyboardInterrupt (computing gradients): redoing this step's gradients" in log
    assert f"saved step-{cut}" in log
    manifest, problems = _verify(mirror / "checkpoints" / f"step-{cut}")       # copied to the mirror
    assert problems == [] and manifest["kind"] == "full"
    assert (mirror / "checkpoints" / "latest").read_text().strip() == f"step-{cut}"
    assert H.history(run) == [r for r in H.history(ref) if r["step"] <= cut]

    monkeypatch.setattr(loop, "accumulate", real)
    shutil.rmtree(run)                                   # the machine's disk is gone; the mirror is not
    assert _inprocess([*argv, "--resume", "auto"]) == 0
    log = (run / "memfit.log").read_text()
    assert f"resumed from {mirror / 'checkpoints' / f'step-{cut}'}" in log
    assert H.same_weights(ref / "final_model/model.safetensors", run / "final_model/model.safetensors") is None
    # history.jsonl lived on the lost disk: the resumed run has the rows after the checkpoint
    assert H.history(run) == [r for r in H.history(ref) if r["step"] > cut]
    assert (mirror / "checkpoints" / "latest").read_text().strip() == f"step-{N}"
    assert H.checkpoint_steps(mirror)[-1] == N and len(H.checkpoint_steps(mirror)) <= 4   # same keep-K


# ---------------------------------------------------------------- --time-limit 60s

def test_time_limit_stops_in_time_then_resume_finishes(e2e):
    e2e.maybe_start_time_limit(wait=True)
    run, out = e2e.work / "tl", e2e.work / "tl.out"
    rc = e2e.tl_proc.wait(600)
    took = time.time() - e2e.tl_t0                           # from just before the process started
    text = out.read_text()
    assert rc == 75, f"{e2e.tl_calibration}, {e2e.tl_steps} steps: exit {rc}\n{text[-3000:]}"
    assert took < 60.0, f"exited {took:.1f}s after its start"
    m = re.search(r"stopped resumably at step (\d+)", text)
    stop = int(m.group(1))
    assert 0 < stop < e2e.tl_steps
    manifest, problems = _verify(run / "checkpoints" / f"step-{stop}")      # a full checkpoint...
    assert problems == [] and manifest["kind"] == "full"
    rows = H.history(run)
    assert rows[-1]["kind"] == "eval" and rows[-1]["step"] == stop         # ...an evaluation...
    from memfit.ckpt.io import load_model_state                             # ...and the export, of step `stop`
    ck = load_model_state(run / "checkpoints" / f"step-{stop}", manifest)
    exported = H.weights(run / "final_model" / "model.safetensors")
    import torch
    assert all(torch.equal(exported[k], ck[k]) for k in exported)
    assert "the time limit is near" in (run / "memfit.log").read_text()

    # The printed command continues the run (a new session: a new process, a new 60 s).
    cmd = shlex.split(re.search(r"resume with: (.*)", text).group(1))
    assert cmd[0] == "memfit" and "--resume" in cmd
    for _ in range(3):
        rc = subprocess.run([*H.memfit_cmd(), *cmd[1:]], env=H.child_env(), capture_output=True, text=True,
                            timeout=600, check=False).returncode
        if rc != 75:
            break
    assert rc == 0
    train = [r["step"] for r in H.history(run) if r["kind"] == "train"]
    assert train == sorted(set(train)) and train[-1] == e2e.tl_steps          # no step missing or twice
    assert (run / "final_model" / "model.safetensors").exists()
