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
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
import chaos as H  # the harness shared with bench/chaos.py

N, SAVE, EVAL, LOG = 24, 4, 8, 3
SEED = int(os.environ.get("MEMFIT_E2E_SEED") or random.SystemRandom().randrange(1 << 30))
TL_DELAY = 20.0          # the --time-limit process sleeps this long before memfit starts in it


def _verify(path: Path):
    from memfit.ckpt.io import verify_checkpoint
    return verify_checkpoint(path)


class E2E:
    """The module's background work: subprocesses driven from threads, results as futures."""

    def __init__(self, work: Path) -> None:
        self.work = work
        self.corpus = H.make_corpus(work / "corpus")
        self.rng = random.Random(SEED)
        self.procs: list[subprocess.Popen] = []
        self.pool = ThreadPoolExecutor(4, thread_name_prefix="e2e")
        # The --time-limit session is the one with a real-time requirement: it starts first, sized by
        # a step measured now, and the rest of the background work runs at a lower CPU priority.
        self.step_s = H.step_seconds()
        self.tl_done = threading.Event()
        self.tl_future: Future = self.pool.submit(self._time_limit)
        self.ref_proc = self.start(self.args("ref"), "ref.out")
        self.ref_future: Future = self.pool.submit(self._ref)
        self.chaos_future: Future = self.pool.submit(self._chaos)
        self.term_future: Future = self.pool.submit(self._sigterm_then_read_only)

    def args(self, run: str, steps: int = N, extra=(), save_every: int = SAVE, eval_every: int = EVAL) -> list[str]:
        return H.train_args(self.work / run, self.corpus, steps, save_every, eval_every, LOG, list(extra))

    def start(self, args, out: str, env=None, delay_s: float = 0.0, nice: int | None = None) -> subprocess.Popen:
        if nice is None:
            nice = self.nice()
        proc = H.start(args, self.work / out, env, delay_s, nice=nice)
        self.procs.append(proc)
        return proc

    def nice(self) -> int:
        """CPU priority for background work: lower while the time-limited sessions run."""
        return 0 if self.tl_done.is_set() else 10

    def _time_limit_over(self) -> None:
        self.tl_done.set()
        for p in self.procs:               # back to normal priority (needs privileges; else they stay)
            try:
                if p.poll() is None:
                    os.setpriority(os.PRIO_PROCESS, p.pid, 0)
            except OSError:
                pass

    def close(self) -> None:
        _nice_this_thread(0)
        for p in self.procs:
            if p.poll() is None:
                p.kill()
                p.wait()
        self.pool.shutdown(wait=False, cancel_futures=True)

    # ------------------------------------------------------------ the reference
    def _ref(self) -> Path:
        rc = self.ref_proc.wait(900)
        assert rc == 0, (self.work / "ref.out").read_text()[-3000:]
        return self.work / "ref"

    def ref(self) -> Path:
        return self.ref_future.result()

    def inprocess(self, argv: list[str]) -> int:
        """`memfit train ARGV` in this process, on one thread like the subprocesses; at a lower CPU
        priority while the time-limited sessions (the only real-time ones) run."""
        _nice_this_thread(0 if self.tl_done.is_set() else 10)
        try:
            return _inprocess(argv)
        finally:
            if self.tl_done.is_set():
                _nice_this_thread(0)

    # ------------------------------------------------------------ SIGKILL (hook + random) and SIGTERM
    def _chaos(self) -> dict:
        """P1: killed by the hook while writing its 2nd checkpoint; P2: SIGKILL at a random moment of a
        random step; P3: resumed to the end."""
        run, res = self.work / "chaos", {}
        marker = self.work / "killed-during-save.json"
        env = H.child_env({H.KILL_ENV: "2:state", H.MARKER_ENV: str(marker)})
        res["p1_rc"] = self.start(self.args("chaos"), "chaos.out", env).wait(900)
        res["p1_marker"] = json.loads(marker.read_text()) if marker.exists() else None
        res["p1_names"] = sorted(p.name for p in (run / "checkpoints").iterdir())

        resume = [*self.args("chaos"), "--resume", "auto"]
        base = max(H.checkpoint_steps(run), default=0)
        target, delay = self.rng.randint(base + 1, base + 2 * SAVE), self.rng.uniform(0.0, 0.25)
        at = H.log_size(run)
        proc = self.start(resume, "chaos.out")
        H.wait_training(run, at, proc)             # (until then history.jsonl still holds P1's rows)
        H.wait_step(run, target, proc)
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        res["p2_rc"], res["p2_at"] = proc.wait(900), f"step >= {target} + {delay:.2f}s"
        res["p2_bad"] = H.bad_checkpoints(run)

        res["p3_rc"] = self.start(resume, "chaos.out").wait(900)
        res["log"] = (run / "memfit.log").read_text()
        res["out"] = (self.work / "chaos.out").read_text()
        return res

    # ------------------------------------------------------------ SIGTERM, then --resume PATH read-only
    def _sigterm_then_read_only(self) -> dict:
        """A fresh run gets SIGTERM at a random step (must exit 75 with a full checkpoint of that step);
        that checkpoint, on a read-only mount, is then continued into a new run directory."""
        run, res = self.work / "term", {}
        res["at"] = target = self.rng.randint(5, N - 4)
        proc = self.start(self.args("term"), "term.out")
        H.wait_step(run, target, proc)
        proc.send_signal(signal.SIGTERM)
        res["rc"] = proc.wait(900)
        res["out"] = (self.work / "term.out").read_text()
        m = re.search(r"stopped resumably at step (\d+)", res["out"])
        res["step"] = stop = int(m.group(1)) if m else None
        res["ckpts"] = H.checkpoint_steps(run)
        res["log"] = (run / "memfit.log").read_text() if (run / "memfit.log").exists() else ""
        if stop is None:
            return res
        res["verify"] = _verify(run / "checkpoints" / f"step-{stop}")

        ro = res["ro"] = {}
        src = ro["src"] = self.work / "input-dataset"
        shutil.copytree(run / "checkpoints" / f"step-{stop}", src / f"step-{stop}")
        ro["before"] = {p.relative_to(src): (p.stat().st_size, p.stat().st_mtime_ns) for p in src.rglob("*")}
        argv = [*self.args("continued"), "--resume", str(src / f"step-{stop}")]
        # Read-only as Kaggle's /kaggle/input is: a read-only bind mount in the child's own mount namespace.
        q = shlex.quote(str(src))
        mount = f"mount --bind {q} {q} && mount -o remount,ro,bind {q}"
        probe = subprocess.run(["unshare", "-m", "sh", "-c", f"{mount} && ! touch {q}/x 2>/dev/null"],
                               capture_output=True, check=False)
        ro["read_only_mount"] = probe.returncode == 0
        if ro["read_only_mount"]:
            cmd = ["unshare", "-m", "sh", "-c", f'{mount} && exec "$@"', "sh", "nice", "-n", str(self.nice()),
                   *H.memfit_cmd(), "train", *argv]
            with open(self.work / "ro.out", "w") as f:
                proc = subprocess.Popen(cmd, env=H.child_env(), stdout=f, stderr=subprocess.STDOUT)
            self.procs.append(proc)
        else:                 # no mount namespaces here: the same run; the test checks nothing was written
            proc = self.start(argv, "ro.out")
        ro["rc"] = proc.wait(900)
        ro["after"] = {p.relative_to(src): (p.stat().st_size, p.stat().st_mtime_ns) for p in src.rglob("*")}
        return res

    # ------------------------------------------------------------ --time-limit 60s, two sessions
    def _time_limit(self) -> dict:
        # As many steps as the longest training window the session could leave holds at the bare step
        # speed measured here (start-up >= 6 s; the stop's reserve >= 11 s: margin 5 s, evaluation and
        # export priors 3 s each): a loop step is never faster than a bare one, so the session must
        # stop, and usually less than half is left for the next one. No periodic evaluations (their
        # plots would make steps uneven); the stop's evaluation is the first.
        window = 60.0 - TL_DELAY - 4.0 - 11.0
        steps = max(40, math.ceil(window / self.step_s))
        try:
            for attempt in range(2):    # a machine much faster than measured: again, with twice the steps
                res = {"steps": steps, "calibration": f"bare step {self.step_s:.3f}s, training window <= "
                                                      f"{window:.0f}s, attempt {attempt + 1}"}
                run = self.work / f"tl{attempt or ''}"
                t0 = time.time()
                proc = self.start(self.args(run.name, steps, ["--time-limit", "60s"], save_every=100,
                                            eval_every=0), f"{run.name}.out", delay_s=TL_DELAY, nice=0)
                res["rc1"] = proc.wait(900)
                res["took"] = time.time() - t0               # from just before the process started
                if res["rc1"] != 0:
                    break
                steps *= 2
            self._time_limit_sessions(run, res)
        finally:
            self._time_limit_over()
        return res

    def _time_limit_sessions(self, run: Path, res: dict) -> None:
        res["run"] = run
        res["out1"] = (self.work / f"{run.name}.out").read_text()
        m = re.search(r"stopped resumably at step (\d+)", res["out1"])
        res["stop"] = int(m.group(1)) if m else None
        if res["stop"] is not None:
            ck = run / "checkpoints" / f"step-{res['stop']}"
            res["verify"] = _verify(ck)
            res["history1"] = H.history(run)
            import torch

            from memfit.ckpt.io import load_model_state
            weights = load_model_state(ck, res["verify"][0]) if not res["verify"][1] else {}
            exported = H.weights(run / "final_model" / "model.safetensors")
            res["export_is_step"] = bool(weights) and all(torch.equal(exported[k], weights[k]) for k in exported)
            res["log1"] = (run / "memfit.log").read_text()
        m = re.search(r"resume with: (.*)", res["out1"])
        if m:                   # the printed command, run as a new session (a new process, a new 60 s)
            cmd = res["cmd"] = shlex.split(m.group(1))
            res["rc2"] = []
            for _ in range(3):
                res["rc2"].append(self.start(cmd[2:], f"{run.name}-2.out", nice=0).wait(900))
                if res["rc2"][-1] != 75:
                    break
        res["history"] = H.history(run)


@pytest.fixture(scope="module")
def e2e(tmp_path_factory):
    e = E2E(tmp_path_factory.mktemp("e2e"))
    yield e
    e.close()


def _nice_this_thread(value: int) -> None:
    """Set this thread's nice value (Linux: per thread). Going back down needs privileges; without
    them the thread simply stays lower."""
    try:
        tid = threading.get_native_id()
        if os.getpriority(os.PRIO_PROCESS, tid) != value:
            os.setpriority(os.PRIO_PROCESS, tid, value)
    except (OSError, AttributeError):
        pass


def _inprocess(argv: list[str]) -> int:
    """`memfit train ARGV` in this process, on one thread like the subprocesses."""
    import torch

    from memfit import cli
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return cli.main(["train", *argv])
    finally:
        torch.set_num_threads(threads)


def _seed(note: str = "") -> str:
    return f"MEMFIT_E2E_SEED={SEED} {note}"


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
