"""The run start's pre-flight (--preflight {auto,on,off}): memfit.train.preflight's 1-2 real steps on a
synthetic batch, run once the Job is assembled (model on its device, precision, checkpointing and LoRA
applied, the real optimizer built) and before train() reads the first batch.

auto is on for a GPU, where the plan models an allocator and a CUDA context it cannot see, and off for
the CPU, where the plan's trace counts the real model's live tensor bytes exactly. A resumed run skips
it: the checkpointed micro-batch already ran, and the OOM controller takes it back from the checkpoint.
The steps read no data and leave every RNG as it was (train.preflight saves and restores them), so a run
with and without them trains bit-identically. What they measured goes into plan.json ("preflight"); a
measured peak over the budget shrinks the micro-batch (the effective batch is kept: accumulation grows).
"""

from __future__ import annotations

import logging
from typing import Any

from memfit.train.job import Job

log = logging.getLogger("memfit")


def wanted(job: Job) -> bool:
    mode = job.cfg.budget.preflight
    return mode == "on" or (mode == "auto" and job.device.type == "cuda")


def _resuming(job: Job) -> bool:
    r = job.cfg.checkpoint.resume
    if not r or r.startswith("weights:") or job.run_dir is None:
        return False
    from memfit.jobs.resumecheck import resumed_checkpoint
    return resumed_checkpoint(job.cfg, job.run_dir)[0] is not None


def run_preflight(job: Job, plan) -> dict[str, Any] | None:
    """Run the pre-flight when asked for; returns what it measured (None when it did not run). Also
    hands the plan's peak and step time to the run's calibration (train/calibrate.py)."""
    from memfit.train.calibrate import Calibration
    job.calibration = Calibration.for_plan(plan, job.device)
    if plan is not None:        # at calibration: the sessions the job needs at the measured pace
        from memfit.plan.block import session_line
        job.calibration.sessions = lambda step_s, start: session_line(
            plan, start, step_s, job.total_steps, label=f"sessions at the measured {step_s:.4g}s/step")
    if not wanted(job) or _resuming(job) or job.world.distributed:   # (N ranks: the agreed OOM recovery)
        return None
    from memfit.train.preflight import preflight
    budget = plan.memory.budget if plan is not None else None
    res = preflight(job.model, job.cfg, job.device, plan=plan, micro_batch=job.oom.micro_batch_size,
                    loss_fn=job.loss_fn, budget_bytes=budget)
    for line in res["lines"]:
        log.info(line)
    mb = res["micro_batch"]
    if res["ok"] and mb < job.oom.micro_batch_size:
        log.warning(f"pre-flight: training starts at micro-batch {mb} (was {job.oom.micro_batch_size}); "
                    "the effective batch is kept")
        for ctl in (job.oom, job.eval_oom):   # the new ceiling too: regrowth would run out again
            ctl.micro_batch_size = ctl.initial = min(ctl.micro_batch_size, mb)
    measured = {k: res[k] for k in ("ok", "micro_batch", "shrunk", "measured_peak_bytes", "measured_reserved_bytes",
                                    "predicted_peak_bytes", "error_pct", "seconds_per_step", "tokens_per_second")}
    if plan is not None and job.run_dir is not None:
        from memfit.jobs.gate import update_plan
        plan.preflight = measured
        update_plan(job.run_dir, plan)
    return measured


__all__ = ["run_preflight", "wanted"]
