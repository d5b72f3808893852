"""Assemble a job from a validated config and run it: the glue between the CLI and the loop.

Order matters and is the same for every job:
  1. validate everything that can be checked without building a model; raise once (exit 2)
  2. the run directory, config.yaml written first
  3. seed, tokenizer, model, precision, optimizer, schedule, streams
  4. register every resumable part, then hand the Job to train()
"""

from __future__ import annotations

import itertools
import logging
import math
import sys
import time
from pathlib import Path

import torch

from memfit import config as C
from memfit.ckpt.state import RNGState, StateRegistry, ValueState, seed_everything
from memfit.device import DoesNotFit, detect
from memfit.jobs.rundir import check_run_dir, prepare_run_dir, run_dir_for
from memfit.metrics import History, setup_logging
from memfit.models.optim import build_optimizer, eight_bit_available, warmup_cosine
from memfit.plan.advice import planner_advice
from memfit.precision import resolve_precision
from memfit.run_length import with_epoch_cadence
from memfit.runfiles import record
from memfit.train.finish import record_result
from memfit.train.job import Cadence, Job, TrainResult
from memfit.train.loop import train
from memfit.train.oom import OOMController, allocator_report, configure_allocator

log = logging.getLogger("memfit")
UNIGRAM_MAX_TOKENS = 20_000_000   # the unigram floor's fit: plenty for stable counts, seconds to read
DEFAULT_MAX_STEPS = 200  # the no-argument job: ~0.6 epoch of Shakespeare, a few minutes on 2 CPU cores


def common_problems(cfg: C.Config, run_dir: Path) -> list[str]:
    """Checks shared by every job kind: pure config checks, output dir, optimizer, resume path."""
    cfg = C.with_job_defaults(cfg)   # compared with a saved config.yaml, which holds resolved values
    problems = C.validate(cfg)
    problems += check_run_dir(cfg, run_dir)
    if cfg.optim.optimizer != "adamw":
        why = eight_bit_available()
        if why:
            problems.append(f"--optimizer {cfg.optim.optimizer} is unavailable: {why}; or use --optimizer adamw")
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


def check(cfg: C.Config) -> list[str]:
    """Every problem with this job that can be found before building a model."""
    problems = common_problems(cfg, run_dir_for(cfg))
    if cfg.task in ("finetune", "classify"):
        from memfit.jobs.finetune import check_finetune
        return problems + check_finetune(cfg)
    from memfit.data import check_data
    return problems + check_data(cfg) + sizing_problems(cfg) + pretrain_disk_problems(cfg, run_dir_for(cfg))


def sizing_problems(cfg: C.Config) -> list[str]:
    """A --target-params/--seq-len/--vocab-size no model shape meets, found before anything is written.
    The vocabulary is the BPE's target size (a trained one is never larger) or GPT-2's; a local
    tokenizer's size is known only once loaded, so it is checked when the model is built."""
    vocab = {"bpe": cfg.data.vocab_size, "gpt2": 50257}.get(cfg.data.tokenizer)
    if vocab is None or cfg.data.seq_len < 1 or vocab < 1:
        return []
    from memfit.models import size_model
    first = None
    # a trained BPE may come out smaller than --vocab-size (down to its 257 byte-level symbols):
    # refused only when neither end of that range has a shape
    for v in ((vocab, 257) if cfg.data.tokenizer == "bpe" else (vocab,)):
        try:
            size_model(cfg.model.target_params, cfg.model.arch, v, cfg.data.seq_len)
            return []
        except ValueError as e:
            first = first or e
    return [f"--target-params {cfg.model.target_params:,} with --seq-len {cfg.data.seq_len:,}: {first}"]


def pretrain_disk_problems(cfg: C.Config, run_dir: Path) -> list[str]:
    """A disk or --disk-budget that cannot hold one checkpoint: exit 2 before anything is written (the
    size follows from --target-params; the checkpointer checks again once the model is built)."""
    from memfit.ckpt.space import capacity_problem, full_checkpoint_estimate
    from memfit.models import size_model
    vocab = {"bpe": cfg.data.vocab_size, "gpt2": 50257}.get(cfg.data.tokenizer)
    if vocab is None:     # a tokenizer directory: its vocabulary is known once it is loaded
        return []
    try:
        params = size_model(cfg.model.target_params, cfg.model.arch, vocab, cfg.data.seq_len).params
    except ValueError:
        return []         # reported by the model checks
    problem = capacity_problem(run_dir, cfg.budget.disk_budget,
                               full_checkpoint_estimate(4 * params, params, cfg.optim.optimizer))
    return [problem] if problem else []


