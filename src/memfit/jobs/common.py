"""The run start every job kind shares, the job's assembly, and running it: the glue between a job kind
(jobs/pretrain.py, jobs/finetune.py, jobs/classify.py, memfit.api.fit) and THE loop.

Order matters and is the same for every job (each kind only fills in step 4):
  1. validate everything that can be checked without building a model; raise once (exit 2)   start_run
  2. the device, the plan gate (issue 12: exit 3 before anything is written; --auto-fit)    start_run
  3. the run directory, config.yaml written first, plan.json; logging; the seed              start_run
  4. the kind's tokenizer, data and model
  5. the run length (run_length: one rule), then precision, optimizer, schedule,
     OOM controllers, checkpointer, deadline; every resumable part registered                assemble_job
  6. train() under the signal handlers, the result recorded                                  run_job
"""

from __future__ import annotations

import logging
import math
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from memfit import config as C
from memfit.ckpt.state import RNGState, StateRegistry, ValueState, seed_everything
from memfit.device import DeviceInfo, DoesNotFit, detect
from memfit.jobs.rundir import check_run_dir, prepare_run_dir, run_dir_for
from memfit.metrics import History, quiet_libraries, setup_logging
from memfit.models.optim import build_optimizer, eight_bit_available, warmup_cosine
from memfit.plan.advice import planner_advice
from memfit.precision import resolve_precision
from memfit.run_length import job_steps, with_epoch_cadence
from memfit.train.finish import record_result
from memfit.train.job import Cadence, Job, TrainResult
from memfit.train.loop import train
from memfit.train.oom import OOMController, allocator_report

log = logging.getLogger("memfit")
# A job kind's own checks, beyond common_problems: (resolved config, run directory) -> problems.
KindProblems = Callable[[C.Config, Path], list[str]]


def common_problems(cfg: C.Config, run_dir: Path) -> list[str]:
    """Checks shared by every job kind: pure config checks, output dir, optimizer, resume path."""
    cfg = C.with_job_defaults(cfg)   # compared with a saved config.yaml, which holds resolved values
    problems = C.validate(cfg)
    problems += check_run_dir(cfg, run_dir)
    if cfg.optim.optimizer != "adamw":
        why = eight_bit_available()
        if why:
            problems.append(f"--optimizer {cfg.optim.optimizer} is unavailable: {why}; or use --optimizer adamw")
    from memfit.models.attention import attention_problem
    why = attention_problem(cfg.model.attn_implementation, cfg.train.precision)
    if why:
        problems.append(why)
    from memfit.metrics import report_to_problem
    if report_to_problem(cfg.run.report_to):
        problems.append(report_to_problem(cfg.run.report_to))
    r = cfg.checkpoint.resume
    if r and r.startswith("weights:"):
        from memfit.ckpt.salvage import weights_path_problem
        why = weights_path_problem(r)
        if why:
            problems.append(why)
    elif r and r != "auto" and not Path(r).exists():
        problems.append(f"--resume {r}: no such checkpoint (use 'auto' or a checkpoints/step-N path)")
    elif not problems:     # (a bad run directory or resume path is reported above, alone)
        from memfit.jobs.resumecheck import resume_problems
        problems += resume_problems(cfg, run_dir)
    return problems


def check(cfg: C.Config, kind_problems: KindProblems, run_dir: Path | None = None) -> list[str]:
    """Every problem with this job that can be found before building a model: the shared checks and
    the kind's, in one list (the CLI reports them together with the flags' problems)."""
    cfg = C.with_job_defaults(cfg)
    run_dir = run_dir or run_dir_for(cfg)
    return common_problems(cfg, run_dir) + kind_problems(cfg, run_dir)


def pretrained_problems(cfg: C.Config) -> list[str]:
    """The checks every job on a pretrained model shares (finetune, classify)."""
    from memfit.models.load import source_problems
    problems = source_problems(cfg.model.model)
    if cfg.data.max_seq_len is not None and cfg.data.max_seq_len < 2:
        problems.append(f"--max-seq-len must be >= 2 (got {cfg.data.max_seq_len})")
    return problems


@dataclass
class RunStart:
    """A started run: the config the job uses (job defaults and --auto-fit's choices resolved), where
    it writes, the device, the plan (None when not planned: the pre-flight and calibration use it)."""
    cfg: C.Config
    run_dir: Path
    device: DeviceInfo
    plan: Any = None


