"""The run-directory harness of the chaos bench and the kill/resume tests: a tiny real `memfit train` job
(corpus, flags, environment), starting it and waiting for its steps, and reading what it left (history,
checkpoints, weights, sizes). Imported as `H` by tests (through bench/chaos.py, which re-exports it) and by
bench/checkpoint_cost.py and bench/disk_chaos.py; runs without src on the path.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
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
