"""bench/gpu_truth.py's behaviour checks, each a real memfit run: OOM recovery against a fresh run at the
recovered micro-batch, auto-fit's first choice under the budget, fp16 + GradScaler skipping an inf step,
QLoRA training and merging. `ctx` is gpu_truth.Ctx (device, planner, budget, byte limit on CPU)."""

from __future__ import annotations

import math
from typing import Any

from gpu_truth_runs import RunSpec, base_dir, make_config, run_memfit, spec_json, spec_replace


def _losses_close(a: list[float], b: list[float], cuda: bool) -> bool:
    import torch
    if len(a) != len(b) or not a:
        return False
    # Same micro-batch, same data, same seed: bit-identical on CPU; CUDA backward kernels (embedding
    # gradients, split-K GEMMs) accumulate in a nondeterministic order, hence the tolerance there.
    rtol, atol = (1e-3, 1e-3) if cuda else (1e-5, 1e-6)
    return bool(torch.allclose(torch.tensor(a, dtype=torch.float64), torch.tensor(b, dtype=torch.float64),
                               rtol=rtol, atol=atol))


def oom_start(ctx, spec: RunSpec) -> tuple[RunSpec, int | None, dict]:
    """The OOM row's set-up: (spec starting above the budget, CPU byte limit or None, how it was chosen).

    CUDA: the allocator's cap is the budget; start at the smallest power of two the analytic plan puts
    at 1.5x the budget (so a real torch.OutOfMemoryError is certain). CPU: a byte limit between the
    trace's exact tensor peaks at micro-batch m and 2m, starting at 2m."""
    from gpu_truth_runs import plan_figures
    if ctx.cuda:
        m = 8
        while m < 1024:
            cfg = make_config(spec_replace(spec, micro=m, eff=m), ctx.gpu, ctx.budget, ctx.workdir)
            if plan_figures(cfg, "analytic", ctx.profile)["nvidia_smi"] > 1.5 * ctx.budget:
                break
            m *= 2
        return spec_replace(spec, micro=m, eff=m), None, {"start_micro": m, "limit": "allocator cap"}
    m = spec.micro
    peaks = [plan_figures(make_config(spec_replace(spec, micro=k, eff=2 * m), ctx.gpu, ctx.budget, ctx.workdir),
                          "trace", ctx.profile)["peak_tensor_bytes"] for k in (m, 2 * m)]
    limit = (peaks[0] + peaks[1]) // 2
    return spec_replace(spec, micro=2 * m, eff=2 * m), limit, {
        "start_micro": 2 * m, "limit": "live tensor bytes", "limit_bytes": limit,
        "planned_tensor_peaks": {str(m): peaks[0], str(2 * m): peaks[1]}}


def oom_recovery(ctx, start: RunSpec, limit: int | None, how: dict) -> dict[str, Any]:
    """A run whose micro-batch exceeds the budget (oom_start's set-up) recovers, keeps the effective
    batch, and its losses match a fresh run started at the recovered micro-batch."""
    cfg = make_config(start, ctx.gpu, ctx.budget, ctx.workdir)
    a = run_memfit(start, cfg, ctx.device, limit=limit, nvml_base=ctx.nvml_base)
    settled = a["final_micro_batch"]
    fresh = spec_replace(start, micro=settled)
    b = run_memfit(fresh, make_config(fresh, ctx.gpu, ctx.budget, ctx.workdir), ctx.device, limit=limit,
                   nvml_base=ctx.nvml_base)
    close = _losses_close(a["losses"], b["losses"], ctx.cuda)
    recovered = (a["status"] == "finished" and len(a["oom_events"]) > 0 and settled < start.micro
                 and a["tokens"] == b["tokens"] and not b["oom_events"])
    return {"status": "ok", "spec": spec_json(start), **how, "oom_events": a["oom_events"],
            "recovered_micro": settled, "effective_batch": start.eff, "losses_oom_run": a["losses"],
            "losses_fresh_run": b["losses"], "tokens_equal": a["tokens"] == b["tokens"],
            "fresh_run_oom_events": len(b["oom_events"]), "losses_allclose": close,
            "oom_recovered": bool(recovered and close), "measured_oom_run": _mem(a), "measured_fresh_run": _mem(b)}


def submit_auto_fit(ctx, spec: RunSpec, limit: int | None):
    """auto-fit for the OOM row's configuration, in a plan worker (seconds of tracing for a 124M model)."""
    from gpu_truth_runs import fit_config
    cfg = make_config(spec, ctx.gpu, ctx.fit_budget(limit), ctx.workdir)
    # CPU: the budget is the tensor limit + the planner's 0.75 GiB runtime term, so auto-fit's 5% margin
    # (of the whole budget) would dwarf a tiny model's tensors; test_plan_fit does the same.
    return ctx.planner.submit(fit_config, cfg, ctx.profile, **({} if ctx.cuda else {"margin": 0.0}))