def run(cfg: C.Config) -> int:
    """Entry point for train/finetune/classify: returns the process exit code."""
    configure_allocator()   # before anything initialises CUDA (the CLI did it already; harmless twice)
    if cfg.task in ("finetune", "classify"):
        from memfit.jobs.finetune import run_finetune
        return run_finetune(cfg)
    result = run_pretrain(cfg)
    return result.exit_code


def run_pretrain(cfg: C.Config) -> TrainResult:
    from memfit.data import build_streams, build_tokenizer, estimate_tokens

    cfg = C.with_job_defaults(cfg)
    run_dir = run_dir_for(cfg)
    problems = check(cfg)
    if problems:
        raise C.ConfigError(problems)
    from memfit.jobs.gate import plan_gate, write_plan
    cfg, plan = plan_gate(cfg, run_dir)      # before anything is written: exit 3 writes nothing
    prepare_run_dir(cfg, run_dir)
    setup_logging(run_dir, cfg.run.quiet)
    write_plan(run_dir, plan)
    log.info(f"run directory: {run_dir}")
    from memfit.data.check import encoding_warnings
    for w in encoding_warnings(cfg):     # counted by check(): a cached scan, no second read
        log.warning(w)

    device = detect()
    seed_everything(cfg.train.seed)
    tok_dir = run_dir / "tokenizer"
    record(run_dir, "tokenizer")
    t0 = time.perf_counter()
    tokenizer = build_tokenizer(cfg, tok_dir)
    log.info(f"tokenizer: {type(tokenizer).__name__}, vocab {len(tokenizer)} ({time.perf_counter() - t0:.1f}s)")

    model, shape_text = build_pretrain_model(cfg, len(tokenizer), tokenizer)
    log.info(f"model: {shape_text}")

    eff = cfg.effective_batch()
    tokens_per_step = eff * cfg.data.seq_len
    per_epoch = (cfg.data.epoch_tokens or estimate_tokens(cfg, tokenizer)) / tokens_per_step \
        if cfg.train.max_steps is None or cfg.train.epochs is not None or "epoch" in \
        (cfg.train.eval_strategy, cfg.checkpoint.save_strategy) else 1.0
    # Neither --epochs nor --max-steps: the quick default job (a few minutes on a laptop CPU).
    total_steps = steps_for(cfg, per_epoch, DEFAULT_MAX_STEPS)
    cfg = with_epoch_cadence(cfg, per_epoch)
    train_stream, val_stream = build_streams(cfg, tokenizer, eff, cfg.train.seed)

    job = assemble_job(cfg, model, train_stream, total_steps, device, run_dir, tokenizer=tokenizer)

    def evaluate():
        from memfit.train.evaluate import evaluate_loss
        return evaluate_loss(model, iter(val_stream), job.precision, job.oom.micro_batch_size,
                             cfg.train.eval_batches, device.torch_device, oom=job.eval_oom,
                             step=job.counters["step"])

    # The eval sample continues the start of the first validation block unless a prompt is given.
    first_val = next(iter(val_stream), None)
    default_prompt = tokenizer.decode(first_val["input_ids"][0, :12]) if first_val is not None else "\n"

    def sample():
        from memfit.train.evaluate import generate_text
        prompt = cfg.train.sample_prompt or default_prompt
        return generate_text(model, tokenizer, prompt, cfg.train.sample_tokens, device.torch_device,
                             oom=job.eval_oom, step=job.counters["step"])

    def export():
        from memfit.export import export_hf
        return export_hf(model, tokenizer, run_dir / "final_model")

    def finalize() -> dict:
        """The summary: validation (at most --eval-batches, and only while time is left before the
        deadline's margin) against an add-one unigram floor."""
        from memfit.data.stream import iter_split_tokens
        from memfit.train.evaluate import unigram_baseline
        stop = job.deadline.past_margin if job.deadline is not None else None
        val_batches = cfg.train.eval_batches
        full_val = evaluate_full(job, val_stream, val_batches, stop)
        val_cut = itertools.islice(iter(val_stream), full_val["val_batches"])   # the same label tokens
        base = unigram_baseline(iter_split_tokens(cfg, tokenizer, "train"), val_cut, len(tokenizer),
                                max_train_tokens=UNIGRAM_MAX_TOKENS, stop=stop)
        summary = {**full_val, **base, "steps": job.counters["step"],
                   "params": sum(p.numel() for p in model.parameters())}
        job.history.write_summary(run_dir, {"summary": summary})
        ratio = full_val["val_ppl"] / base["unigram_ppl"]
        log.info(f"validation perplexity {full_val['val_ppl']:.2f} vs add-one unigram "
                 f"{base['unigram_ppl']:.2f} (ratio {ratio:.3f}) on {full_val['val_tokens']} tokens")
        final = run_dir / "final_model"
        log.info(f"final model: {final}  (try: memfit generate --model {final} --prompt 'ROMEO:')")
        return summary

    job.hooks.evaluate, job.hooks.export, job.hooks.finalize = evaluate, export, finalize
    job.hooks.sample = sample if cfg.train.sample_tokens > 0 else None
    try:
        return run_job(job)
    finally:
        train_stream.close()  # stops tokenizer worker processes, if any


