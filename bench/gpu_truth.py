"""GPU truth in one command: what CPU tests cannot see, measured beside memfit's own prediction.

    python bench/gpu_truth.py [--budget-gib 15] [--out DIR] [--device {auto,cuda,cpu}] [--tiny]
                              [--write-constants]

On CUDA it caps the caching allocator with torch.cuda.set_per_process_memory_fraction so the card acts
like a smaller one (default: a T4's 15 GiB; the cap is the budget minus the planned CUDA context, as on
a real card) and measures, each beside the planner's figure for the same configuration (`memfit plan
--json` in-process; trace engine, computed in worker processes while the GPU trains):
  * peak allocated / reserved (torch.cuda) and NVML used, for a sweep of real memfit training runs
    (jobs.assemble_job + train.loop.train) of 5 steps: GPT-2 10M/124M, Llama-style, SmolLM2-135M-shaped
    LoRA/QLoRA, MiniLM-shaped classification; fp16/bf16; checkpointing on/off; AdamW/8-bit;
  * the CUDA context (a fresh process: NVML before/after torch.cuda.init(), first kernels, a tiny run);
  * a real CUDA OOM: a run above the budget recovers, keeps the effective batch, and its losses match a
    fresh run started at the recovered micro-batch; auto-fit's first choice runs without an OOM;
  * fp16 + GradScaler skips an inf step; QLoRA trains and merges;
  * tokens/s and MFU of memfit vs the HF Trainer vs a raw loop on the same model.
`--device cpu` runs the same with the live-tensor tracker as truth and OOM injected by its byte limit;
`--tiny` shrinks every model (CI runs `--device cpu --tiny`). Rows that cannot run are skipped with the
reason; each row runs under its own try; no row starts after --time-budget-s.

Writes DIR/gpu_truth.json (every figure, device, driver, versions, CPU, date) and DIR/gpu_truth.txt
(the table). Last line:  mem_median_err_pct=<x> mem_max_err_pct=<y> oom_recovered=<bool> memfit_vs_hf=<z>
Keep GPU measurements as bench/results/gpu_truth-<device>-<date>.json. --write-constants updates
src/memfit/gpu_arch.json for the measured architecture only (context, efficiency) with the source.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent / "src"), str(HERE)]     # no install needed on a bare GPU image
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
GiB = 2 ** 30

from gpu_truth_runs import RunSpec

SWEEP = [
    RunSpec("gpt2-10m bf16", "pretrain", "gpt2", 10_000_000, 8192, 256, 16, 16, "bf16"),
    RunSpec("gpt2-10m fp16", "pretrain", "gpt2", 10_000_000, 8192, 256, 16, 16, "fp16"),
    RunSpec("gpt2-10m bf16 ckpt", "pretrain", "gpt2", 10_000_000, 8192, 256, 16, 16, "bf16", ckpt=True),
    RunSpec("gpt2-124m bf16", "pretrain", "gpt2", 124_000_000, 50257, 1024, 4, 8, "bf16"),
    RunSpec("gpt2-124m bf16 ckpt", "pretrain", "gpt2", 124_000_000, 50257, 1024, 4, 8, "bf16", ckpt=True),
    RunSpec("gpt2-124m fp16 8bit", "pretrain", "gpt2", 124_000_000, 50257, 1024, 4, 8, "fp16",
            optimizer="adamw8bit"),
    RunSpec("llama-50m bf16", "pretrain", "llama", 50_000_000, 32000, 512, 8, 8, "bf16"),
    RunSpec("llama-50m fp16 ckpt", "pretrain", "llama", 50_000_000, 32000, 512, 8, 8, "fp16", ckpt=True),
    RunSpec("smollm2-135m lora bf16", "lora", "smollm2-135m", 0, 49152, 512, 4, 8, "bf16"),
    RunSpec("smollm2-135m lora fp16 ckpt", "lora", "smollm2-135m", 0, 49152, 512, 4, 8, "fp16", ckpt=True),
    RunSpec("smollm2-135m qlora bf16", "qlora", "smollm2-135m", 0, 49152, 512, 4, 8, "bf16"),
    RunSpec("minilm classify bf16", "classify", "minilm-l6", 0, 30522, 128, 32, 32, "bf16"),
    RunSpec("minilm classify fp16", "classify", "minilm-l6", 0, 30522, 128, 32, 32, "fp16"),
]
TINY = [
    RunSpec("gpt2-tiny fp32", "pretrain", "gpt2", 70_000, 256, 32, 4, 8, "fp32"),
    RunSpec("gpt2-tiny fp32 ckpt", "pretrain", "gpt2", 70_000, 256, 32, 4, 8, "fp32", ckpt=True),
    RunSpec("llama-tiny fp32 8bit", "pretrain", "llama", 70_000, 256, 32, 4, 4, "fp32", optimizer="adamw8bit"),
    RunSpec("llama-tiny lora fp32", "lora", "llama-tiny", 0, 512, 32, 4, 4, "fp32"),
    RunSpec("llama-tiny qlora fp32", "qlora", "llama-tiny", 0, 512, 32, 4, 4, "fp32"),
    RunSpec("bert-tiny classify fp32", "classify", "bert-tiny", 0, 512, 32, 8, 8, "fp32"),
]
# (OOM/auto-fit model, scaler model, QLoRA model, throughput model): (full, tiny)
CHECKS = {
    "oom": (RunSpec("oom gpt2-124m", "pretrain", "gpt2", 124_000_000, 50257, 1024, 8, 8, "auto"),
            RunSpec("oom gpt2-tiny", "pretrain", "gpt2", 70_000, 256, 64, 1, 4, "fp32")),
    "scaler": (RunSpec("scaler gpt2-10m", "pretrain", "gpt2", 10_000_000, 8192, 256, 8, 8, "fp16"),
               RunSpec("scaler gpt2-tiny", "pretrain", "gpt2", 70_000, 256, 32, 4, 4, "fp16")),
    "qlora": (RunSpec("qlora smollm2-135m", "qlora", "smollm2-135m", 0, 49152, 256, 4, 8, "auto"),
              RunSpec("qlora llama-tiny", "qlora", "llama-tiny", 0, 512, 32, 4, 4, "fp32")),
    "speed": (RunSpec("speed gpt2-124m", "pretrain", "gpt2", 124_000_000, 50257, 1024, 4, 4, "bf16", steps=10),
              RunSpec("speed gpt2-tiny", "pretrain", "gpt2", 70_000, 256, 32, 8, 8, "fp32", steps=4)),
}


@dataclass
class Ctx:
    device: Any                      # memfit.device.DeviceInfo
    gpu: str                         # the hardware profile the planner plans for (this device)
    profile: Any                     # GPUProfile handed to plan workers (an unknown card joins their table)
    budget: int                      # the planner's --gpu-memory: the emulated card
    workdir: Path
    planner: Any
    tiny: bool
    nvml_base: int | None = None     # NVML device used before this process touched CUDA
    t0: float = field(default_factory=time.perf_counter)

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"

    def fit_budget(self, limit: int | None) -> int:
        from memfit.plan.core import CPU_RUNTIME_BYTES
        return self.budget if self.cuda else limit + CPU_RUNTIME_BYTES

    def peak_tflops(self, precision: str) -> float:
        return self.profile.tflops(precision)


PROGRESS: dict[str, Any] = {}         # {"path": DIR/gpu_truth.partial.json, "root": the results dict}


class Planner:
    """Plans in worker processes (the trace of a 124M model takes seconds of CPU; the GPU trains
    meanwhile); with no workers, computed in-process when first asked for."""

    def __init__(self, workers: int) -> None:
        self.pool = None
        if workers > 0:
            import multiprocessing as mp
            from concurrent.futures import ProcessPoolExecutor

            from gpu_truth_runs import worker_init
            self.pool = ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn"), initializer=worker_init)

    def submit(self, fn: Callable, *args, **kw):
        if self.pool is not None:
            return self.pool.submit(fn, *args, **kw)
        return _Lazy(fn, args, kw)

    def close(self) -> None:
        """Stop at once: a trace still running past the time budget must not hold the GPU machine."""
        if self.pool is not None:
            procs = list(getattr(self.pool, "_processes", {}).values())
            self.pool.shutdown(wait=False, cancel_futures=True)
            for proc in procs:
                proc.terminate()


class _Lazy:
    def __init__(self, fn, args, kw) -> None:
        self.fn, self.args, self.kw, self.done, self.value = fn, args, kw, False, None

    def result(self, timeout: float | None = None):
        if not self.done:
            self.value, self.done = self.fn(*self.args, **self.kw), True
        return self.value


def guarded(results: dict, key: str, ctx: Ctx, budget_s: float, fn: Callable[[], dict]) -> dict:
    """One row: skipped past the time budget, its exception recorded (the other rows go on)."""
    elapsed = time.perf_counter() - ctx.t0
    if elapsed > budget_s:
        out = {"status": "skipped", "reason": f"time budget: {elapsed:.0f}s > {budget_s:.0f}s before it started"}
    else:
        t = time.perf_counter()
        try:
            out = fn()
        except Exception as e:  # noqa: BLE001 - a failed row is a result, not the end of the script
            out = {"status": "error", "error": f"{type(e).__name__}: {str(e)[:500]}",
                   "traceback": traceback.format_exc()[-2000:]}
        out["row_seconds"] = time.perf_counter() - t
    results[key] = out
    if PROGRESS:   # killed from outside (a device timeout), the rows done so far are still on disk
        import json
        PROGRESS["path"].write_text(json.dumps(PROGRESS["root"], indent=1, default=str))
    print(f"[{time.perf_counter() - ctx.t0:6.1f}s] {key}: {out['status']}"
          + (f" ({out.get('reason') or out.get('error')})" if out["status"] != "ok" else ""), flush=True)
    return out


def skip_reason(spec: RunSpec, ctx: Ctx) -> str | None:
    from memfit.models.optim import eight_bit_available
    if spec.needs_bnb and eight_bit_available():
        return eight_bit_available()
    if ctx.cuda and spec.precision == "bf16" and not ctx.device.bf16_native:
        return f"no native bf16 on {ctx.device.name}"
    return None


def sweep_row(spec: RunSpec, ctx: Ctx, plans: tuple) -> dict:
    from gpu_truth_runs import compare, make_config, run_memfit, spec_json
    why = skip_reason(spec, ctx)
    if why:
        return {"status": "skipped", "reason": why, "spec": spec_json(spec)}
    meas = run_memfit(spec, make_config(spec, ctx.gpu, ctx.budget, ctx.workdir), ctx.device,
                      nvml_base=ctx.nvml_base)
    trace, analytic = plans[0].result(), plans[1].result()
    row = {"status": "ok", "spec": spec_json(spec), "measured": meas, "predicted": trace,
           "predicted_analytic": analytic, "err_pct": compare(trace, meas),
           "err_pct_analytic": compare(analytic, meas)}
    if meas["oom_events"]:
        row["note"] = "OOM during the run: the peak is not the planned micro-batch's; left out of the errors"
    return row


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--budget-gib", type=float, default=15.0, help="emulated card (default: a T4's 15 GiB)")
    ap.add_argument("--out", default=str(HERE / "results"), help="where gpu_truth.json/.txt go")
    ap.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto")
    ap.add_argument("--tiny", action="store_true", help="tiny models (CI: --device cpu --tiny, < 1 min)")
    ap.add_argument("--time-budget-s", type=float, default=None, help="start no row after this (cuda 200)")
    ap.add_argument("--plan-workers", type=int, default=None, help="plan processes (default: cuda 6, cpu 0)")
    ap.add_argument("--write-constants", action="store_true",
                    help="update src/memfit/gpu_arch.json for this GPU's architecture from the measurement")
    ap.add_argument("--from-json", metavar="JSON", help="no run: the table, suggestions and (with "
                    "--write-constants) gpu_arch.json update from a gpu_truth.json brought back from a GPU machine")
    ap.add_argument("--context-probe", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.context_probe:
        import json

        from gpu_truth_speed import context_probe
        print(json.dumps(context_probe()))
        return 0
    from gpu_truth_report import finish
    if args.from_json:
        import json
        return finish(args, json.loads(Path(args.from_json).read_text()))
    return finish(args, run_all(args))


def run_all(args) -> dict:
    from gpu_truth_report import env_info
    want_cuda = args.device != "cpu"
    import torch
    cuda = want_cuda and torch.cuda.is_available()
    if args.device == "cuda" and not cuda:
        raise SystemExit("gpu_truth: --device cuda but torch sees no CUDA device (use --device cpu)")
    results: dict[str, Any] = {"mode": "cuda" if cuda else "cpu", "tiny": args.tiny,
                               "date": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    budget_s = args.time_budget_s if args.time_budget_s is not None else (200.0 if cuda else 600.0)
    workers = args.plan_workers if args.plan_workers is not None else (min(6, (os.cpu_count() or 2) - 2) if cuda
                                                                       else 0)
    planner = Planner(workers)
    t0 = time.perf_counter()
    Path(args.out).mkdir(parents=True, exist_ok=True)
    PROGRESS.update(path=Path(args.out) / "gpu_truth.partial.json", root=results)
    with tempfile.TemporaryDirectory(prefix="gpu_truth-") as tmp:
        try:
            _run(args, results, cuda, budget_s, planner, Path(tmp), t0)
        except Exception as e:  # noqa: BLE001 - whatever was measured is still written
            results["fatal"] = {"error": f"{type(e).__name__}: {str(e)[:500]}", "traceback": traceback.format_exc()[-3000:]}
            print(f"gpu_truth: stopped early: {results['fatal']['error']}", flush=True)
        finally:
            planner.close()
    results["elapsed_s"] = time.perf_counter() - t0
    results["time_budget_s"] = budget_s
    if "env" not in results:
        results["env"] = env_info(results.get("device_info"))
    return results


def _run(args, results: dict, cuda: bool, budget_s: float, planner: Planner, workdir: Path, t0: float) -> None:
    from gpu_truth_checks import (
        auto_fit_first_choice,
        oom_recovery,
        oom_start,
        qlora_train_merge,
        scaler_skips_inf,
        submit_auto_fit,
    )
    from gpu_truth_report import env_info
    from gpu_truth_runs import make_config, plan_figures, profile_key, register_profile, spec_replace
    from gpu_truth_speed import measure_context, throughput

    from memfit.hardware import cpu_profile, profile_for_device
    from memfit.train.oom import configure_allocator
    pick = 1 if args.tiny else 0
    specs = TINY if args.tiny else SWEEP
    budget = int(args.budget_gib * GiB)
    out = results          # written in place: a failure mid-way keeps every row done so far
    out["budget_bytes"] = budget
    if cuda:
        configure_allocator()            # memfit's allocator settings (expandable segments), before CUDA starts
        from memfit.device import nvml_used_bytes
        guarded(out, "context", Ctx(None, "", None, 0, workdir, planner, args.tiny, t0=t0), budget_s,
                lambda: measure_context(HERE / "gpu_truth.py") if not args.tiny else
                {"status": "skipped", "reason": "--tiny"})
        nvml_base = nvml_used_bytes(0)
        from memfit.device import detect
        device = detect()
        prof = profile_for_device(device)
        register_profile(prof)            # a card memfit has no profile for is planned as itself
        budget = min(budget, device.total_memory)     # a real T4 (14.75 GiB) cannot emulate 15
        out["budget_bytes"] = budget
        cap = budget - prof.cuda_context_bytes
        import torch
        torch.cuda.set_per_process_memory_fraction(min(1.0, cap / device.total_memory))
        out["allocator_cap_bytes"] = cap
    else:
        from memfit.device import detect
        device, nvml_base = detect("cpu"), None
        prof = cpu_profile(budget, device.bf16_native)
        out["context"] = {"status": "skipped", "reason": "CPU run: no CUDA context"}
    out["device_info"] = {"type": device.type, "name": device.name, "total_memory": device.total_memory,
                          "capability": device.capability, "bf16_native": device.bf16_native,
                          "profile": prof.name}
    out["env"] = env_info(out["device_info"])      # now, so a partial JSON names the machine too
    ctx = Ctx(device, "cpu" if not cuda else profile_key(prof), prof, budget, workdir, planner, args.tiny,
              nvml_base, t0)
    # Every plan is submitted first: with workers they run while the GPU trains.
    plans = [(planner.submit(plan_figures, make_config(s, ctx.gpu, budget, workdir), "trace", prof),
              planner.submit(plan_figures, make_config(s, ctx.gpu, budget, workdir), "analytic", prof))
             for s in specs]
    oom_spec = CHECKS["oom"][pick]
    if oom_spec.precision == "auto":
        oom_spec = spec_replace(oom_spec, precision="bf16" if device.bf16_native or not cuda else "fp16")
    setup: dict[str, Any] = {}
    if cuda:   # the OOM row's start (analytic: instant) now, so auto-fit's traces run while the GPU trains
        try:
            setup["start"], setup["limit"], setup["how"] = oom_start(ctx, oom_spec)
            setup["fitting"] = submit_auto_fit(ctx, setup["start"], setup["limit"])
        except Exception:  # noqa: BLE001 - the rows below record it
            setup.clear()

    def oom_row() -> dict:
        if "start" not in setup:
            setup["start"], setup["limit"], setup["how"] = oom_start(ctx, oom_spec)
        return oom_recovery(ctx, setup["start"], setup["limit"], setup["how"])

    guarded(out, "oom_recovery", ctx, budget_s, oom_row)
    guarded(out, "auto_fit", ctx, budget_s, lambda: auto_fit_first_choice(ctx, setup["start"], setup["limit"],
                                                                          setup.get("fitting"))
            if "start" in setup else {"status": "skipped", "reason": "the OOM row could not set up its budget"})
    speed = CHECKS["speed"][pick]
    precisions = ["bf16", "fp16"] if cuda else ["fp32"]
    if cuda and not device.bf16_native:
        precisions = ["fp16"]
    out["throughput"] = {}
    guarded(out["throughput"], precisions[0], ctx, budget_s,
            lambda: throughput(ctx, spec_replace(speed, precision=precisions[0])))
    out["sweep"] = {}
    for s, p in zip(specs, plans):
        guarded(out["sweep"], s.name, ctx, budget_s, lambda s=s, p=p: sweep_row(s, ctx, p))
    guarded(out, "scaler", ctx, budget_s, lambda: scaler_skips_inf(ctx, CHECKS["scaler"][pick]))
    q = CHECKS["qlora"][pick]
    if q.precision == "auto":
        q = spec_replace(q, precision="bf16" if device.bf16_native else "fp16")
    guarded(out, "qlora", ctx, budget_s, lambda: {"status": "skipped", "reason": skip_reason(q, ctx)}
            if skip_reason(q, ctx) else qlora_train_merge(ctx, q))
    for prec in precisions[1:]:
        guarded(out["throughput"], prec, ctx, budget_s,
                lambda prec=prec: throughput(ctx, spec_replace(speed, precision=prec)))


if __name__ == "__main__":
    sys.exit(main())
