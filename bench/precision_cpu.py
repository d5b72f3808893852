"""fp16 / bf16 autocast against fp32 on this CPU: seconds per optimizer step of a small GPT-2.

    python bench/precision_cpu.py          # last line: fp16/fp32=<x> bf16/fp32=<y>

Why it exists: `--precision fp16` on a CPU runs emulated (no fp16 matmul units) and memfit warns about
it, as it does for bf16 on a CPU without native bf16; this prints the measured cost behind the warning.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))


def step_seconds(precision_name: str, steps: int = 6) -> float:
    import torch

    from memfit.device import detect
    from memfit.models import build_causal_lm, size_model
    from memfit.models.optim import build_optimizer
    from memfit.precision import resolve_precision
    from memfit.train.step import accumulate
    torch.manual_seed(0)
    model = build_causal_lm(size_model(2_000_000, "gpt2", 2048, 128))
    opt = build_optimizer(model, "adamw", 1e-3, 0.1, (0.9, 0.95), "cpu")
    precision, _ = resolve_precision(precision_name, detect("cpu"))
    scaler = precision.make_scaler()
    ids = torch.randint(0, 2048, (8, 128))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    times = []
    for _ in range(steps + 1):
        t0 = time.perf_counter()
        accumulate(model, batch, 8, precision, scaler)
        scaler.unscale_(opt)
        scaler.step(opt)
        scaler.update()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
    times = sorted(times[1:])                 # the first step warms up kernels
    return times[len(times) // 2]


def main() -> int:
    t = {p: step_seconds(p) for p in ("fp32", "fp16", "bf16")}
    for p, s in t.items():
        print(f"{p}: {s * 1000:.0f} ms/step")
    print(f"fp16/fp32={t['fp16'] / t['fp32']:.2f} bf16/fp32={t['bf16'] / t['fp32']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
