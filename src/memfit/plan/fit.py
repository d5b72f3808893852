"""Auto-fit: choose the knobs that fit the budget, in the issue's order of preference:

  1. precision   -- the device's native choice (bf16 on Ampere+/AMX CPUs, fp16 + GradScaler before)
                    unless --precision names one;
  2. micro-batch -- the largest that fits with a safety margin, at most the effective batch;
  3. accumulation-- ceil(effective / micro) micro-steps, so --effective-batch is unchanged (the
                    micro-batch is then evened out: 32 rows at most 11 fit -> 3 x 11/11/10, not 11/11/10
                    ... it is ceil(32/3) = 11 with the same three steps but less memory);
  4. gradient checkpointing -- only if micro-batch 1 does not fit without it;
  5. 8-bit optimizer        -- only if micro-batch 1 does not fit even with checkpointing.
Each choice is explained in one line. When nothing fits, DoesNotFit (exit 3) says what would.

Memory is affine in the micro-batch for a fixed sequence length (activations, logits and their
temporaries are per row; weights, gradients and optimizer state are not), so two traces (micro-batch
1 and 2) give the slope, the candidate is solved for, and a third trace at the candidate confirms it
(stepping down if the allocator's rounding makes it miss).
"""

from __future__ import annotations

import math

from memfit.config import Config
from memfit.device import DoesNotFit as NothingFits
from memfit.plan.core import GiB, Plan, _fmt, apply_task, build_plan, replace_knobs
from memfit.plan.spec import Knobs, effective_batch, resolve_model, resolve_precision, resolve_target, world_size

SAFETY_MARGIN = 0.05       # of device memory, on top of the plan's own context/allocator terms


class DoesNotFit(NothingFits):
    """Not even micro-batch 1 fits with checkpointing and an 8-bit optimizer (exit code 3); carries the
    auto-fit lines and the last plan tried."""

    def __init__(self, message: str, lines: list[str], plan: Plan | None = None):
        super().__init__(message)
        self.lines = lines
        self.plan = plan


def _usable(plan: Plan, margin: float) -> int:
    return int(plan.memory.budget - margin * plan.memory.budget)


