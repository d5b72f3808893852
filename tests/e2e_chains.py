"""The background work of tests/test_resume_e2e.py (issue 4): the tiny job's constants, the subprocess chains
(the reference; SIGKILL by the hook and at a random point, resumed; SIGTERM then a read-only resume; the
--time-limit sessions) started from threads when the module's fixture builds E2E, and the in-process helpers.
Moved out of the test file (review: files <= 400 lines); the test module docstring says why it is built so.
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

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

import chaos as H

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
