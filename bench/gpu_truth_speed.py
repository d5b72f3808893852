"""bench/gpu_truth.py's speed and context figures: tokens/s of memfit's loop against the HF Trainer and a
raw PyTorch loop on the same model and batches (with MFU against the hardware profile's peak), and the
CUDA context size measured in a fresh process."""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from gpu_truth_runs import RunSpec, Stream, build_model, make_config, run_memfit


def _sync(device) -> None:
    from memfit.device import synchronize
    synchronize(device)


def _rate(times: list[float], warm: int, tokens_per_step: int) -> float:
    """Tokens/s over the steps after the first `warm` (compilation, handles and allocator warm-up)."""
    timed = len(times) - warm
    return timed * tokens_per_step / max(times[-1] - times[warm - 1], 1e-9)


def memfit_rate(spec: RunSpec, ctx, warm: int) -> float:
    times: list[float] = []

    def on_step(step: int, row: dict) -> None:
        _sync(ctx.device)
        times.append(time.perf_counter())

    # log_every: memfit's default (10), not the sweep's 1 (a memory reading and a history row per step)
    run_memfit(spec, make_config(spec, ctx.gpu, ctx.budget, ctx.workdir, log_every=10), ctx.device,
               on_step=on_step, measure=False)
    return _rate(times, warm, spec.eff * spec.seq)


def raw_rate(spec: RunSpec, ctx, warm: int) -> float:
    """The loop a PyTorch user writes: autocast, GradScaler for fp16, fused AdamW, clipping."""
    import torch
    dev = ctx.device.torch_device
    cfg = make_config(spec, ctx.gpu, ctx.budget, ctx.workdir)
    model = build_model(spec, cfg, ctx.device).to(dev)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(spec.precision)
    scaler = torch.amp.GradScaler(dev.type, enabled=spec.precision == "fp16")
    stream, times = iter(Stream(spec)), []
    for _ in range(spec.steps):
        b = {k: v.to(dev) for k, v in next(stream).items()}
        with torch.autocast(dev.type, dtype=dtype, enabled=dtype is not None):
            loss = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], labels=b["labels"]).loss
        scaler.scale(loss).backward()
        scaler.unscale_(opt)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        scaler.step(opt)
        scaler.update()
        opt.zero_grad(set_to_none=True)
        _sync(ctx.device)
        times.append(time.perf_counter())
    del model, opt
    return _rate(times, warm, spec.eff * spec.seq)


