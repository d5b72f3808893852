"""The time a plan prices: one optimizer step from FLOPs, peak and efficiency (+ the optimizer's memory
traffic), the epoch from the data's size (pretraining: tokens, estimated from bytes; fine-tuning:
examples), the run's total steps by the runs' own rule, and whether it fits the session."""

from __future__ import annotations

import glob
import math
import os
from dataclasses import dataclass
from pathlib import Path

from memfit.config import Config
from memfit.hardware import arch_efficiency
from memfit.plan.analytic import Memory
from memfit.plan.dims import dims_of
from memfit.plan.spec import StepSpec, Target

SESSION_RESERVE_FRACTION = 0.05          # keep 5% of the session for the final save/eval/export


@dataclass
class TimePlan:
    flops_per_step: float
    step_seconds: float
    tokens_per_second: float
    tokens_per_step: int
    epoch_tokens: int | None
    epoch_seconds: float | None
    total_steps: int | None
    total_seconds: float | None
    session_seconds: float | None
    fits_session: bool | None
    how: str
    epoch_examples: int | None = None    # fine-tuning / classify: training examples in one epoch
    epoch_steps: int | None = None       # optimizer steps of one epoch (what the epoch time is made of)
    epoch_rows: int | None = None        # packed fine-tuning: rows of seq_len tokens in one epoch


def efficiency(prof, spec: StepSpec, d: int) -> float:
    """Achieved / peak FLOP/s. GPU (per architecture in gpu_arch.json; estimates until measured): ~0.45
    of the tensor-core peak for d >= 2048, less for narrow models whose small matmuls and elementwise ops dominate (nanoGPT's GPT-2 124M reports ~0.3-0.4
    MFU on A100 with compile; without it less). CPU: measured here (DESIGN.md: an 8.5M GPT-2 at
    1.8k tok/s fp32 is ~0.35 of the 315 GFLOP/s matmul peak; bf16 ~0.07 of 2 TFLOP/s AMX)."""
    if prof.device_type == "cpu":
        return 0.35 if spec.precision == "fp32" else 0.075
    base = arch_efficiency(prof.compute_capability, d)
    if spec.precision == "fp32":
        base = min(0.7, base * 1.6)   # fp32 FMA peak is easier to approach than tensor cores
    return base


# Eager PyTorch launches every kernel from Python: a GPU step takes at least its launches, however few its
# FLOPs. ~10 us a launch with the dispatcher; a transformer layer runs ~15 kernels forward (norms, matmuls,
# attention, activation, residual adds) and ~2x that backward; embeddings, head, loss and the foreach
# optimizer add ~30. A small model on a T4 is launch-bound: without this floor a 2-layer GPT priced at
# 0.1 ms/step (and printed as "0 ms/step").
LAUNCH_SECONDS = 10e-6
KERNELS_PER_LAYER = 45
KERNELS_OUTSIDE_LAYERS = 30


def launch_seconds(spec: StepSpec, prof, layers: int) -> float:
    """The launch-bound floor of one optimizer step on a GPU (0 on a CPU, where nothing is launched)."""
    if prof.device_type == "cpu":
        return 0.0
    return spec.micro_steps * (layers * KERNELS_PER_LAYER + KERNELS_OUTSIDE_LAYERS) * LAUNCH_SECONDS


def step_seconds(flops_per_micro: float, spec: StepSpec, prof, d: int, state_bytes: int, weights: int) -> float:
    """One optimizer step: micro-steps x FLOPs / (peak x efficiency) + the optimizer's memory traffic
    (read+write params, grads, state ~ 2x their bytes) / bandwidth."""
    peak = prof.tflops(spec.precision) * 1e12
    compute = spec.micro_steps * flops_per_micro / (peak * efficiency(prof, spec, d))
    traffic = 2 * (weights + state_bytes) / (prof.bandwidth_gbs * 1e9)
    return compute + traffic


def _bytes_per_token(cfg: Config) -> float:
    if cfg.data.tokenizer == "bpe":
        return 3.2 if cfg.data.vocab_size <= 16384 else 3.8
    return 4.0     # GPT-2 / Llama BPE on English prose (~4 characters per token)


