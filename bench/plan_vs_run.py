"""Is the plan right on real runs? Real `memfit train | finetune | classify` CPU runs, each 30 steps, planned
vs measured (issue 12).

Each run is the user's command (a subprocess, --gpu cpu, --log-every 1). Per run:
  - memory: plan.json's peak live tensor bytes vs the run's calibration measurement (memfit.train.calibrate:
    memfit.memtrack.LiveTensorTracker over steps 1-2, the tracker bench/plan_accuracy.py measures with);
  - time: the plan's step time before calibration, and the calibrated one (the mean of steps 3-10, what
    the bar's ETA, the sessions line and the deadline use from step 10 on), each scored against the mean
    measured step time of steps 11-30 (history.jsonl's per-step elapsed, logged every step).
Last line:
    mem_median_err_pct=<x> time_median_err_pct=<y>      (|error| medians; time = after calibration)

    python bench/plan_vs_run.py            # 9 runs (~5 minutes on 2 shared cores; measured 4.5 min)
    python bench/plan_vs_run.py --only llama
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT / "src"))
from chaos import child_env, make_corpus, memfit_cmd   # noqa: E402  (the harness's corpus and child env)
from plan_accuracy import MiB                           # noqa: E402

STEPS, CALIBRATED_AT = 30, 10
COMMON = ["--max-steps", str(STEPS), "--log-every", "1", "--eval-every", str(STEPS), "--eval-batches", "1",
          "--save-every", "1000", "--gpu", "cpu", "--quiet"]
PRETRAIN = ["--target-params", "1M", "--vocab-size", "1024", "--seq-len", "128", "--batch-size", "8",
            "--sample-tokens", "0"]
FINETUNE = ["--max-seq-len", "64", "--batch-size", "8", "--sample-tokens", "0"]

# name -> (job, flags); {corpus}, {jsonl}, {lm} are filled in per run
RUNS: dict[str, tuple[str, list[str]]] = {
    "gpt2 fp32": ("train", [*PRETRAIN, "--precision", "fp32"]),
    "gpt2 bf16": ("train", [*PRETRAIN, "--precision", "bf16"]),
    "gpt2 fp32 ckpt": ("train", [*PRETRAIN, "--precision", "fp32", "--gradient-checkpointing"]),
    "gpt2 fp32 8-bit adamw": ("train", [*PRETRAIN, "--precision", "fp32", "--optimizer", "adamw8bit"]),
    "llama fp32": ("train", [*PRETRAIN, "--arch", "llama", "--precision", "fp32"]),
    "llama bf16 ckpt": ("train", [*PRETRAIN, "--arch", "llama", "--precision", "bf16", "--gradient-checkpointing"]),
    "gpt2 lora fp32": ("finetune", [*FINETUNE, "--model", "{lm}", "--data", "{jsonl}", "--lora", "--precision", "fp32"]),
    "gpt2 full finetune bf16": ("finetune", [*FINETUNE, "--model", "{lm}", "--data", "{jsonl}", "--precision", "bf16"]),
    "bert classify fp32 (MiniLM)": ("classify", ["--model", "minilm", "--data", "bbc", "--max-seq-len", "64",
                                                 "--batch-size", "8", "--max-val-examples", "16",
                                                 "--precision", "fp32"]),
}


def small_lm(where: Path) -> Path:
    """A 4-layer, 128-wide GPT-2 with the offline GPT-2 tokenizer, saved as a stock HF folder (seeded)."""
    if (where / "config.json").exists():
        return where
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    from memfit.data.tokenizer import gpt2_tokenizer
    tok = gpt2_tokenizer()
    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_positions=128, n_embd=128, n_layer=4, n_head=4)
                    ).save_pretrained(where)
    tok.save_pretrained(where)
    return where


def instructions(corpus: Path, where: Path) -> Path:
    """Instruction/response records cut from the corpus's lines (finetune's default template fields)."""
    lines = [x.strip() for x in (corpus / "train.txt").read_text().splitlines() if x.strip()]
    rows = [{"instruction": lines[i], "output": lines[i + 1]} for i in range(0, len(lines) - 1, 2)]
    where.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return where


def run_one(name: str, job: str, flags: list[str], out: Path) -> dict:
    cmd = [*memfit_cmd(), job, *flags, *COMMON, "--output-dir", str(out)]
    t0 = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True, env=child_env({"OMP_NUM_THREADS": "2",
                                                                            "MKL_NUM_THREADS": "2"}))
    wall = time.perf_counter() - t0
    if r.returncode != 0:
        raise RuntimeError(f"{name}: exit {r.returncode}\n{' '.join(cmd)}\n{r.stderr[-3000:]}")
    plan = json.loads((out / "plan.json").read_text())
    rows = [json.loads(x) for x in (out / "history.jsonl").read_text().splitlines()]
    train = {r["step"]: r["elapsed"] for r in rows if r["kind"] == "train"}
    ev = [r for r in rows if r["kind"] == "eval" and r.get("measured_step_s")][-1]
    scored = [train[s] - train[s - 1] for s in range(CALIBRATED_AT + 1, STEPS + 1)]
    measured_s = statistics.mean(scored)
    return {"run": name, "plan_peak": plan["peak_tensor_bytes"], "measured_peak": ev["measured_peak_bytes"],
            "plan_step_s": plan["step_seconds"], "calibrated_step_s": ev["measured_step_s"],
            "measured_step_s": measured_s, "wall_s": wall}


def err(planned: float, measured: float) -> float:
    return 100 * (planned - measured) / measured


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--only", help="run the configurations whose name contains this")
    ap.add_argument("--json", help="also write the rows here")
    args = ap.parse_args()
    runs = {k: v for k, v in RUNS.items() if not args.only or args.only in k}
    tmp = Path(tempfile.mkdtemp(prefix="plan-vs-run-"))
    corpus = make_corpus(tmp / "corpus")
    fill = {"{corpus}": str(corpus / "train.txt"), "{val}": str(corpus / "val.txt"), "{jsonl}": str(instructions(corpus, tmp / "sft.jsonl")),
            "{lm}": str(small_lm(tmp / "lm"))}
    print(f"{'run':30s} {'peak plan':>10s} {'measured':>10s} {'err%':>6s} | {'step plan':>9s} {'err%':>7s} "
          f"{'calibrated':>10s} {'err%':>6s} {'s 11-30':>8s}", flush=True)
    rows = []
    for name, (job, flags) in runs.items():
        flags = [fill.get(f, f) for f in flags]
        if job == "train":
            flags = ["--data", fill["{corpus}"], "--val-data", fill["{val}"], "--text-split", "paragraph", *flags]
        r = run_one(name, job, flags, tmp / name.replace(" ", "_").replace("(", "").replace(")", ""))
        r.update(mem_err=err(r["plan_peak"], r["measured_peak"]), time_err_before=err(r["plan_step_s"], r["measured_step_s"]),
                 time_err=err(r["calibrated_step_s"], r["measured_step_s"]))
        rows.append(r)
        print(f"{name:30s} {r['plan_peak'] / MiB:9.2f}M {r['measured_peak'] / MiB:9.2f}M {r['mem_err']:+6.1f} | "
              f"{r['plan_step_s']:8.4f}s {r['time_err_before']:+7.1f} {r['calibrated_step_s']:9.4f}s "
              f"{r['time_err']:+6.1f} {r['measured_step_s']:7.4f}s", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    before = statistics.median(abs(r["time_err_before"]) for r in rows)
    print(f"before calibration: time_median_err_pct={before:.1f}")
    mem = statistics.median(abs(r["mem_err"]) for r in rows)
    t = statistics.median(abs(r["time_err"]) for r in rows)
    print(f"mem_median_err_pct={mem:.2f} time_median_err_pct={t:.2f}")
    return 0 if mem <= 3.0 and t <= 15.0 else 1


if __name__ == "__main__":
    sys.exit(main())