def hf_rate(spec: RunSpec, ctx, warm: int) -> float:
    """transformers.Trainer on the same model and batches (no logging, saving or evaluation)."""
    from transformers import Trainer, TrainerCallback, TrainingArguments
    cfg = make_config(spec, ctx.gpu, ctx.budget, ctx.workdir)
    model = build_model(spec, cfg, ctx.device)
    stream = Stream(spec)
    rows = []
    for i in range(spec.steps):
        b = stream.batch(i)
        rows += [{k: v[j] for k, v in b.items()} for j in range(spec.eff)]
    times: list[float] = []

    class Clock(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            _sync(ctx.device)
            times.append(time.perf_counter())

    with tempfile.TemporaryDirectory() as tmp:
        args = TrainingArguments(
            output_dir=tmp, per_device_train_batch_size=spec.micro, gradient_accumulation_steps=spec.eff // spec.micro,
            max_steps=spec.steps, learning_rate=1e-4, warmup_steps=1, max_grad_norm=1.0, weight_decay=0.1,
            bf16=spec.precision == "bf16", fp16=spec.precision == "fp16", logging_steps=10 ** 6,
            save_strategy="no", report_to=[], dataloader_num_workers=0, disable_tqdm=True, seed=0,
            optim="adamw_torch_fused", use_cpu=not ctx.cuda, remove_unused_columns=False)
        Trainer(model=model, args=args, train_dataset=rows, callbacks=[Clock()]).train()
    del model
    return _rate(times, warm, spec.eff * spec.seq)


def throughput(ctx, spec: RunSpec, warm: int = 2) -> dict[str, Any]:
    """tokens/s and MFU of memfit, the HF Trainer and a raw loop: same model, batch, precision."""
    from gpu_truth_runs import plan_figures
    plan = plan_figures(make_config(spec, ctx.gpu, ctx.budget, ctx.workdir), "analytic", ctx.profile)
    flops_per_token = plan["flops_per_step"] / plan["tokens_per_step"]
    peak = ctx.peak_tflops(spec.precision) * 1e12
    out: dict[str, Any] = {"status": "ok", "precision": spec.precision, "model": plan["model"],
                           "tokens_per_step": spec.eff * spec.seq, "timed_steps": spec.steps - warm,
                           "flops_per_token": flops_per_token, "peak_tflops": peak / 1e12,
                           "width": plan["width"], "planned_step_seconds": plan["step_seconds"]}
    for name, fn in (("memfit", memfit_rate), ("raw_loop", raw_rate), ("hf_trainer", hf_rate)):
        try:
            rate = fn(spec, ctx, warm)
            out[name] = {"tokens_per_s": rate, "mfu": rate * flops_per_token / peak}
        except Exception as e:  # noqa: BLE001 - one framework failing must not lose the others
            out[name] = {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"}
    m, h = out["memfit"].get("tokens_per_s"), out["hf_trainer"].get("tokens_per_s")
    out["memfit_vs_hf"] = m / h if m and h else None
    out["memfit_vs_raw"] = m / out["raw_loop"]["tokens_per_s"] if m and out["raw_loop"].get("tokens_per_s") else None
    return out


# ---------------------------------------------------------------- the CUDA context, in a fresh process

def context_probe() -> dict[str, Any]:
    """Run in a fresh process (gpu_truth.py --context-probe): NVML used before CUDA starts, after
    torch.cuda.init(), after the kernels a training step touches (GEMMs in three precisions, SDPA
    forward/backward, cross-entropy, fused AdamW) and after two steps of a tiny memfit run."""
    from memfit.device import nvml_used_bytes
    before = nvml_used_bytes(0)       # NVML index 0: asking torch for the current device would start CUDA
    import torch
    torch.cuda.init()
    torch.cuda.synchronize()
    after_init = nvml_used_bytes(0)
    dev = torch.device("cuda")
    x = torch.randn(512, 512, device=dev, requires_grad=True)
    dtypes = [torch.float32, torch.float16] + ([torch.bfloat16] if torch.cuda.is_bf16_supported() else [])
    for dt in dtypes:
        with torch.autocast("cuda", dtype=dt, enabled=dt != torch.float32):
            q = (x @ x).view(1, 8, 512, 64)
            y = torch.nn.functional.scaled_dot_product_attention(q, q, q, is_causal=True)
            loss = torch.nn.functional.cross_entropy(y.reshape(-1, 64).float(), torch.zeros(4096, dtype=torch.long,
                                                                                              device=dev))
        loss.backward()
    opt = torch.optim.AdamW([x], fused=True)
    opt.step()
    torch.cuda.synchronize()
    after_kernels, reserved_kernels = nvml_used_bytes(0), torch.cuda.memory_reserved()
    del x, q, y, loss, opt
    from gpu_truth_runs import RunSpec as Spec

    from memfit.device import detect
    spec = Spec("probe", "pretrain", "gpt2", 200_000, 512, 64, 4, 4, "bf16" if dtypes[-1] == torch.bfloat16
                else "fp16", steps=2)
    with tempfile.TemporaryDirectory() as tmp:
        run_memfit(spec, make_config(spec, None, None, Path(tmp)), detect())
    torch.cuda.synchronize()
    after_train, reserved_train = nvml_used_bytes(0), torch.cuda.memory_reserved()
    if before is None:
        return {"status": "skipped", "reason": "NVML is not readable here (no pynvml / no driver access)"}
    return {"status": "ok", "nvml_before": before, "context_after_init": after_init - before,
            "context_after_kernels": after_kernels - before - reserved_kernels,
            "context_after_training": after_train - before - reserved_train,
            "reserved_after_training": reserved_train}


def measure_context(script: Path, timeout: float = 120) -> dict[str, Any]:
    t0 = time.perf_counter()
    p = subprocess.run([sys.executable, str(script), "--context-probe"], capture_output=True, text=True,
                       timeout=timeout)
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith("{")]
    if p.returncode != 0 or not lines:
        return {"status": "error", "error": (p.stderr or p.stdout).strip().splitlines()[-1:] or ["no output"]}
    out = json.loads(lines[-1])
    out["seconds"] = time.perf_counter() - t0
    return out
