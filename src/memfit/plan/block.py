"""The compact plan block every run prints before its model loads (issue 12): fits or not with the
headroom, the peak memory, time per step / epoch / job, the sessions the job needs under --time-limit,
and how many checkpoints fit the disk budget. A handful of lines; `memfit plan` prints the full table.

The session arithmetic keeps the planner's own reserve (SESSION_RESERVE_FRACTION of each session for
the final save, evaluation and export), so "fits one session" here agrees with the plan's fits_session.
"""

from __future__ import annotations

import math

from memfit.plan.core import Plan, _fmt
from memfit.plan.report import _dur, _procs
from memfit.plan.timing import SESSION_RESERVE_FRACTION


def steps_per_session(step_seconds: float, session_seconds: float) -> int:
    """Whole optimizer steps one session holds, after the reserve for the final save/eval/export."""
    if step_seconds <= 0:
        return 10 ** 12
    return int(session_seconds * (1 - SESSION_RESERVE_FRACTION) // step_seconds)


def sessions_needed(total_steps: int, step_seconds: float, session_seconds: float,
                    start_step: int = 0) -> tuple[int | None, int]:
    """(sessions still needed from start_step, the step this session reaches). None sessions when not
    even one step fits a session."""
    per = steps_per_session(step_seconds, session_seconds)
    left = max(0, total_steps - start_step)
    if per < 1:
        return None, start_step
    return max(1, math.ceil(left / per)), min(total_steps, start_step + per)


def session_line(plan: Plan, start_step: int, step_seconds: float | None = None,
                 total_steps: int | None = None, label: str = "sessions") -> str | None:
    """The sessions line: by the plan's step time, or (after a run's calibration) by the measured one,
    for the run's own total_steps when it knows them. None without a --time-limit / --deadline."""
    t = plan.time
    total = total_steps or t.total_steps
    step_s = step_seconds or t.step_seconds
    if t.session_seconds is None or not total:
        return None
    n, reaches = sessions_needed(total, step_s, t.session_seconds, start_step)
    session = _dur(t.session_seconds)
    if n is None:
        return (f"  {label}: one step (~{_dur(step_s)}) does not fit a session of {session} "
                "with its reserve for the final save")
    if n == 1:
        return f"  {label}: the job fits this session of {session} (step {total:,} of {total:,})"
    return (f"  {label}: needs ~{n} sessions of {session}; this one reaches step {reaches:,} of "
            f"{total:,}, then stops resumably")


def _attention(plan: Plan) -> str:
    """'; eager attention' when the model does not run SDPA (its T x T probabilities are in the peak)."""
    name = getattr(plan.cfg.model, "attn_implementation", "sdpa")
    return "" if name == "sdpa" else f"; {name} attention"


def plan_block(plan: Plan, start_step: int = 0) -> str:
    """The block (6-8 lines) for one plan; start_step: where a resumed run continues from."""
    p, m, t, d = plan, plan.memory, plan.time, plan.disk
    prof = p.target.profile
    k = p.knobs
    verdict = "FITS" if m.fits else "DOES NOT FIT"
    lines = [f"plan ({prof.description or prof.name}, {p.target.source}; {p.engine}): {verdict} — "
             f"{_fmt(m.nvidia_smi)} of {_fmt(m.budget)}, "
             f"{'headroom' if m.fits else 'short by'} {_fmt(abs(m.headroom))}"]
    if prof.device_type == "cuda":
        lines.append(f"  peak: allocated {_fmt(m.peak_allocated)}, reserved {_fmt(m.peak_reserved)}, "
                     f"nvidia-smi {_fmt(m.nvidia_smi)} (CUDA context {_fmt(m.cuda_context)}); in the {m.peak_phase}")
    else:
        lines.append(f"  peak: {_fmt(m.peak_tensor_bytes)} live tensor bytes, process ~{_fmt(m.nvidia_smi)} "
                     f"with the runtime; in the {m.peak_phase}")
    lines.append(f"  knobs: micro-batch {k.micro_batch} x {k.accumulation} accumulation{_procs(p)} = effective "
                 f"{p.effective_batch}; {k.precision}; checkpointing {'on' if k.gradient_checkpointing else 'off'}; "
                 f"{k.optimizer}" + _attention(p))
    when = [f"{_dur(t.step_seconds)}/step"]
    if t.epoch_steps:
        when.append(f"epoch {t.epoch_steps:,} steps ≈ {_dur(t.epoch_seconds)}")
    if t.total_steps:
        when.append(f"job {t.total_steps:,} steps ≈ {_dur(t.total_seconds)}")
    lines.append("  time: " + "; ".join(when) + " (estimate)")
    session = session_line(plan, start_step)
    if session:
        lines.append(session)
    disk = f"  disk: checkpoint {_fmt(d.checkpoint_full)} (light {_fmt(d.checkpoint_light)})"
    if d.budget:
        where = "--disk-budget" if p.cfg.budget.disk_budget else "the free disk"
        disk += (f"; {d.checkpoints_fit:,} fit {where} {_fmt(d.budget)} besides final + best; keep-last "
                 f"{p.cfg.checkpoint.keep_last} needs {_fmt(d.policy_bytes)}: {'fits' if d.fits else 'DOES NOT FIT'}")
    lines.append(disk)
    return "\n".join(lines)


__all__ = ["plan_block", "session_line", "sessions_needed", "steps_per_session"]
