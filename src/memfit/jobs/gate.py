"""Every run plans first (issue 12): the plan gates, and with --auto-fit chooses, the run's knobs.

plan_gate(cfg, run_dir) runs after the checks (exit 2) and BEFORE the run directory is written or the
model is built:
  - the plan for the device the run uses (or the --gpu profile), printed as the compact block;
  - does not fit at the user's settings: with --auto-fit the fitted config is taken (one line per
    choice; the run start then writes it to config.yaml), without it auto-fit's flags are printed and the
    run goes on at the user's settings (OOM recovery shrinks the micro-batch);
  - nothing fits even at micro-batch 1 with every allowed knob: DoesNotFit (exit 3), nothing written.
  - a resume keeps the checkpointed run's choices: with --auto-fit its saved knobs are taken back (the
    optimizer state and micro-batch of the checkpoint belong to them) and nothing is re-fitted.
write_plan(run_dir, plan) then writes plan.json: the same dict `memfit plan --json` prints for the same
flags (`--auto-fit` there plans like `--fit`).
"""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path

from memfit import config as C
from memfit import runfiles

log = logging.getLogger("memfit")
KNOBS = (("train", ("batch_size", "gradient_accumulation_steps", "effective_batch", "precision",
                    "gradient_checkpointing")), ("optim", ("optimizer",)))


def _resumed(cfg: C.Config, run_dir: Path) -> tuple[int, C.Config | None] | None:
    """(the checkpoint's step, its run's saved config) when this run continues a checkpoint, else None."""
    from memfit.jobs.resumecheck import resumed_checkpoint
    r = cfg.checkpoint.resume
    if not r or r.startswith("weights:"):    # weights: a new run from step 0
        return None
    ckpt, cfg_file = resumed_checkpoint(cfg, run_dir)
    if ckpt is None:
        return None
    try:
        step = int(ckpt.name.split("-", 1)[1])
    except (IndexError, ValueError):
        step = 0
    try:
        saved = C.load_yaml(cfg_file) if cfg_file is not None and cfg_file.exists() else None
    except (C.ConfigError, OSError, ValueError):
        saved = None
    return step, saved


def _saved_knobs(cfg: C.Config, saved: C.Config) -> C.Config:
    return cfg.replace(**{g: {f: getattr(getattr(saved, g), f) for f in fields} for g, fields in KNOBS})


def _over_budget(e) -> str:
    from memfit.plan.core import _fmt
    from memfit.plan.fit import SAFETY_MARGIN
    if e.plan is None:
        return str(e)
    need, budget = e.plan.memory.nvidia_smi, e.plan.memory.budget
    usable = int(budget * (1 - SAFETY_MARGIN))
    return (f"smallest is {_fmt(need - usable)} over budget ({_fmt(need)} at micro-batch 1 with every allowed "
            f"knob against {_fmt(usable)} usable of {_fmt(budget)}): {e}")


def gate_text(plan, start_step: int = 0, resumed: bool = False) -> str:
    """The block, then auto-fit's choices (taken) or its suggestion (offered): printed, and in memfit.log."""
    from memfit.plan.block import plan_block
    from memfit.plan.core import _fmt
    text = plan_block(plan, start_step)
    if resumed:
        return text + f"\n  resume: from step {start_step:,} with the checkpointed run's knobs"
    if plan.fit_lines:
        return text + "\n  auto-fit (--auto-fit; recorded in config.yaml):\n" + "\n".join(f"    - {x}" for x in plan.fit_lines)
    s = getattr(plan, "suggestion", None)
    if s is not None:
        text += (f"\n  does not fit at these settings; these do ({_fmt(s['nvidia_smi_bytes'])} of "
                 f"{_fmt(s['budget_bytes'])}, auto-fit's choice):\n    {s['flags']}\n  add --auto-fit to take them; "
                 "going on at these settings (OOM recovery shrinks the micro-batch)")
    return text


def plan_gate(cfg: C.Config, run_dir: Path, out=None):
    """(the config the run trains with, its Plan or None when the planner cannot plan this job).
    The text goes to `out` (stdout) unless --quiet; a job that does not fit prints it even then."""
    from memfit.plan import fit_flags, make_plan
    from memfit.plan.fit import DoesNotFit, auto_fit_plan
    out = out or sys.stdout
    show = (lambda text: None) if cfg.run.quiet else (lambda text: print(text, file=out, flush=True))
    resumed = _resumed(cfg, run_dir)
    auto = cfg.budget.auto_fit
    if resumed is not None and auto and resumed[1] is not None:
        cfg = _saved_knobs(cfg, resumed[1])     # the checkpoint's choices win: no re-fit on resume
        auto = False
    try:
        plan = make_plan(cfg)
    except Exception as e:  # noqa: BLE001 - a job the planner cannot shape still trains without --auto-fit
        why = f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
        if auto:
            raise C.ConfigError([f"--auto-fit: memfit cannot plan this job ({why}); give the micro-batch "
                                 "and the other knobs yourself"]) from None
        print(f"memfit: no plan ({why}); training at the given settings", file=sys.stderr)
        return cfg, None
    if resumed is not None:
        show(gate_text(plan, resumed[0], resumed=True))
        return cfg, plan
    if not auto and plan.fits:
        show(gate_text(plan))
        return cfg, plan
    try:
        fitted_cfg, lines, fitted = auto_fit_plan(cfg)
    except DoesNotFit as e:
        print(gate_text(plan), file=out, flush=True)
        raise DoesNotFit(_over_budget(e), e.lines, e.plan) from None
    if auto:
        if fitted_cfg.optim.optimizer != "adamw":
            from memfit.models.optim import eight_bit_available
            why = eight_bit_available()
            if why:
                raise DoesNotFit(f"micro-batch 1 fits only with --optimizer {fitted_cfg.optim.optimizer}, which "
                                 f"is unavailable here ({why})", lines, fitted)
        show(gate_text(fitted))
        return fitted_cfg, fitted
    # Not at these settings: auto-fit's choice is offered and the run goes on as asked (as `memfit plan`).
    plan.suggestion = {"flags": fit_flags(fitted_cfg), "auto_fit": lines,
                       "nvidia_smi_bytes": fitted.memory.nvidia_smi, "budget_bytes": fitted.memory.budget}
    show(gate_text(plan))
    return cfg, plan


def plan_json(plan) -> dict:
    """What plan.json holds: `memfit plan --json`'s dict for the same flags."""
    from memfit.plan import plan_to_json
    out = plan_to_json(plan)
    suggestion = getattr(plan, "suggestion", None)
    if suggestion is not None:
        out["fits_with"] = suggestion
    measured = getattr(plan, "preflight", None)     # set by jobs/preflight.py once its steps ran
    if measured is not None:
        out["preflight"] = measured
    return out


def write_plan(run_dir: Path, plan) -> None:
    """plan.json in the run directory (recorded, so --overwrite knows memfit wrote it), and the block in
    memfit.log. Nothing when the job could not be planned."""
    if plan is None:
        return
    update_plan(run_dir, plan)
    log.info(gate_text(plan), extra={"file_only": True})


def update_plan(run_dir: Path, plan) -> None:
    """(Re)write plan.json atomically: at the run start, and again with what the pre-flight measured."""
    runfiles.record(run_dir, "plan.json")
    tmp = run_dir / "plan.json.tmp"
    tmp.write_text(json.dumps(plan_json(plan), indent=1))
    os.replace(tmp, run_dir / "plan.json")


__all__ = ["gate_text", "plan_gate", "plan_json", "update_plan", "write_plan"]