def start_run(cfg: C.Config, kind_problems: KindProblems, run_dir: Path | None = None,
              planned: bool = True) -> RunStart:
    """THE run start, the same for every job kind and memfit.fit: validate once (raise every problem
    together, exit 2, nothing written), the device, the plan gate (issue 12: exit 3 writes nothing;
    --auto-fit's choices; `planned` False for memfit.fit, whose module the planner cannot shape), then
    the run directory with config.yaml and plan.json, logging into it, and the seed (last: nothing
    before it draws random numbers)."""
    cfg = C.with_job_defaults(cfg)       # config.yaml records the values the job uses
    run_dir = run_dir or run_dir_for(cfg)
    problems = check(cfg, kind_problems, run_dir)
    if problems:
        raise C.ConfigError(problems)
    device = detect()
    from memfit.jobs import ranks
    world = ranks.join(device)     # under torchrun: rank 0 starts the run, the others follow (jobs/ranks.py)
    if world.distributed:
        return ranks.start_together(world, lambda: _start_here(cfg, run_dir, device, planned), device, run_dir,
                                    lambda c, d, dev: RunStart(c, d, dev, None))
    return _start_here(cfg, run_dir, device, planned)


def _start_here(cfg: C.Config, run_dir: Path, device: DeviceInfo, planned: bool) -> RunStart:
    plan = None
    if planned:
        from memfit.jobs.gate import plan_gate, write_plan
        cfg, plan = plan_gate(cfg, run_dir)      # before anything is written: exit 3 writes nothing
    prepare_run_dir(cfg, run_dir)                # (config.yaml records --auto-fit's choices)
    setup_logging(run_dir, cfg.run.quiet)
    quiet_libraries(cfg.run.verbose, cfg.run.quiet)   # memfit.fit too (the CLI did, before any import)
    if plan is not None:
        write_plan(run_dir, plan)
    log.info(f"run directory: {run_dir}")
    seed_everything(cfg.train.seed)
    return RunStart(cfg, run_dir, device, plan)


def run_length(cfg: C.Config, steps_per_epoch: float | Callable[[], float] | None) -> tuple[C.Config, int]:
    """THE run length of every job: (cfg with an epoch --eval/--save-strategy turned into steps, total
    optimizer steps) by memfit.run_length's rule, logged with the limit that decided it.

    steps_per_epoch: a number; a callable when measuring an epoch costs (pretraining estimates its
    corpus), called only when the rule or an epoch strategy needs it; None when the data has no length
    (then --max-steps decides: validation required it)."""
    t = cfg.train
    needed = t.max_steps is None or t.epochs is not None or "epoch" in (t.eval_strategy,
                                                                        cfg.checkpoint.save_strategy)
    per_epoch = steps_per_epoch
    if callable(per_epoch):
        per_epoch = per_epoch() if needed else None
    steps, why = job_steps(cfg, per_epoch)      # the plan's rule too (plan/timing.py)
    log.info(f"training stops at step {steps}: {why}")
    return (with_epoch_cadence(cfg, per_epoch) if per_epoch is not None else cfg), steps