def steps_for(cfg: C.Config, steps_per_epoch: float, default_cap: int | None = None) -> int:
    """The run's optimizer steps (--epochs and --max-steps: whichever comes first), logged with why."""
    from memfit.run_length import total_steps
    steps, why = total_steps(cfg.train.epochs, cfg.train.max_steps, steps_per_epoch, default_cap)
    log.info(f"training stops at step {steps}: {why}")
    return steps


def evaluate_full(job: Job, val_stream, max_batches: int = 0, stop=None) -> dict[str, float]:
    from memfit.train.evaluate import evaluate_loss
    metrics = evaluate_loss(job.model, iter(val_stream), job.precision, job.oom.micro_batch_size, max_batches,
                            job.device.torch_device, oom=job.eval_oom, step=job.counters["step"], stop=stop)
    for event in job.eval_oom.drain():
        job.history.append(event)
    return metrics


def build_pretrain_model(cfg: C.Config, vocab_size: int, tokenizer=None):
    from memfit.models import build_causal_lm, count_params, describe, size_model
    shape = size_model(cfg.model.target_params, cfg.model.arch, vocab_size, cfg.data.seq_len)
    ids = {}
    if tokenizer is not None:
        ids = dict(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                   pad_token_id=tokenizer.pad_token_id)
    model = build_causal_lm(shape, dropout=cfg.model.dropout, **ids)
    n = count_params(model)
    return model, f"{describe(shape)} (built: {n:,} parameters, target {cfg.model.target_params:,})"


def assemble_job(cfg: C.Config, model: torch.nn.Module, train_data, total_steps: int, device,
                 run_dir: Path | None, loss_fn=None, checkpoint: bool = True, model_state=None,
                 tokenizer=None) -> Job:
    """Everything but evaluate/sample/export (job-specific); also used by memfit.api.fit.
    model_state: what the registry saves as "model" instead of the whole model (LoRA: the adapter only);
    tokenizer: saved into every checkpoint and best/ (each then loads with stock from_pretrained)."""
    from memfit.models.loss import causal_lm_loss
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
    eff = cfg.effective_batch()
    micro = min(cfg.train.batch_size, eff)
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

    log.info(f"batch: effective {eff} rows = micro-batch {micro} x {math.ceil(eff / micro)} accumulation"
             f"; {total_steps} optimizer steps")
    return Job(cfg=cfg, model=model, optimizer=opt, scheduler=sched, scaler=scaler, precision=precision,
               device=device, train_data=train_data, total_steps=total_steps, registry=registry,
               history=history, oom=oom, eval_oom=eval_oom, run_dir=run_dir, loss_fn=loss_fn or causal_lm_loss,
               checkpointer=checkpointer, deadline=deadline, counters=counters,
               cadence=Cadence(cfg.train.log_every, cfg.train.eval_every, cfg.run.quiet))


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


def run_job(job: Job) -> TrainResult:
    """train() under signal handling; the resume command printed when it stops resumably."""
    from memfit.jobs import startup
    from memfit.train.signals import GracefulInterrupt
    startup.hand_over()
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
    if result.status == "stopped":
        import shlex
        argv = [a for a in sys.argv[1:]]
        cmd = "memfit " + " ".join(shlex.quote(a) for a in argv)
        if "--resume" not in argv:
            cmd += " --resume auto"
        if job.run_dir is not None and "--output-dir" not in argv:
            cmd += f" --output-dir {shlex.quote(str(job.run_dir))}"
        print(f"memfit: stopped resumably at step {result.step} ({result.reason}).\n  resume with: {cmd}")
    elif result.status == "not_saved":
        print(f"memfit: stopped at step {result.step}: {result.reason}", file=sys.stderr)
    return result
