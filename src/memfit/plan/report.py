"""The plan as a table for people (render_plan) and as JSON for programs (plan_to_json)."""

from __future__ import annotations

from memfit.plan.core import Plan, _fmt


def _procs(p: Plan) -> str:
    """' x 2 processes' under torchrun: the knobs are per device, the effective batch is global."""
    return f" x {p.world} processes" if p.world > 1 else ""


def _dur(s: float | None) -> str:
    if s is None:
        return "?"
    if s < 1e-3:      # two significant digits: a sub-millisecond step is never "0 ms"
        return f"{s * 1000:.2g} ms" if s > 0 else "0 ms"
    if s < 1:
        return f"{s * 1000:.0f} ms"
    if s < 120:
        return f"{s:.1f} s"
    if s < 7200:
        return f"{s / 60:.1f} min"
    return f"{s / 3600:.1f} h"


def _count(n: float) -> str:
    for unit, s in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= s:
            return f"{n / s:.2f}{unit}"
    return f"{int(n)}"


def job_name(plan: Plan) -> str:
    """What is trained, in words: never "from scratch" for a fine-tuning job."""
    lo = plan.spec.lora
    if lo is not None:
        return (f"{'QLoRA' if lo.qlora else 'LoRA'} fine-tuning (r={lo.r} on {','.join(lo.targets)})")
    return {"pretrain": "pretraining from scratch", "finetune": "full fine-tuning",
            "classify": "classification fine-tuning"}.get(plan.cfg.task, plan.cfg.task)


def render_plan(plan: Plan) -> str:
    p, m, t, d = plan, plan.memory, plan.time, plan.disk
    prof = p.target.profile
    k = p.knobs
    lines = []
    lines.append(f"memfit plan — {p.model.source}")
    lines.append(f"  target: {prof.description or prof.name} ({p.target.source}); budget {_fmt(m.budget)}")
    if p.cfg.budget.platform != "none":
        from memfit.hardware import PLATFORMS
        lines.append(f"  platform: {PLATFORMS[p.cfg.budget.platform].description} (--platform; given budgets win)")
    lines.append(f"  job: {job_name(p)}"
                 + f"; seq-len {p.spec.seq_len}; micro-batch {k.micro_batch} x {k.accumulation} accumulation{_procs(p)} "
                 f"= effective {p.effective_batch}; {k.precision}; checkpointing {'on' if k.gradient_checkpointing else 'off'};"
                 f" {k.optimizer}")
    cuda = prof.device_type == "cuda"
    lines.append(f"  engine: {p.engine}" + ((" (fake-tensor trace of a training step"
                                             + (" + CUDA allocator/context terms)" if cuda else ")"))
                                            if p.engine == "trace" else " (formulas)"))
    lines.append("")
    w = max(len(r[0]) for r in m.rows)
    lines.append(f"  {'memory':{w}s}  {'bytes':>11s}  notes")
    for name, b, note in m.rows:
        lines.append(f"  {name:{w}s}  {_fmt(b):>11s}  {note}")
    verdict = "FITS" if m.fits else "DOES NOT FIT"
    lines.append(f"  {verdict}: {_fmt(m.nvidia_smi)} of {_fmt(m.budget)} "
                 f"({'headroom' if m.fits else 'short by'} {_fmt(abs(m.headroom))}); peak in the {m.peak_phase}")
    lines.append("")
    lines.append(f"  time: {_dur(t.step_seconds)}/step, {t.tokens_per_second:,.0f} tokens/s ({t.how})")
    if t.epoch_steps:
        what = (f"{t.epoch_examples:,} examples packed into {t.epoch_rows:,} rows of {p.spec.seq_len} tokens "
                f"(~{t.epoch_examples / max(1, t.epoch_steps):.1f} examples per step) / effective batch "
                f"{p.effective_batch} rows (--packing)" if t.epoch_rows else
                f"{t.epoch_examples:,} examples / effective batch {p.effective_batch} (packed: at most this many "
                "steps; the --model's tokenizer lays out the rows)" if t.epoch_examples and p.spec.packed else
                f"{t.epoch_examples:,} examples / effective batch {p.effective_batch} (padded, no packing)"
                if t.epoch_examples else
                f"{_count(t.epoch_tokens)} tokens / {t.tokens_per_step:,} per step"
                + (" (--epoch-tokens)" if p.cfg.data.epoch_tokens else " (estimated from the data's size)"))
        lines.append(f"        epoch = {what} = {t.epoch_steps:,} step{'s' if t.epoch_steps != 1 else ''}"
                     f" ≈ {_dur(t.epoch_seconds)}")
    if t.total_steps:
        lines.append(f"        {t.total_steps:,} steps ≈ {_dur(t.total_seconds)}"
                     + (f"; session {_dur(t.session_seconds)}: {'fits' if t.fits_session else 'DOES NOT FIT'}"
                        if t.session_seconds is not None else ""))
    lines.append("")
    final = (f"final model (adapter) {_fmt(d.final_model)}; merged fp16 {_fmt(d.merged_model)} (memfit merge, "
             "not counted below)" if d.merged_model is not None else f"final model {_fmt(d.final_model)}")
    lines.append(f"  disk: checkpoint {_fmt(d.checkpoint_full)} full (resumable), {_fmt(d.checkpoint_light)} light "
                 f"(weights only); {final}")
    if d.budget:
        lines.append(f"        budget {_fmt(d.budget)}: {d.checkpoints_fit} full checkpoints fit besides final + best;"
                     f" keep-last {p.cfg.checkpoint.keep_last} ({p.cfg.checkpoint.save_optimizer_state}) needs "
                     f"{_fmt(d.policy_bytes)} -> {'fits' if d.fits else 'DOES NOT FIT'}")
    ram = p.host_ram
    lines.append("  host RAM: " + ", ".join(f"{key} {_fmt(v)}" for key, v in ram.items() if key != "budget")
                 + f" (budget {_fmt(ram['budget'])})")
    if p.fit_lines:
        lines.append("")
        lines.append("  auto-fit:")
        lines += [f"    - {x}" for x in p.fit_lines]
    for n in p.notes:
        lines.append(f"  note: {n}")
    return "\n".join(lines)