def auto_fit_first_choice(ctx, spec: RunSpec, limit: int | None, fitting=None) -> dict[str, Any]:
    """`--auto-fit` under the emulated budget: its first choice trains with no OOM event."""
    margin = {} if ctx.cuda else {"margin": 0.0}
    fitted, lines = (fitting or submit_auto_fit(ctx, spec, limit)).result()
    t = fitted.train
    run = spec_replace(spec, micro=t.batch_size, ckpt=t.gradient_checkpointing, optimizer=fitted.optim.optimizer)
    r = run_memfit(run, fitted, ctx.device, limit=limit, nvml_base=ctx.nvml_base)
    return {"status": "ok", "spec": spec_json(spec), "budget_bytes": ctx.fit_budget(limit), "auto_fit": lines,
            "chosen": {"micro_batch": t.batch_size, "gradient_checkpointing": t.gradient_checkpointing,
                       "optimizer": fitted.optim.optimizer, "precision": fitted.train.precision},
            "oom_events": r["oom_events"], "no_oom": r["status"] == "finished" and not r["oom_events"],
            "measured": _mem(r), **({"margin": 0.0} if margin else {})}


def scaler_skips_inf(ctx, spec: RunSpec) -> dict[str, Any]:
    """fp16 + GradScaler: an optimizer step whose gradients are inf is skipped (weights unchanged, the
    scale halves) and the next step trains again. The inf is put into one weight's gradient during step
    3's backward (a tensor hook), so the run keeps memfit's own causal-LM loss path."""
    import torch
    from gpu_truth_runs import build_model
    spec = spec_replace(spec, precision="fp16", steps=4)
    cfg = make_config(spec, ctx.gpu, ctx.budget, ctx.workdir)
    model = build_model(spec, cfg, ctx.device)
    state: dict[str, Any] = {"done": 0}
    INF_STEP = 3
    first = next(p for p in model.parameters() if p.requires_grad)
    first.register_hook(lambda g: g * math.inf if state["done"] == INF_STEP - 1 else g)

    def on_step(step: int, row: dict) -> None:
        params = [p.detach().clone() for p in model.parameters() if p.requires_grad]
        if step == INF_STEP:
            state["unchanged"] = all(torch.equal(p, q) for p, q in zip(params, state["before"]))
        if step == INF_STEP + 1:
            state["changed_after"] = not all(torch.equal(p, q) for p, q in zip(params, state["before"]))
        state["before"], state["done"] = params, step

    r = run_memfit(spec, cfg, ctx.device, on_step=on_step, model=model, measure=False)
    s = r["loss_scale"]
    halved = len(s) == 4 and s[INF_STEP - 1] == s[INF_STEP - 2] / 2
    only = len(s) == 4 and s[0] == s[1] == s[2] * 2 == s[3] * 2    # no other step was skipped
    return {"status": "ok", "spec": spec_json(spec), "precision": r["precision"], "inf_step": INF_STEP,
            "losses": r["losses"], "loss_scale": s,
            "weights_unchanged_on_inf_step": bool(state.get("unchanged")), "scale_halved": bool(halved),
            "no_other_step_skipped": bool(only), "next_step_trains": bool(state.get("changed_after")),
            "skipped_inf_step": bool(state.get("unchanged") and halved and only and state.get("changed_after"))}


def qlora_train_merge(ctx, spec: RunSpec) -> dict[str, Any]:
    """QLoRA (4-bit nf4 base + fp32 adapters) trains with finite losses, its adapter is saved as a peft
    folder and `memfit merge` adds exactly scale * B @ A to the targeted fp32 base weights, nothing else."""
    import torch
    from gpu_truth_runs import build_model
    from safetensors.torch import load_file

    from memfit.jobs.merge import merge_adapter
    from memfit.models.lora import save_adapter
    cfg = make_config(spec, ctx.gpu, ctx.budget, ctx.workdir)
    model = build_model(spec, cfg, ctx.device)
    r = run_memfit(spec, cfg, ctx.device, model=model, nvml_base=ctx.nvml_base)
    folder = base_dir(ctx.workdir, spec.arch, weights=True)      # what the 4-bit base was loaded from
    adapter = save_adapter(model, ctx.workdir / "qlora-adapter", str(folder))
    del model
    merged = merge_adapter(str(folder), adapter, ctx.workdir / "qlora-merged", dtype="fp32")
    base = load_file(str(folder / "model.safetensors"))
    out = {}
    for f in sorted(merged.glob("*.safetensors")):
        out.update(load_file(str(f)))
    ad = load_file(str(adapter / "adapter_model.safetensors"))
    scale = cfg.lora.lora_alpha / cfg.lora.lora_r
    targeted, exact, untouched_equal = 0, True, True
    for name, w in out.items():
        key = "base_model.model." + name.removesuffix(".weight")
        a, b = ad.get(key + ".lora_A.weight"), ad.get(key + ".lora_B.weight")
        if name not in base:
            continue
        if a is None:
            untouched_equal &= torch.equal(w, base[name])
            continue
        targeted += 1
        exact &= torch.allclose(w - base[name], scale * (b @ a), rtol=1e-4, atol=1e-6)
    finite = all(math.isfinite(x) for x in r["losses"])
    delta = max(float(v.abs().max()) for k, v in ad.items() if "lora_B" in k)
    return {"status": "ok", "spec": spec_json(spec), "losses": r["losses"], "losses_finite": finite,
            "adapter_b_max_abs": delta, "targeted_weights": targeted, "merge_exact": bool(exact),
            "untouched_weights_equal": bool(untouched_equal), "measured": _mem(r),
            "trained_and_merged": bool(finite and delta > 0 and targeted > 0 and exact and untouched_equal)}


def _mem(r: dict) -> dict:
    return {k: r[k] for k in ("tensor_peak", "peak_allocated", "peak_reserved", "nvml_peak_used") if k in r}
