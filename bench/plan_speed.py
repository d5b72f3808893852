"""How fast is `memfit plan`, and does planning a 7B model allocate its weights? (fresh processes)

  1. memfit plan --gpu t4 --target-params 10M --seq-len 512 --batch-size 8 --json      (< 10 s)
  2. memfit plan --gpu t4 --model <Llama-2-7B config.json> --task qlora --seq-len 512
     --batch-size 1 --gradient-checkpointing --json                                      (< 10 s,
     peak RSS far below the 3.9 GB a 4-bit 7B would need: nothing is allocated)
  3. the same 10M job with --fit (auto-fit: a few traces)

Each command runs in a new Python process, so the times include importing torch and transformers
(~5 s of CPU on this machine kind). Prints wall and CPU seconds (CPU is what an idle machine's wall
time would be: planning is single-threaded), the load average, and the child's peak RSS.

    python bench/plan_speed.py
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LLAMA2_7B = {"architectures": ["LlamaForCausalLM"], "bos_token_id": 1, "eos_token_id": 2, "hidden_act": "silu",
             "hidden_size": 4096, "initializer_range": 0.02, "intermediate_size": 11008,
             "max_position_embeddings": 4096, "model_type": "llama", "num_attention_heads": 32,
             "num_hidden_layers": 32, "num_key_value_heads": 32, "rms_norm_eps": 1e-05,
             "tie_word_embeddings": False, "torch_dtype": "float16", "vocab_size": 32000}


def run(args: list[str]) -> tuple[float, float, int, dict | None, int]:
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONWARNINGS="ignore")
    env["PYTHONPATH"] = str(ROOT / "src") + os.pathsep + env.get("PYTHONPATH", "")
    cmd = [sys.executable, "-c", "import sys; from memfit.cli import main; sys.exit(main())", "plan", *args]
    r0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    dt = time.perf_counter() - t0
    r1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (r1.ru_utime + r1.ru_stime) - (r0.ru_utime + r0.ru_stime)
    before, rss_kb = r0.ru_maxrss, r1.ru_maxrss
    out = None
    try:
        out = json.loads(p.stdout)
    except json.JSONDecodeError:
        sys.stderr.write(p.stdout[-2000:] + p.stderr[-3000:])
    return dt, cpu, max(rss_kb, before) * 1024, out, p.returncode


def main() -> int:
    gib = 2 ** 30
    ok = True
    with tempfile.TemporaryDirectory() as tmp:
        cfg = Path(tmp) / "llama-2-7b" / "config.json"
        cfg.parent.mkdir()
        cfg.write_text(json.dumps(LLAMA2_7B))
        jobs = [
            ("10M GPT-2, T4, seq 512, batch 8",
             ["--gpu", "t4", "--target-params", "10M", "--seq-len", "512", "--batch-size", "8", "--json"], 10.0),
            ("Llama-2-7B config.json, QLoRA, T4, seq 512, batch 1, ckpt",
             ["--gpu", "t4", "--model", str(cfg), "--task", "qlora", "--seq-len", "512", "--batch-size", "1",
              "--gradient-checkpointing", "--json"], 10.0),
            ("10M GPT-2, T4, --fit (effective batch 64)",
             ["--gpu", "t4", "--target-params", "10M", "--seq-len", "512", "--effective-batch", "64", "--fit",
              "--json"], None),
        ]
        print(f"load average before: {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
        print(f"{'plan':58s} {'wall s':>7s} {'cpu s':>6s} {'peak RSS':>9s} {'rc':>3s}  result")
        for name, args, limit in jobs:
            dt, cpu, rss, out, rc = run(args)
            res = "-" if out is None else (
                f"fits={out['fits']} nvidia-smi {out['nvidia_smi_bytes'] / gib:.2f} GiB, peak allocated "
                f"{out['peak_allocated_bytes'] / gib:.2f} GiB, {out['step_seconds']:.3f} s/step, micro-batch "
                f"{out['micro_batch']} x {out['gradient_accumulation_steps']}")
            flag = "" if limit is None else ("  OK" if dt < limit else f"  SLOW (> {limit:.0f} s)")
            ok &= limit is None or dt < limit
            print(f"{name:58s} {dt:7.2f} {cpu:6.2f} {rss / gib:8.2f}G {rc:3d}  {res}{flag}", flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