def _data_bytes(cfg: Config) -> int | None:
    total = 0
    for item in cfg.data.data:
        name = item.rsplit("@", 1)[0] if "@" in item and not os.path.exists(item) else item
        if name.startswith("hf:"):
            return None
        try:
            from memfit.data import corpora
            if name in corpora.CORPORA:
                root = corpora.corpus_dir(name)
                files = corpora.shakespeare_files() if name == "shakespeare" else \
                    [corpora.kjv_path()] if name == "kjv" else list(Path(root).rglob("*.txt"))
                total += sum(f.stat().st_size for f in files)
                continue
        except Exception:
            if name in ("shakespeare", "kjv", "bbc"):
                total += {"shakespeare": 5_100_000, "kjv": 4_100_000, "bbc": 5_100_000}[name]
                continue
        p = Path(name)
        paths = [p] if p.is_file() else list(p.rglob("*")) if p.is_dir() else [Path(x) for x in glob.glob(name)]
        files = [x for x in paths if x.is_file()]
        if not files:
            return None
        total += sum(f.stat().st_size for f in files)
    if cfg.data.subset_ratio:
        total = int(total * cfg.data.subset_ratio)
    return int(total * (1 - cfg.data.val_fraction)) if not cfg.data.val_data else total


def _session_seconds(cfg: Config) -> float | None:
    b = cfg.budget
    if b.time_limit:
        return float(b.time_limit)
    if b.deadline:
        import datetime as dt
        now = dt.datetime.now()
        try:
            when = dt.datetime.fromisoformat(b.deadline)
        except ValueError:
            try:
                hh, mm = (int(x) for x in b.deadline.split(":")[:2])
                when = now.replace(hour=hh, minute=mm, second=0, microsecond=0)
                if when < now:
                    when += dt.timedelta(days=1)
            except ValueError:
                return None
        return max(0.0, (when - now).total_seconds())
    return None


def plan_time(cfg: Config, spec: StepSpec, target: Target, an: Memory, tr, eff: int, world: int = 1) -> TimePlan:
    """`eff` is the global effective batch; each of the `world` processes runs eff / world rows of it on its
    own device (DDP: the devices run in parallel; gradient all-reduce time is not priced)."""
    prof = target.profile
    flops_micro = (tr.flops_per_micro_step if tr is not None and tr.flops_per_micro_step else an.flops_per_micro_step)
    # the last micro-batch may be smaller: FLOPs scale with the rows actually run
    flops = flops_micro * (eff / world) / spec.micro_batch
    m = dims_of(spec.model_config, spec.arch)
    secs = step_seconds(flops / spec.micro_steps, spec, prof, m.d, an.optimizer, an.weights)
    floor = launch_seconds(spec, prof, m.L)
    launch_bound = floor > secs
    secs = max(secs, floor)       # launches overlap the kernels they start: the slower of the two
    tokens_step = eff * spec.seq_len
    tps = tokens_step / secs if secs > 0 else float("inf")
    epoch_tokens = epoch_examples = epoch_rows = None
    if cfg.task == "pretrain":       # packed blocks: tokens given, else estimated from the bytes
        data_bytes = None if cfg.data.epoch_tokens else _data_bytes(cfg)
        epoch_tokens = cfg.data.epoch_tokens or (int(data_bytes / _bytes_per_token(cfg)) if data_bytes else None)
        per_epoch = epoch_tokens / tokens_step if epoch_tokens else None
    else:
        from memfit.plan.epoch import packed_epoch, training_examples
        layout = packed_epoch(cfg, spec.seq_len, eff) if spec.packed else None
        if layout:                   # packed examples: the run's own first-fit layout of epoch 0
            per_epoch, epoch_examples, epoch_rows = layout.steps, layout.examples, layout.rows
        else:                        # padded examples / effective batch (packed: never more steps than that)
            epoch_examples = training_examples(cfg)
            per_epoch = epoch_examples / eff if epoch_examples else None
    # Whole steps, as the run takes them: the epoch's time is its steps' time (the two lines agree).
    epoch_steps = math.ceil(per_epoch) if per_epoch else None
    epoch_secs = epoch_steps * secs if epoch_steps else None
    from memfit.run_length import job_steps     # the run's own rule and default cap (jobs/common.run_length)
    try:
        total_steps = job_steps(cfg, per_epoch or None)[0]
    except ValueError:                           # no epoch length and no --max-steps: unknown
        total_steps = None
    total_secs = total_steps * secs if total_steps else None
    session = _session_seconds(cfg)
    fits_session = None
    if session is not None and total_secs is not None:
        fits_session = total_secs <= session * (1 - SESSION_RESERVE_FRACTION)
    how = (f"{flops / 1e12:.2f} TFLOP/step ({'torch flop_counter formulas on the trace' if tr is not None else '6N+attention'})"
           f" / ({prof.tflops(spec.precision):g} TFLOP/s {spec.precision} x efficiency)"
           + (f"; launch-bound: ~{floor / LAUNCH_SECONDS:,.0f} kernel launches x 10 us" if launch_bound else ""))
    return TimePlan(flops, secs, tps, tokens_step, epoch_tokens, epoch_secs, total_steps, total_secs, session,
                    fits_session, how, epoch_examples, epoch_steps, epoch_rows)
