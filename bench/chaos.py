"""Chaos: kill a real `memfit train` with SIGKILL again and again, resume it, compare with a clean run.

    python bench/chaos.py --kills 20            # ~5-10 minutes on 2 shared cores
    python bench/chaos.py --kills 5 --steps 40  # a quick look

A reference run trains N steps without interruption. The chaos run is the same command, started with
`--resume auto` over and over: each start is SIGKILLed at a random point — during start-up, at a
random moment of a random training step (forward, backward, optimizer step, evaluation, best/,
export...) or, through the test-only hook MEMFIT_TEST_KILL_DURING_SAVE=N:phase, in the middle of
writing a checkpoint (the hook writes a marker file before it kills; its presence is checked); the last
tenth of the kills land after the last step's checkpoint, in the final evaluation / export (a kill is
counted as mid-export when final_model.tmp-* is present at that moment). After
every kill each installed checkpoint must still verify (sizes + sha256). When enough kills are done
the run is resumed to the end, and its final weights (final_model/model.safetensors, torch.equal per
tensor), best/ weights and history (every row but the wall-clock keys) must equal the reference's.

Last line: kills=<n> resumed=<n> identical=<true|false>
  kills: processes that died by SIGKILL (ours, or the hook's during a save)
  resumed: starts after a kill that loaded a checkpoint (or found none yet and started fresh) and
           then trained on or finished, without an error

Runs use one thread per process by default (OMP_NUM_THREADS=1; --threads 0 for torch's default):
bit-exactness needs the same thread count and precision before and after a resume (default precision
here: bf16 autocast on a CPU with native bf16, else fp32; --precision fp32 checks the other).
Its run-directory helpers (bench/rundirs.py, re-exported here) are the harness of the kill/resume tests
(`import chaos as H`), bench/checkpoint_cost.py and bench/disk_chaos.py.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import rundirs

# The harness lives in rundirs.py; its names are chaos.<name> too (tests import this file as H).
from rundirs import (  # noqa: F401
    KILL_ENV,
    MARKER_ENV,
    ROOT,
    TIMING_KEYS,
    bad_checkpoints,
    checkpoint_steps,
    child_env,
    compare_runs,
    du,
    history,
    last_step,
    log_since,
    log_size,
    make_corpus,
    memfit_cmd,
    run,
    same_weights,
    start,
    step_seconds,
    train_args,
    wait_step,
    wait_training,
    weights,
)

# ---------------------------------------------------------------- the chaos loop

@dataclass
class Chaos:
    run_dir: Path
    args: list[str]
    steps: int
    save_every: int
    rng: random.Random
    log: callable = print
    kills: int = 0
    save_kills: int = 0
    export_kills: int = 0
    resumed: int = 0
    launches: int = 0
    errors: list[str] = field(default_factory=list)
    events: list[str] = field(default_factory=list)


    def launch(self, mode: str, timeout: float = 300) -> int:
        """One `--resume auto` start, ended the way `mode` says: 'save' (the hook kills it while it
        writes a checkpoint), 'startup' (SIGKILL before training), 'step' (SIGKILL at a random moment
        of a random step), 'finish' (no kill). Returns the exit code."""
        self.launches += 1
        out = self.run_dir.parent / f"{self.run_dir.name}.out"
        env, marker = child_env(), None
        if mode == "save":
            marker = self.run_dir.parent / f"{self.run_dir.name}.marker-{self.launches}"
            n, phase = self.rng.choice((1, 2)), self.rng.choice(("model", "state", "state", "manifest"))
            env.update({KILL_ENV: f"{n}:{phase}", MARKER_ENV: str(marker)})
        before = max(checkpoint_steps(self.run_dir), default=0)
        log_at = log_size(self.run_dir)
        proc = start([*self.args, "--resume", "auto"], out, env)
        t0 = time.monotonic()
        what = mode
        try:
            if mode == "startup":
                time.sleep(self.rng.uniform(0.2, 6.0))
                if proc.poll() is None:
                    proc.send_signal(signal.SIGKILL)
            elif mode == "export":
                # the final phase: after the last step's checkpoint, during the evaluation / export
                t_wait = time.monotonic()
                while proc.poll() is None and time.monotonic() - t_wait < timeout and not (
                        f"saved step-{self.steps} " in log_since(self.run_dir, log_at)
                        or f"resumed at step {self.steps} " in log_since(self.run_dir, log_at)):
                    time.sleep(0.005)
                if self.rng.random() < 0.6:      # inside the export: once its temporary folder exists
                    while proc.poll() is None and not any(self.run_dir.glob("final_model.tmp-*")) and \
                            time.monotonic() - t_wait < timeout:
                        time.sleep(0.001)
                    time.sleep(self.rng.uniform(0.0, 0.02))
                else:                            # somewhere in the final evaluation, best/, plots, export
                    time.sleep(self.rng.uniform(0.0, 0.8))
                mid = [p.name for p in self.run_dir.glob("final_model.tmp-*")]
                what = "during the export (final_model.tmp-* present)" if mid else "after the last save"
                if proc.poll() is None:
                    proc.send_signal(signal.SIGKILL)
                    self.export_kills += bool(mid)
            elif mode == "step":
                target = min(self.steps, before + self.rng.randint(1, 2 * self.save_every))
                wait_training(self.run_dir, log_at, proc, timeout)     # (history.jsonl is cut back first)
                wait_step(self.run_dir, target, proc, timeout)
                time.sleep(self.rng.uniform(0.0, 0.3))   # somewhere inside the next step (or eval/save)
                what = f"step after {target}"
                if proc.poll() is None:
                    proc.send_signal(signal.SIGKILL)
            rc = proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            rc = proc.wait()
            self.errors.append(f"launch {self.launches} ({mode}) timed out")
        text = log_since(self.run_dir, log_at)
        if rc == -signal.SIGKILL:
            self.kills += 1
            if mode == "save":
                if marker is None or not marker.exists():
                    self.errors.append(f"launch {self.launches}: killed, but no kill-hook marker")
                else:
                    info = json.loads(marker.read_text())
                    self.save_kills += 1
                    what = f"during save of step-{info['step']} ({info['phase']})"
        elif rc not in (0, 75):
            self.errors.append(f"launch {self.launches} ({mode}) exited {rc}; see {out}")
        if self.launches > 1 and rc in (0, 75, -signal.SIGKILL) and (
                "checkpoint: resumed from" in text or "nothing to resume" in text):
            # (a start killed before it got to the resume does not count as resumed)
            self.resumed += 1
        bad = bad_checkpoints(self.run_dir)
        if bad:
            self.errors.append(f"after launch {self.launches}: corrupt installed checkpoint(s): {bad}")
        self.events.append(f"launch {self.launches}: {mode:7s} rc={rc:4d} ckpts {before}->"
                           f"{max(checkpoint_steps(self.run_dir), default=0)} at step<= {last_step(self.run_dir)}"
                           f" {what if rc == -signal.SIGKILL else ''} ({time.monotonic() - t0:.1f}s)")
        self.log(self.events[-1])
        return rc

    def run(self, kills: int, p_save: float = 0.3, p_startup: float = 0.1, final_kills: int = 0) -> int:
        """Kill until `kills` kills happened (or the run finished on its own), then resume to the end.
        The last `final_kills` of them land after the last step's checkpoint (evaluation, export)."""
        while self.kills < kills - final_kills:
            r = self.rng.random()
            mode = "save" if r < p_save else "startup" if r < p_save + p_startup else "step"
            rc = self.launch(mode)
            if rc == 0:
                self.log("the run finished before all kills were done (raise --steps)")
                return rc
        while self.kills < kills:
            rc = self.launch("export")
            if rc == 0:
                self.log("the run finished before all kills were done (the export was too quick)")
                return rc
        for _ in range(3):   # normally one; a 75 (never expected here) would be resumed again
            rc = self.launch("finish")
            if rc == 0:
                return rc
        return rc


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--kills", type=int, default=20)
    ap.add_argument("--steps", type=int, default=0, help="optimizer steps (default: 4 per kill + 20)")
    ap.add_argument("--save-every", type=int, default=4)
    ap.add_argument("--seed", type=int, default=None, help="seed of the kill schedule (default: random)")
    ap.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16"))
    ap.add_argument("--threads", type=int, default=1, help="torch threads per process (0: torch's default)")
    ap.add_argument("--dir", default=None, help="work directory (default: a temporary one, removed)")
    a = ap.parse_args(argv)
    rundirs.THREADS = str(a.threads) if a.threads > 0 else ""   # read by child_env
    seed = a.seed if a.seed is not None else random.SystemRandom().randrange(1 << 30)
    steps = a.steps or 4 * a.kills + 20
    work = Path(a.dir) if a.dir else Path(tempfile.mkdtemp(prefix="memfit-chaos-"))
    work.mkdir(parents=True, exist_ok=True)
    corpus = make_corpus(work / "corpus")
    extra = ["--precision", a.precision]
    ref_dir, chaos_dir = work / "reference", work / "chaos"
    for d in (ref_dir, chaos_dir):
        shutil.rmtree(d, ignore_errors=True)
    print(f"chaos: seed {seed}, {steps} steps, save every {a.save_every}, {a.kills} kills, precision "
          f"{a.precision}, threads {rundirs.THREADS or 'default'}, in {work}", flush=True)
    t0 = time.monotonic()
    ref = start(train_args(ref_dir, corpus, steps, a.save_every, extra=extra), work / "reference.out")
    chaos = Chaos(chaos_dir, train_args(chaos_dir, corpus, steps, a.save_every, extra=extra), steps,
                  a.save_every, random.Random(seed), log=lambda s: print(s, flush=True))
    rc = chaos.run(a.kills, final_kills=max(1, a.kills // 10))
    ref_rc = ref.wait()
    problems = list(chaos.errors)
    if ref_rc != 0:
        problems.append(f"the reference run exited {ref_rc} (see {work / 'reference.out'})")
    if rc != 0:
        problems.append(f"the chaos run did not finish (exit {rc})")
    if not problems:
        problems += compare_runs(ref_dir, chaos_dir)
    identical = not problems
    for p in problems:
        print(f"PROBLEM: {p}")
    print(f"{chaos.kills} kills ({chaos.save_kills} during a checkpoint write, hook marker checked; "
          f"{chaos.export_kills} during the export, its temporary folder present), "
          f"{chaos.launches} starts, {time.monotonic() - t0:.0f}s; final weights, best/ and history "
          f"{'bit-identical to' if identical else 'DIFFERENT from'} the uninterrupted run")
    if identical and not a.dir:
        shutil.rmtree(work, ignore_errors=True)
    print(f"kills={chaos.kills} resumed={chaos.resumed} identical={str(identical).lower()}")
    return 0 if identical else 1


if __name__ == "__main__":
    sys.exit(main())
