"""memfit plan: know before you run — memory, time and disk against a named budget, and the knobs that fit.

    make_plan(cfg, engine="trace") -> Plan         pure: fake tensors + formulas, nothing allocated
    render_plan(plan) -> str; plan_to_json(plan) -> dict
    plan_main(cfg, fit, as_json, task=None) -> int  the `memfit plan` command (3: does not fit at micro-batch 1)
    auto_fit(cfg) -> (Config, [one line per knob])   raises DoesNotFit (exit 3) when nothing fits
    MemoryMonitor(device)                            RSS, available RAM, CUDA allocated/reserved, NVML

Modules: spec (Config -> what is planned), dims (the model's shape), analytic (memory formulas), timing
(step, epoch and session time), trace (fake-tensor trace: tracemodes, tracemodel, standins), allocator
(CUDA caching-allocator replay), core (assembling a Plan), epoch (examples per epoch), fit (auto-fit),
advice (what would help when nothing fits), report, monitor. The pre-flight (1-2 real steps) is
training's (memfit.train.preflight): plan/ and train/ never import each other, jobs/ wires them.
Importing this package imports no torch; the functions do when called.
"""

from __future__ import annotations

import json
import sys

EXIT_OK, EXIT_BAD_INPUT, EXIT_NO_FIT = 0, 2, 3


def make_plan(cfg, *, engine: str = "trace", task: str | None = None):
    from memfit.plan.core import make_plan as _make
    return _make(cfg, engine=engine, task=task)


def render_plan(plan) -> str:
    from memfit.plan.report import render_plan as _r
    return _r(plan)


def plan_to_json(plan) -> dict:
    from memfit.plan.report import plan_to_json as _j
    return _j(plan)


def auto_fit(cfg, **kw):
    from memfit.plan.fit import auto_fit as _fit
    return _fit(cfg, **kw)


def MemoryMonitor(device=None):
    from memfit.plan.monitor import MemoryMonitor as _M
    return _M(device)


def plan_main(cfg, fit: bool = False, as_json: bool = False, task: str | None = None,
              engine: str = "trace") -> int:
    """`memfit plan`: print the plan (table or JSON). Exit 0 when it fits, 3 when it does not fit
    even at micro-batch 1 (with --fit: even with checkpointing and an 8-bit optimizer), 2 on bad input."""
    from memfit.config import ConfigError, validate
    from memfit.plan.core import apply_task
    from memfit.plan.spec import PlanInputError

    try:
        cfg = apply_task(cfg, task)
    except ValueError as e:
        raise ConfigError([str(e)]) from None
    problems = validate(cfg)
    if problems:
        raise ConfigError(problems)
    try:
        if fit:
            from memfit.plan.fit import DoesNotFit, auto_fit_plan
            try:
                _, _, plan = auto_fit_plan(cfg, engine=engine)
            except DoesNotFit as e:
                if as_json:
                    out = plan_to_json(e.plan) if e.plan is not None else {"fits": False}
                    out["fits"] = False
                    out["auto_fit"] = e.lines
                    print(json.dumps(out, indent=1))
                else:
                    if e.plan is not None:
                        e.plan.fit_lines = e.lines
                        print(render_plan(e.plan))
                    print(f"memfit: does not fit: {e}", file=sys.stderr)
                return EXIT_NO_FIT
        else:
            plan = make_plan(cfg, engine=engine)
    except PlanInputError as e:
        raise ConfigError([str(e)]) from None
    suggestion = None
    if not plan.fits:
        # Not at these settings: name the ones that fit (auto-fit's choice). Exit 3 (the DESIGN contract)
        # only when nothing fits, not even micro-batch 1 with checkpointing and an 8-bit optimizer.
        from memfit.plan.fit import DoesNotFit, auto_fit_plan
        try:
            fitted_cfg, lines, fitted = auto_fit_plan(cfg, engine=engine)
            suggestion = {"flags": fit_flags(fitted_cfg), "auto_fit": lines,
                          "nvidia_smi_bytes": fitted.memory.nvidia_smi, "budget_bytes": fitted.memory.budget}
        except DoesNotFit as e:
            suggestion = {"error": str(e)}
    if as_json:
        out = plan_to_json(plan)
        if suggestion is not None:
            out["fits_with"] = suggestion
        print(json.dumps(out, indent=1))
    else:
        print(render_plan(plan))
        if suggestion is not None and "flags" in suggestion:
            from memfit.plan.core import _fmt
            print(f"\n  does not fit at these settings; these do ({_fmt(suggestion['nvidia_smi_bytes'])} of "
                  f"{_fmt(suggestion['budget_bytes'])}, auto-fit's choice):\n    {suggestion['flags']}")
            print("\n".join(f"    - {x}" for x in suggestion["auto_fit"]))
    if suggestion is not None and "error" in suggestion:
        print(f"memfit: does not fit: {suggestion['error']}", file=sys.stderr)
        return EXIT_NO_FIT
    return EXIT_OK


def fit_flags(cfg) -> str:
    """The flags that give a fitted config's knobs (micro-batch, accumulation, precision, checkpointing,
    optimizer), to paste into the train/finetune command."""
    t = cfg.train
    flags = [f"--batch-size {t.batch_size}"]
    flags.append(f"--effective-batch {t.effective_batch}" if t.effective_batch
                 else f"--gradient-accumulation-steps {t.gradient_accumulation_steps}")
    flags.append(f"--precision {t.precision}")
    if t.gradient_checkpointing:
        flags.append("--gradient-checkpointing")
    flags.append(f"--optimizer {cfg.optim.optimizer}")
    return " ".join(flags)


__all__ = ["MemoryMonitor", "auto_fit", "make_plan", "plan_main", "plan_to_json", "render_plan"]