def _largest_micro_batch(cfg: Config, base: Knobs, eff: int, margin: float, engine: str, target, info,
                         cache: dict) -> tuple[int, Plan]:
    """(largest fitting micro-batch or 0, the plan at it / at 1)."""

    def plan_at(mb: int) -> Plan:
        acc = math.ceil(eff / mb)
        k = Knobs(mb, acc, base.precision, base.gradient_checkpointing, base.optimizer)
        key = (k, engine)
        if key not in cache:
            cache[key] = build_plan(cfg, k, engine, target, info)
        return cache[key]

    p1 = plan_at(1)
    limit = _usable(p1, margin)
    if p1.memory.nvidia_smi > limit:
        return 0, p1
    if eff == 1:
        return 1, p1
    p2 = plan_at(2)
    if p2.memory.nvidia_smi > limit:
        return 1, p1
    slope = max(1, p2.memory.nvidia_smi - p1.memory.nvidia_smi)
    guess = 2 + int((limit - p2.memory.nvidia_smi) // slope)
    guess = max(2, min(eff, guess))
    # even out: the smallest micro-batch with the same number of micro-steps
    guess = math.ceil(eff / math.ceil(eff / guess))
    best, best_plan = 2, p2
    tried = 0
    while guess > 2 and tried < 6:
        p = plan_at(guess)
        tried += 1
        if p.memory.nvidia_smi <= limit:
            best, best_plan = guess, p
            break
        over = p.memory.nvidia_smi - limit
        step = max(1, math.ceil(over / slope))
        guess = max(2, guess - step)
        guess = math.ceil(eff / math.ceil(eff / guess))
    return best, best_plan


def auto_fit_plan(cfg: Config, *, engine: str = "trace", margin: float = SAFETY_MARGIN,
                  task: str | None = None) -> tuple[Config, list[str], Plan]:
    """(fitted config, one explanation line per knob, the plan at the fitted knobs)."""
    from memfit.hardware import with_platform
    cfg = with_platform(apply_task(cfg, task))
    target = resolve_target(cfg)
    info = resolve_model(cfg)
    prof = target.profile
    eff = -(-effective_batch(cfg) // world_size())     # this device's rows of each step (global / processes)
    lines: list[str] = []

    precision = resolve_precision(cfg.train.precision, prof)
    if cfg.train.precision == "auto":
        why = ("native bf16" if precision == "bf16" else
               "no native bf16: fp16 with GradScaler" if precision == "fp16" else "no native bf16 on this CPU")
        lines.append(f"precision {precision}: {prof.description or prof.name} has {why} (auto)")
    else:
        lines.append(f"precision {precision}: as requested (--precision {precision})")

    user_gc, user_opt = cfg.train.gradient_checkpointing, cfg.optim.optimizer
    candidates = [(user_gc, user_opt)]
    if not user_gc:
        candidates.append((True, user_opt))
    if user_opt == "adamw":
        candidates.append((True, "adamw8bit"))
    cache: dict = {}
    chosen = None
    last = None            # micro-batch 1 of the last (most frugal) candidate tried
    for gc, opt in candidates:
        base = Knobs(1, eff, precision, gc, opt)
        mb, plan = _largest_micro_batch(cfg, base, eff, margin, engine, target, info, cache)
        last = plan
        if mb >= 1:
            chosen = (gc, opt, mb, plan)
            break

    budget = target.memory_bytes
    if chosen is None:
        need = last.memory.nvidia_smi
        advice = _advice(cfg, last)
        msg = (f"even micro-batch 1 with gradient checkpointing and an 8-bit optimizer needs {_fmt(need)} "
               f"against {_fmt(budget)} ({_fmt(budget * (1 - margin))} usable with the {margin:.0%} margin). "
               f"{advice}")
        lines.append("does not fit: " + msg)
        raise DoesNotFit(msg, lines, last)

    gc, opt, mb, plan = chosen
    acc = math.ceil(eff / mb)
    usable = _fmt(budget * (1 - margin))
    nxt = mb + 1
    if mb < eff:
        nxt_plan = cache.get((Knobs(nxt, math.ceil(eff / nxt), precision, gc, opt), engine))
        more = f"; {nxt} would need {_fmt(nxt_plan.memory.nvidia_smi)}" if nxt_plan else ""
        lines.append(f"micro-batch {mb}: the largest that fits {usable} ({_fmt(budget)} less a {margin:.0%} "
                     f"margin), using {_fmt(plan.memory.nvidia_smi)}{more}")
    else:
        lines.append(f"micro-batch {mb}: the whole effective batch fits ({_fmt(plan.memory.nvidia_smi)} of {usable})")
    sizes = [mb] * (eff // mb) + ([eff % mb] if eff % mb else [])
    split = "+".join(str(s) for s in sizes) if len(sizes) <= 8 else f"{len(sizes)} x ~{mb}"
    lines.append(f"gradient accumulation {acc}: keeps the effective batch at {eff} rows ({split})")
    if gc and not user_gc:
        no_gc = cache.get((Knobs(1, eff, precision, False, user_opt), engine))
        need = f" ({_fmt(no_gc.memory.nvidia_smi)} without it)" if no_gc else ""
        lines.append(f"gradient checkpointing on: micro-batch 1 does not fit without it{need}; costs ~1/3 more compute")
    elif gc:
        lines.append("gradient checkpointing on: as requested")
    else:
        lines.append("gradient checkpointing off: not needed (it would cost ~1/3 more compute)")
    if opt != user_opt:
        lines.append(f"optimizer {opt}: 8-bit state ({_fmt(plan.analytic.optimizer)}) instead of fp32 "
                     f"AdamW's {_fmt(8 * plan.analytic.trainable_params)}; needed to fit micro-batch 1")
    else:
        lines.append(f"optimizer {opt}: fits as configured")
    fitted = replace_knobs(cfg, Knobs(mb, acc, precision, gc, opt))
    plan.cfg = fitted
    plan.fit_lines = lines
    return fitted, lines, plan


def auto_fit(cfg: Config, **kw) -> tuple[Config, list[str]]:
    """The knobs that fit, and one explanation line per knob. Raises DoesNotFit (exit 3)."""
    fitted, lines, _ = auto_fit_plan(cfg, **kw)
    return fitted, lines


def _advice(cfg: Config, plan: Plan) -> str:
    tips = []
    if plan.spec.seq_len > 256:
        tips.append(f"a shorter --seq-len (now {plan.spec.seq_len})")
    if cfg.task in ("finetune", "classify") and not (cfg.lora.lora or cfg.lora.qlora):
        tips.append("--lora or --qlora")
    elif cfg.lora.lora and not cfg.lora.qlora:
        tips.append("--qlora (4-bit base)")
    if cfg.task == "pretrain":
        tips.append("a smaller --target-params")
    tips.append("a bigger GPU")
    return "What would help: " + ", ".join(tips) + "."


__all__ = ["SAFETY_MARGIN", "DoesNotFit", "GiB", "auto_fit", "auto_fit_plan"]
