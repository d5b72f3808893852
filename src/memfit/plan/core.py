"""make_plan: a Config and a budget in, a Plan out (memory, time, disk, host RAM). Pure: nothing real
is allocated, no data is read beyond file sizes, no RNG is consumed.

How the figures are put together (target = CUDA):
  peak allocated = trace's allocator replay (512-byte blocks) + cuBLAS workspaces
  peak reserved  = trace's allocator replay (segments) + the workspaces' segment
  nvidia-smi     = peak reserved + CUDA context (+ paged 8-bit state when resident)
  fits           = nvidia-smi <= device memory (the --gpu profile's, or --gpu-memory)
With the analytic engine the replay is replaced by the analytic peak (+512-byte rounding of an
estimated tensor count) and a fragmentation allowance calibrated on replays (see RESERVED_*).
Target = CPU: peak = live tensor bytes (exact under the trace), + the Python/torch runtime for RSS.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from memfit.config import Config
from memfit.plan.analytic import Memory, analytic_memory
from memfit.plan.dims import dims_of
from memfit.plan.spec import (
    Knobs,
    ModelInfo,
    StepSpec,
    PlanInputError,
    Target,
    effective_batch,
    knobs_from_config,
    resolve_model,
    resolve_target,
    step_spec,
    world_size,
)
from memfit.plan.timing import TimePlan, plan_time

GiB = 2 ** 30
MiB = 2 ** 20
CPU_RUNTIME_BYTES = int(0.75 * GiB)     # python + torch + transformers resident, no tensors (measured ~0.7 GiB)
GPU_HOST_RUNTIME_BYTES = int(2.5 * GiB)  # the same plus CUDA/cuBLAS/cuDNN host libraries
# Analytic engine only: reserved/allocated on replays of the sweep ran 1.04-1.17 (small models,
# many 20 MiB segments) and ~1.03 for 1B+ models; a flat 8% + 64 MiB covers both.
RESERVED_FRACTION = 0.08
RESERVED_FLOOR = 64 * MiB


@dataclass
class MemoryPlan:
    rows: list[tuple[str, int, str]]     # (term, bytes, note) for the table
    peak_tensor_bytes: int               # exact live tensor bytes at the peak (trace) / formula
    peak_allocated: int
    peak_reserved: int
    nvidia_smi: int                      # what nvidia-smi (or RSS on CPU) would show
    cuda_context: int
    workspace: int
    paged: int
    device_total: int
    budget: int
    fits: bool
    headroom: int
    peak_phase: str
    activation_per_layer: int
    activation_per_layer_ckpt: int


@dataclass
class DiskPlan:
    checkpoint_full: int
    checkpoint_light: int
    final_model: int
    budget: int | None
    checkpoints_fit: int | None
    policy_bytes: int
    fits: bool | None
    merged_model: int | None = None      # LoRA/QLoRA: `memfit merge` output (fp16); final_model is the adapter


@dataclass
class Plan:
    cfg: Config
    engine: str
    target: Target
    model: ModelInfo
    spec: StepSpec
    knobs: Knobs
    effective_batch: int
    memory: MemoryPlan
    time: TimePlan
    disk: DiskPlan
    host_ram: dict[str, int]
    analytic: Memory
    trace: Any = None                    # TraceResult when engine == "trace"
    fit_lines: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    world: int = 1                       # torchrun processes; memory and knobs are per device

    @property
    def fits(self) -> bool:
        return self.memory.fits


# ---------------------------------------------------------------- task and config normalisation

def apply_task(cfg: Config, task: str | None) -> Config:
    """`memfit plan --task` onto the config: pretrain | full | lora | qlora | classify."""
    if task is None:
        if cfg.model.model and cfg.task == "pretrain":
            try:
                from memfit.plan.spec import _arch_of, _load_config
                arch = _arch_of(getattr(_load_config(cfg.model.model), "model_type", "llama"))
            except Exception:
                arch = "llama"
            task = "classify" if arch == "bert" else ("qlora" if cfg.lora.qlora else "lora" if cfg.lora.lora
                                                      else "full")
        else:
            return cfg
    if task == "pretrain":
        return cfg.replace(task="pretrain", lora={"lora": False, "qlora": False})
    if task == "full":
        return cfg.replace(task="finetune", lora={"lora": False, "qlora": False})
    if task == "lora":
        return cfg.replace(task="finetune", lora={"lora": True, "qlora": False})
    if task == "qlora":
        return cfg.replace(task="finetune", lora={"lora": True, "qlora": True})
    if task == "classify":
        return cfg.replace(task="classify")
    raise ValueError(f"unknown --task {task!r}")


# ---------------------------------------------------------------- memory

def evaluate_memory(spec: StepSpec, target: Target, engine: str = "trace"):
    """(MemoryPlan, analytic Memory, TraceResult | None) for one StepSpec."""
    an = analytic_memory(spec)
    tr = None
    prof = target.profile
    cuda = prof.device_type == "cuda"
    ws = prof.cublas_workspace_bytes if cuda else 0
    if engine == "trace":
        from memfit.plan.trace import trace_plan
        tr = trace_plan(spec)
        tensor_peak = tr.peak_bytes
        alloc = tr.cuda_allocated_peak if cuda else tr.peak_bytes
        reserved = tr.cuda_reserved_peak if cuda else tr.peak_bytes
        paged = tr.paged_state_bytes
        phase = tr.peak_phase
    elif engine == "analytic":
        tensor_peak = an.peak_bytes
        n_tensors = 40 * spec.n_layers + 200
        alloc = tensor_peak + (n_tensors * 256 if cuda else 0)
        reserved = alloc + max(int(RESERVED_FRACTION * alloc), RESERVED_FLOOR) if cuda else alloc
        paged = an.optimizer if (spec.optimizer == "paged_adamw8bit" and cuda) else 0
        phase = an.peak_phase
    else:
        raise ValueError(f"unknown engine {engine!r} (trace or analytic)")
    if cuda:
        from memfit.plan.allocator import segment_size
        alloc += ws
        reserved += segment_size(ws)
        ctx = prof.cuda_context_bytes
        used = reserved + ctx + paged
    else:
        ctx = 0
        used = reserved + CPU_RUNTIME_BYTES
    budget = target.memory_bytes
    rows = _rows(spec, an, tr, cuda, ws, ctx, paged, alloc, reserved, used)
    mp = MemoryPlan(rows=rows, peak_tensor_bytes=tensor_peak, peak_allocated=int(alloc), peak_reserved=int(reserved),
                    nvidia_smi=int(used), cuda_context=int(ctx), workspace=int(ws), paged=int(paged),
                    device_total=int(prof.memory_bytes), budget=int(budget), fits=used <= budget,
                    headroom=int(budget - used), peak_phase=_phase_name(phase),
                    activation_per_layer=an.activation_per_layer,
                    activation_per_layer_ckpt=an.activation_per_layer_ckpt)
    return mp, an, tr


def _phase_name(p: str) -> str:
    names = {"fwd": "forward (end: logits + loss)", "bwd": "backward", "opt": "optimizer step"}
    if "." in p:
        step, ph = p.split(".", 1)
        return f"{names.get(ph, ph)}, step {step[1:]}"
    return p


def _rows(spec, an: Memory, tr, cuda, ws, ctx, paged, alloc, reserved, used):
    """The table: trace figures where the trace measures them, formulas otherwise."""
    L = spec.n_layers
    t = tr
    rows = [
        ("parameters", t.param_bytes if t else an.weights,
         f"{an.total_params / 1e6:,.1f}M params, {an.trainable_params / 1e6:,.2f}M trainable"),
        ("gradients", t.grad_bytes if t else an.gradients, "fp32, freed by zero_grad(set_to_none=True)"),
        ("optimizer state", t.state_bytes if t else an.optimizer, spec.optimizer
         + (" (paged: CUDA unified memory)" if paged else "")),
        ("autocast weight copies", an.autocast_weight_copies,
         "low-precision copies of fp32 weights, live forward->backward" if an.autocast_weight_copies else "none"),
        ("activations / layer", an.activation_per_layer,
         f"without checkpointing; with: {_fmt(an.activation_per_layer_ckpt)} (its input only)"),
        (f"activations x {L} layers", an.activations,
         "checkpointing on: inputs + one block recomputed" if spec.gradient_checkpointing else "saved for backward"),
        ("logits + loss (peak)", an.logits_loss, ("chunked: one chunk of logits, the head's grads"
         if spec.chunked_loss else "LM head output, fp32 log-softmax and its grad")
         if spec.kind == "causal" else "classifier logits"),
        ("temporaries", an.temporaries, "recompute / head grads / accumulated grads"),
    ]
    rows.append(("peak tensors", t.peak_bytes if t else an.peak_bytes,
                 "exact: fake-tensor trace" if t else "formulas"))
    if cuda:
        rows += [("allocator rounding", max(0, alloc - ws - (t.peak_bytes if t else an.peak_bytes)),
                  "512-byte blocks, unsplit remainders"),
                 ("cuBLAS workspaces", ws, "through the caching allocator"),
                 ("peak allocated", alloc, "torch.cuda.max_memory_allocated"),
                 ("reserved - allocated", reserved - alloc, "segments (2/20 MiB, 2 MiB-rounded), fragmentation"),
                 ("peak reserved", reserved, "torch.cuda.max_memory_reserved"),
                 ("CUDA context", ctx, "driver + kernels + handles (outside PyTorch)")]
        if paged:
            rows.append(("paged optimizer state", paged, "resident unless evicted"))
        rows.append(("nvidia-smi", used, "what the device shows for this process"))
    else:
        rows += [("runtime (python, torch)", CPU_RUNTIME_BYTES, "resident, not tensors"),
                 ("process RSS (approx.)", used, "tensors + runtime")]
    return rows


def _fmt(n: float) -> str:
    n = float(n)
    for unit, s in (("GiB", GiB), ("MiB", MiB), ("KiB", 1024)):
        if abs(n) >= s:
            return f"{n / s:.2f} {unit}"
    return f"{int(n)} B"


# ---------------------------------------------------------------- disk and host RAM

def plan_disk(cfg: Config, spec: StepSpec, an: Memory, tr) -> DiskPlan:
    lo = spec.lora
    trainable = an.trainable_params
    state = tr.state_bytes if tr is not None else an.optimizer
    overhead = 2 * MiB     # rng, data position, loop counters, scheduler, manifest
    merged = None
    if lo is None:
        model_part = 4 * an.total_params
        final = 4 * an.total_params
    else:
        model_part = 4 * trainable
        final = 4 * trainable                       # final_model/ is the fp32 adapter (+ tokenizer files)
        merged = 2 * (an.total_params - trainable)  # `memfit merge` writes the base + adapter in fp16
    full = model_part + state + overhead
    light = model_part + overhead
    k = max(1, cfg.checkpoint.keep_last)     # --keep-last 0 keeps the newest until the run finishes
    mode = cfg.checkpoint.save_optimizer_state
    n_full = k if mode == "full" else 0 if mode == "light" else min(2, k)
    policy = n_full * full + (k - n_full) * light + light + final   # + best/ + final_model/
    budget = cfg.budget.disk_budget
    if budget is None:
        try:
            import shutil
            out = Path(cfg.run.output_dir or "runs")
            probe = out if out.exists() else Path(".")
            budget = int(shutil.disk_usage(probe).free * 0.9)
        except Exception:
            budget = None
    fit_n = max(0, (budget - final - light) // full) if budget else None
    return DiskPlan(int(full), int(light), int(final), budget, int(fit_n) if fit_n is not None else None,
                    int(policy), (policy <= budget) if budget else None,
                    int(merged) if merged is not None else None)


def plan_host_ram(cfg: Config, spec: StepSpec, an: Memory, tr, target: Target, mem: MemoryPlan) -> dict[str, int]:
    """Host RAM per phase. Loading, saving, export and merge go tensor by tensor (DESIGN.md), so
    their peak is the runtime plus the largest tensor (plus what must sit in RAM anyway)."""
    cuda = target.profile.device_type == "cuda"
    runtime = GPU_HOST_RUNTIME_BYTES if cuda else CPU_RUNTIME_BYTES
    m = dims_of(spec.model_config, spec.arch)
    largest = 4 * m.V * m.d
    lo = spec.lora
    if lo is None and cfg.task == "pretrain":
        load = runtime + (4 * an.total_params if cuda else 0)   # built on the CPU, then moved
    else:
        load = runtime + largest
    ram = {
        "load": int(load),
        "train": int(runtime + (0 if cuda else mem.peak_tensor_bytes)),
        "save": int(runtime + largest + (0 if cuda else mem.peak_tensor_bytes)),
        "export": int(runtime + largest + (0 if cuda else mem.peak_tensor_bytes)),
    }
    if lo is not None:
        ram["merge"] = int(CPU_RUNTIME_BYTES + 2 * an.total_params + largest)
    ram["budget"] = int(target.ram_bytes)
    return ram


# ---------------------------------------------------------------- the plan

def build_plan(cfg: Config, knobs: Knobs | None = None, engine: str = "trace",
               target: Target | None = None, info: ModelInfo | None = None) -> Plan:
    from memfit.hardware import with_platform
    cfg = with_platform(cfg)
    target = target or resolve_target(cfg)
    if cfg.model.attn_implementation == "flash_attention_2" and not target.profile.flash_attention:
        raise PlanInputError(f"--attn-implementation flash_attention_2 needs an Ampere or newer GPU; the target "
                             f"is {target.profile.name} (plan sdpa or eager, or name such a GPU with --gpu)")
    info = info or resolve_model(cfg)
    knobs = knobs or knobs_from_config(cfg, target.profile)
    spec = step_spec(cfg, info, target, knobs)
    mem, an, tr = evaluate_memory(spec, target, engine)
    eff, world = effective_batch(cfg), world_size()     # global batch; this device's share is eff / world
    t = plan_time(cfg, spec, target, an, tr, eff, world)
    disk = plan_disk(cfg, spec, an, tr)
    ram = plan_host_ram(cfg, spec, an, tr, target, mem)
    notes = list(an.notes) + (list(tr.notes) if tr is not None else [])
    if spec.lora is not None and spec.lora.qlora:
        notes.append("QLoRA: nf4 base with double quantisation; embeddings, norms and LM head upcast to fp32 "
                     "(peft prepare_model_for_kbit_training)")
    return Plan(cfg, engine, target, info, spec, knobs, eff, mem, t, disk, ram, an, tr, [], notes, world)


def make_plan(cfg: Config, *, engine: str = "trace", task: str | None = None) -> Plan:
    """The plan for `cfg` as configured (no knob changes). Allocates no real model weights."""
    cfg = apply_task(cfg, task)
    return build_plan(cfg, engine=engine)


def replace_knobs(cfg: Config, knobs: Knobs) -> Config:
    """The config that trains with these knobs; the effective batch is kept exactly (the loop splits
    each effective batch into micro-batches of `micro_batch`, the last one possibly smaller)."""
    eff = cfg.effective_batch()
    train = {"batch_size": knobs.micro_batch, "precision": knobs.precision,
             "gradient_checkpointing": knobs.gradient_checkpointing}
    if knobs.micro_batch * knobs.accumulation == eff and cfg.train.effective_batch is None:
        train.update(gradient_accumulation_steps=knobs.accumulation)
    else:
        train.update(effective_batch=eff, gradient_accumulation_steps=1)
    return cfg.replace(train=train, optim={"optimizer": knobs.optimizer})


__all__ = ["DiskPlan", "MemoryPlan", "Plan", "TimePlan", "apply_task", "build_plan", "evaluate_memory", "make_plan",
           "replace_knobs"]
