"""How many optimizer steps a run takes, and which limit decided it (`--epochs`, `--max-steps`, or the
quick default job). One rule for every job kind, so the plan and the runs agree:

    both given      -> whichever comes first (the log names it)
    --max-steps     -> that many steps
    --epochs        -> epochs x steps per epoch
    neither         -> one epoch, capped at `default_cap` steps when there is one (the quick default job)

job_steps(cfg, steps_per_epoch) applies the rule to a job's config with its kind's default cap
(DEFAULT_CAPS): the plan (plan/timing.py) and the run (jobs/common.run_length) both call it, so the plan
block's "job N steps" is the run's length.
"""

from __future__ import annotations

import math

# The no-argument pretraining job: ~0.6 epoch of Shakespeare, a few minutes on 2 CPU cores.
DEFAULT_CAPS = {"pretrain": 200}


def total_steps(epochs: float | None, max_steps: int | None, steps_per_epoch: float | None,
                default_cap: int | None = None) -> tuple[int, str]:
    """(steps, why): `why` is one line saying which limit ends training. steps_per_epoch None: the
    epoch's length is unknown (data without a length) or not worth measuring (--max-steps alone)."""
    if steps_per_epoch is None:
        if max_steps is None:
            raise ValueError("the length of an epoch is unknown: give --max-steps")
        return max_steps, f"--max-steps {max_steps}"
    epoch_steps = max(1, math.ceil((epochs or 1.0) * steps_per_epoch))
    ep = f"--epochs {epochs:g}" if epochs is not None else "one epoch"
    if max_steps is not None and epochs is not None:
        if max_steps < epoch_steps:
            return max_steps, f"--max-steps {max_steps} comes before the end of {ep} ({epoch_steps} steps)"
        return epoch_steps, f"{ep} ends at step {epoch_steps}, before --max-steps {max_steps}"
    if max_steps is not None:
        return max_steps, f"--max-steps {max_steps}"
    if epochs is None and default_cap is not None and epoch_steps > default_cap:
        return default_cap, (f"no --epochs/--max-steps given: training {default_cap} of the {epoch_steps} "
                             f"steps of one epoch (pass --epochs 1 for the whole epoch)")
    return epoch_steps, f"{ep} = {epoch_steps} steps"


def job_steps(cfg, steps_per_epoch: float | None) -> tuple[int, str]:
    """(steps, why) of the job `cfg` describes: total_steps with its --epochs/--max-steps and the default
    cap of its kind (cfg.task)."""
    t = cfg.train
    return total_steps(t.epochs, t.max_steps, steps_per_epoch, DEFAULT_CAPS.get(cfg.task))


def with_epoch_cadence(cfg, steps_per_epoch: float):
    """The config with --eval-strategy/--save-strategy epoch turned into --eval-every/--save-every of one
    epoch's steps (rounded up, as total_steps counts an epoch), so the loop and the Checkpointer keep
    their one "every N steps" rule and evaluate/save at exactly the epoch-end steps."""
    per = max(1, math.ceil(steps_per_epoch - 1e-9))
    changes: dict = {}
    if cfg.train.eval_strategy == "epoch":
        changes["train"] = {"eval_every": per}
    if cfg.checkpoint.save_strategy == "epoch":
        changes["checkpoint"] = {"save_every": per}
    return cfg.replace(**changes) if changes else cfg