def plan_to_json(plan: Plan) -> dict:
    p, m, t, d = plan, plan.memory, plan.time, plan.disk
    k = p.knobs
    return {
        "fits": bool(m.fits),
        "engine": p.engine,
        "model": p.model.source,
        "target": p.target.profile.name,
        "device_total_bytes": m.device_total,
        "budget_bytes": m.budget,
        "peak_tensor_bytes": m.peak_tensor_bytes,
        "peak_allocated_bytes": m.peak_allocated,
        "peak_reserved_bytes": m.peak_reserved,
        "nvidia_smi_bytes": m.nvidia_smi,
        "cuda_context_bytes": m.cuda_context,
        "cublas_workspace_bytes": m.workspace,
        "paged_optimizer_bytes": m.paged,
        "headroom_bytes": m.headroom,
        "peak_phase": m.peak_phase,
        "breakdown": {name: int(b) for name, b, _ in m.rows},
        "activation_bytes_per_layer": m.activation_per_layer,
        "activation_bytes_per_layer_checkpointed": m.activation_per_layer_ckpt,
        "total_params": p.analytic.total_params,
        "trainable_params": p.analytic.trainable_params,
        "micro_batch": k.micro_batch,
        "gradient_accumulation_steps": k.accumulation,
        "effective_batch": p.effective_batch,
        "world_size": p.world,
        "seq_len": p.spec.seq_len,
        "precision": k.precision,
        "gradient_checkpointing": k.gradient_checkpointing,
        "optimizer": k.optimizer,
        "attn_implementation": p.cfg.model.attn_implementation,
        "lora": None if p.spec.lora is None else {"r": p.spec.lora.r, "targets": list(p.spec.lora.targets),
                                                   "qlora": p.spec.lora.qlora},
        "flops_per_step": t.flops_per_step,
        "step_seconds": t.step_seconds,
        "tokens_per_second": t.tokens_per_second,
        "epoch_tokens": t.epoch_tokens,
        "epoch_examples": t.epoch_examples,
        "epoch_steps": t.epoch_steps,
        "epoch_rows": t.epoch_rows,
        "packing": bool(p.spec.packed),
        "platform": p.cfg.budget.platform,
        "epoch_seconds": t.epoch_seconds,
        "total_steps": t.total_steps,
        "total_seconds": t.total_seconds,
        "session_seconds": t.session_seconds,
        "fits_session": t.fits_session,
        "checkpoint_bytes_full": d.checkpoint_full,
        "checkpoint_bytes_light": d.checkpoint_light,
        "final_model_bytes": d.final_model,
        "merged_model_bytes": d.merged_model,
        "disk_budget_bytes": d.budget,
        "checkpoints_fit": d.checkpoints_fit,
        "disk_policy_bytes": d.policy_bytes,
        "disk_fits": d.fits,
        "host_ram_bytes": dict(p.host_ram),
        "analytic_peak_tensor_bytes": p.analytic.peak_bytes,
        "auto_fit": list(p.fit_lines),
        "notes": list(p.notes),
    }