def assemble_job(cfg: C.Config, model: torch.nn.Module, train_data, total_steps: int, device,
                 run_dir: Path | None, loss_fn=None, checkpoint: bool = True, model_state=None,
                 tokenizer=None) -> Job:
    """Everything but evaluate/sample/export (job-specific); also used by memfit.api.fit.
    model_state: what the registry saves as "model" instead of the whole model (LoRA: the adapter only);
    tokenizer: saved into every checkpoint and best/ (each then loads with stock from_pretrained)."""
    from memfit.models.loss import lm_loss
    cfg = C.with_job_defaults(cfg)
    precision, warnings = resolve_precision(cfg.train.precision, device)
    for w in warnings:
        log.warning(w)
    log.info(f"precision: {precision.name} ({precision.reason})")
    if cfg.train.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    model.to(device.torch_device)
    line, _ = allocator_report(device)   # read back from the allocator now that CUDA holds the model
    (log.info if device.type == "cuda" else log.debug)(line)
    opt = build_optimizer(model, cfg.optim.optimizer, cfg.optim.lr, cfg.optim.weight_decay,
                          (cfg.optim.beta1, cfg.optim.beta2), device.type)
    warmup = min(C.warmup_steps(cfg.optim, total_steps), max(total_steps - 1, 0))   # as warmup_cosine clamps
    sched = warmup_cosine(opt, warmup, total_steps, cfg.optim.min_lr_ratio)
    log.info(f"optimizer: {cfg.optim.optimizer} lr {cfg.optim.lr:g}, weight decay {cfg.optim.weight_decay:g}, "
             f"betas ({cfg.optim.beta1:g}, {cfg.optim.beta2:g}), warmup {warmup} of {total_steps} steps "
             f"({C.KIND_NAMES[C.job_kind(cfg)]} defaults unless given)")
    scaler = precision.make_scaler()
    from memfit.dist.env import current, global_batch
    world = current()
    eff = global_batch(cfg)      # global: micro x accumulation x ranks
    micro = min(cfg.train.batch_size, eff)           # per rank
    if not world.is_main:
        run_dir = None        # rank 0 is the only writer (checkpoints, history, plots, final_model/)
    # Training and evaluation recover separately: an OOM while evaluating shrinks only the eval micro-batch.
    advice = lambda: planner_advice(cfg, device)   # the planner runs only if nothing fits
    oom = OOMController(micro, device, cfg.oom.inject_oom_above_tokens, cfg.oom.oom_regrow, advice=advice)
    eval_oom = OOMController(micro, device, cfg.oom.inject_oom_above_tokens, cfg.oom.oom_regrow,
                             advice=advice, what="eval")
    counters = ValueState(step=0, tokens=0, epoch=0, elapsed=0.0)
    history = History(run_dir, cfg.run.report_to)

    registry = StateRegistry()
    for name, part in (("model", model_state or model), ("optimizer", opt), ("scheduler", sched),
                       ("scaler", scaler),
                       ("rng", RNGState()), ("data", train_data), ("loop", counters), ("oom", oom), ("eval_oom", eval_oom),
                       ("history", history)):
        registry.register(name, part)
    dist_training = None
    if world.distributed:
        from memfit.train.ddp import DistTraining
        dist_training = DistTraining(world, model, device.torch_device)
        registry.register("ranks", dist_training.ranks)   # every rank's RNG state, in rank 0's checkpoints

    deadline = None
    if cfg.budget.time_limit is not None or cfg.budget.deadline is not None:
        from memfit.train.deadline import Deadline, process_start_time
        # --time-limit counts from the process start (in a notebook: the kernel's), like a session.
        deadline = Deadline(cfg.budget.time_limit, cfg.budget.deadline, process_start_time())
        registry.register("deadline", deadline)
    checkpointer = None
    if checkpoint and run_dir is not None:
        from memfit.ckpt.checkpointer import Checkpointer
        checkpointer = Checkpointer(run_dir, cfg, registry, model, log=log.info, tokenizer=tokenizer)
    if deadline is not None:
        # Until measured: a save writes ~4x the weights (weights + two Adam moments) at >=100 MB/s and
        # reads them back to verify; an evaluation of k batches is ~k/2 steps (and >= 3 s: best/, plots);
        # the export writes the weights once more (and is never slower than a save).
        wbytes = sum(p.numel() * p.element_size() for p in model.parameters())
        deadline.set_prior("save", 0.5 + 8 * wbytes / 100e6)
        deadline.set_prior("export", 3.0 + 2 * wbytes / 100e6)   # + importing the writer, tokenizer files
        deadline.set_prior("eval", 3.0)      # the first evaluation also imports matplotlib for the plots
        deadline.set_prior_steps("eval", 0.5 * (cfg.train.eval_batches or 100) + 0.05 * cfg.train.sample_tokens)

    n = world.world_size
    log.info(f"batch: effective {eff} rows = micro-batch {micro} x {math.ceil(eff / n / micro)} accumulation"
             + (f" x {n} processes" if n > 1 else "") + f"; {total_steps} optimizer steps")
    return Job(cfg=cfg, model=model, optimizer=opt, scheduler=sched, scaler=scaler, precision=precision,
               device=device, train_data=train_data, total_steps=total_steps, registry=registry,
               history=history, oom=oom, eval_oom=eval_oom, run_dir=run_dir, loss_fn=loss_fn or lm_loss(cfg.train.chunked_loss),
               checkpointer=checkpointer, deadline=deadline, counters=counters,
               cadence=Cadence(cfg.train.log_every, cfg.train.eval_every, cfg.run.quiet),
               world=world, dist=dist_training)


def gradient_checkpointing_problem(model: torch.nn.Module) -> str | None:
    """Why --gradient-checkpointing cannot apply to `model` (None when it can): checked with the
    other problems, before the run directory is written, instead of failing after config.yaml."""
    if hasattr(model, "activation_checkpointing_enable") or hasattr(model, "gradient_checkpointing_enable"):
        return None
    return (f"gradient_checkpointing=True needs a model with gradient_checkpointing_enable() (this "
            f"{type(model).__name__} has none): wrap your blocks with torch.utils.checkpoint yourself "
            "and leave gradient_checkpointing off")


def enable_gradient_checkpointing(model: torch.nn.Module) -> None:
    """Non-reentrant checkpointing: works with frozen inputs (LoRA) and keeps RNG in step."""
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5 name
        model.activation_checkpointing_enable({"use_reentrant": False})
        if hasattr(model, "config"):
            model.config.use_cache = False
    elif hasattr(model, "gradient_checkpointing_enable"):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if hasattr(model, "config"):
            model.config.use_cache = False
    else:
        raise C.ConfigError([gradient_checkpointing_problem(model)])


def run_job(job: Job, announce: Callable[[Job, TrainResult], None] | None = None) -> TrainResult:
    """train() under signal handling, the result recorded in training_history.json; `announce` says how
    to continue a stopped run (default: the CLI's resume command)."""
    from memfit.jobs import startup
    from memfit.train.signals import GracefulInterrupt
    startup.hand_over()       # (a no-op unless the CLI installed its start-up handlers)
    if not job.world.is_main:     # rank 0 evaluates and writes; the other ranks train
        from memfit.train.job import Hooks
        job.hooks = Hooks(on_step=job.hooks.on_step)
        announce = lambda job, result: None  # noqa: E731
    try:
        with GracefulInterrupt(log=log.warning) as interrupt:
            job.interrupt = interrupt
            result = record_result(job, train(job))
    except DoesNotFit as e:
        # Nothing is saved after the failure (the stream is already past the batch that did not fit):
        # the last good checkpoint is the place to continue from, with options that fit.
        for ctl in (job.oom, job.eval_oom):
            for event in ctl.drain():
                job.history.append(event)
        job.history.append({"kind": "does_not_fit", "step": job.counters["step"],
                            "message": str(e)})
        if job.checkpointer is not None:
            job.checkpointer.wait()
        note = ""
        if job.run_dir is not None:
            from memfit.ckpt.policy import list_checkpoints
            entries = list_checkpoints(job.run_dir / "checkpoints")
            if entries:
                note = (f" The last good checkpoint, {entries[-1].path}, is intact: change the options and "
                        "continue it with --resume auto.")
        log.error(f"does not fit: {e}{note}")
        raise DoesNotFit(f"{e}{note}") from None
    if job.checkpointer is not None:
        job.checkpointer.wait()
    if job.dist is not None:
        job.dist.done()       # every rank waits for rank 0's writes before any exits
    (announce or announce_resume_command)(job, result)
    return result


def announce_resume_command(job: Job, result: TrainResult) -> None:
    """The CLI's last words on a stop: the command that resumes it, or why nothing can be resumed."""
    if result.status == "stopped":
        import shlex
        from memfit.dist.launch import relaunch_flags
        argv = [*sys.argv[1:], *relaunch_flags()]      # (--nproc N: the same torchrun job again)
        cmd = "memfit " + " ".join(shlex.quote(a) for a in argv)
        if "--resume" not in argv:
            cmd += " --resume auto"
        if job.run_dir is not None and "--output-dir" not in argv:
            cmd += f" --output-dir {shlex.quote(str(job.run_dir))}"
        print(f"memfit: stopped resumably at step {result.step} ({result.reason}).\n  resume with: {cmd}")
    elif result.status == "not_saved":
        print(f"memfit: stopped at step {result.step}: {result.reason}", file=sys.stderr)
