"""THE training loop: one function, read top to bottom.

Everything a job needs is assembled beforehand into a `Job` (see memfit.jobs.common); the loop only runs it.
"""

from __future__ import annotations

import logging
import math
import time
from typing import Any, Iterator

import torch

from memfit.device import empty_cache, memory_stats
from memfit.metrics import Progress
from memfit.train.calibrate import Calibration
from memfit.train.finish import NOT_SAVED, PHASES, KeyboardStop, _evaluate, _save, finish, stop
from memfit.train.job import Job, TrainResult
from memfit.train.meter import StepMeter, batch_counts, fast_fields, slow_fields
from memfit.train.step import Batch, accumulate

log = logging.getLogger("memfit")

def train(job: Job) -> TrainResult:
    """Run `job` to its last step, or until a signal or the deadline stops it resumably.

        step = resume the latest good checkpoint (or 0)
        while step < total_steps:
            batch = next effective batch from the stream             (rows of one optimizer step)
            for each micro-batch:  forward -> loss_sum / tokens_in_effective_batch -> backward
                                   (on OOM: drop grads, halve the micro-batch, redo this batch)
            unscale, clip grad norm, optimizer step (skipped by GradScaler on inf), lr schedule
            step += 1; log loss / lr / tokens/s / memory
            every eval_every: validation loss, sample, best/, early stopping
            every save_every: checkpoint (atomic, keep-K, disk budget)
            signal, deadline near or disk full: checkpoint, return "stopped" (exit 75, resumable)
        checkpoint, then final evaluation and export final_model/ (a signal there: exit 75, resume finishes)
    """
    cfg, model, opt, sched, scaler = job.cfg, job.model, job.optimizer, job.scheduler, job.scaler
    counters = job.counters
    dev = job.device.torch_device

    start_step = 0
    if job.checkpointer is not None:
        start_step = job.checkpointer.resume(cfg.checkpoint.resume) or 0
    if job.dist is not None:           # N ranks: rank 0 resumed; the others take its state (train/ddp.py)
        start_step = job.dist.share_resume(job.registry, start_step)
    job.history.load_until(start_step)
    _note_resume(job, start_step)
    calib = job.calibration = job.calibration or Calibration(job.device)
    calib.start(start_step, job.deadline)   # this session's first steps measured; it times every step

    data: Iterator[Batch] = iter(job.train_data)
    progress = Progress(job.total_steps, start_step, disable=job.cadence.quiet or not job.world.is_main)
    model.train()
    opt.zero_grad(set_to_none=True)
    step, status, reason, last_eval = start_step, "finished", "", {}
    meter = StepMeter()                # tokens / examples per second over the window since the last log
    session_t0 = time.perf_counter()
    elapsed_before = counters["elapsed"]
    if start_step and _agreed(job, job.checkpointer is not None and job.checkpointer.should_stop_early()):
        status, reason = "early_stopped", "no improvement for --early-stopping-patience evals (before the resume)"
    keyboard = KeyboardStop()          # a notebook's Ctrl-C where no signal handler could be installed
    redo_batch: Batch | None = None    # the effective batch whose gradients a KeyboardInterrupt cut short

    while step < job.total_steps and status != "early_stopped":
        phase = "data"
        try:
            calib.begin(step + 1, model, opt)
            if redo_batch is not None:
                batch, redo_batch = redo_batch, None
            else:
                batch = next(data)

            # --- forward/backward over the effective batch, OOM-safe -----------------------
            phase = "grad"
            rng_before = _torch_rng()        # a redone step draws the same dropout masks
            rows, on_ranks = _on_ranks(job, batch)   # N ranks: this rank's rows of the batch, DDP
            stats = job.oom.run(step, opt, model, lambda mbs: accumulate(
                job.dist.ddp if job.dist else model, rows, mbs, job.precision, scaler, job.loss_fn, dev,
                before_micro=job.oom.check, **on_ranks), scaler=scaler, agree=job.dist and job.dist.agree)
            if job.dist is not None:         # the agreed step: loss, count and gradients summed over ranks
                stats = job.dist.reduce_step(stats, model.parameters)

            # --- optimizer step ------------------------------------------------------------
            phase = "update"
            scaler.unscale_(opt)  # clip the true gradients, not the scaled ones
            max_norm = cfg.optim.max_grad_norm
            grad_norm = torch.nn.utils.clip_grad_norm_(
                [p for p in model.parameters() if p.grad is not None], max_norm if max_norm > 0 else math.inf)
            scaler.step(opt)       # skipped if any gradient is inf/nan (fp16); then the scale halves
            scaler.update()
            sched.step()
            opt.zero_grad(set_to_none=True)  # free gradient memory before the next forward
            step += 1
            calib.end(step)
            if cfg.oom.empty_cache_every and step % cfg.oom.empty_cache_every == 0:
                empty_cache(job.device)      # off by default: helps only against fragmentation (README)

            # --- bookkeeping ---------------------------------------------------------------
            counters["step"] = step
            counters["epoch"] = getattr(job.train_data, "epoch", 0)   # a user's stream may count none
            counters["elapsed"] = elapsed_before + (time.perf_counter() - session_t0)
            row = _bookkeep(job, step, start_step, batch, stats, grad_norm, meter, progress)
            phase = "after"            # the step is complete; what follows can be redone
            if job.hooks.on_step is not None:
                job.hooks.on_step(step, row)

            # --- evaluation, best model, early stopping -------------------------------------
            if job.cadence.eval_every and step % job.cadence.eval_every == 0 and step < job.total_steps:
                if job.hooks.evaluate is not None:      # (on N ranks: rank 0's)
                    phase = "eval"
                    last_eval = _evaluate(job, step)
                    phase = "after"
                if _agreed(job, job.checkpointer is not None and job.checkpointer.should_stop_early()):
                    status, reason = "early_stopped", "no improvement for --early-stopping-patience evals"
                    break

            # --- checkpoint, then the resumable stops ---------------------------------------
            if step < job.total_steps and \
                    _agreed(job, job.checkpointer is not None and job.checkpointer.should_save(step)):
                no_room = _save_point(job, step)
                if no_room:     # training on would lose every step from here
                    status, reason = "stopped", no_room
                    break
        except KeyboardInterrupt:
            calib.close()
            keyboard.interrupted(phase)         # (a second one re-raises: the last checkpoint is intact)
            if phase == "grad":
                opt.zero_grad(set_to_none=True)   # drop the partial gradients; the batch is redone whole
                _torch_rng(rng_before)
                redo_batch = batch
                continue
            if phase == "eval":
                last_eval = _evaluate(job, step)  # the uninterrupted run has this evaluation too
            if keyboard.unsaved:
                status, reason = "stopped", keyboard.reason
                break
        except Exception as exc:
            calib.close()
            _crashed(job, step, phase, exc)   # emergency checkpoint if consistent; traceback to memfit.log
            raise
        if step >= job.total_steps:
            break       # the last step is done: a stop request now saves and finishes (train.finish)
        why = _stop_request(job, keyboard)      # (agreed by every rank)
        if why is not None:
            status, reason = "stopped", why
            break

    progress.close()
    if job.dist is not None:
        job.dist.gather_rng(step)      # every rank's RNG into the stop's or the finish's checkpoint
    if status == "stopped":
        return stop(job, step, reason, last_eval, save=NOT_SAVED not in reason)
    return finish(job, step, start_step, status, reason, last_eval)


def _note_resume(job: Job, start_step: int) -> None:
    if not start_step:
        return
    log.info(f"resumed at step {start_step} (micro-batch {job.oom.micro_batch_size})")
    where = job.checkpointer.resumed_from if job.checkpointer is not None else None
    job.history.append({"kind": "resume", "step": start_step, "micro_batch": job.oom.micro_batch_size,
                        "checkpoint": where.name if where is not None else None})




def _agreed(job: Job, flag: bool) -> bool:
    """`flag` on one process; on N ranks True when any rank says so (one all-reduce every rank reaches)."""
    return job.dist.agree(flag) if job.dist is not None else flag


def _on_ranks(job: Job, batch: Batch) -> tuple[Batch, dict[str, Any]]:
    """The rows this process trains on, and accumulate()'s extra arguments on N ranks (rows r::N; the
    global batch's label-token count; DDP's no_sync around each micro-step)."""
    if job.dist is None:
        return batch, {}
    return job.dist.shard(batch), {"count": job.dist.global_count(job.loss_fn, batch),
                                   "micro_context": job.dist.micro_context}


def _save_point(job: Job, step: int) -> str | None:
    """The periodic checkpoint (rank 0 writes; every rank's RNG gathered first); why there was no room."""
    if job.dist is not None:
        job.dist.gather_rng(step)
    if job.checkpointer is not None:
        _save(job, step)
    no_room = job.checkpointer.no_room if job.checkpointer is not None else None
    if _agreed(job, bool(no_room)):
        return no_room or "rank 0 found no room for the checkpoint"
    return None


def _stop_request(job: Job, keyboard: KeyboardStop) -> str | None:
    """Why the loop stops now (a KeyboardInterrupt, SIGINT/SIGTERM, the deadline), or None. On N ranks
    every rank asks all three and they agree, so all stop at the same step."""
    signal_name = job.interrupt.signal_name if job.interrupt is not None else None
    checks = ((lambda: keyboard.reason is not None, lambda: keyboard.reason),
              (lambda: job.interrupt is not None and job.interrupt.requested,
               lambda: f"received {signal_name or 'a stop signal on another rank'}"),
              (lambda: job.deadline is not None and job.deadline.should_stop(),
               lambda: "the time limit is near (stopping with time left to save)"))
    if job.dist is None:
        return next((why() for asks, why in checks if asks()), None)
    flags = job.dist.agree_flags([asks() for asks, _ in checks])
    return next((why() for flag, (_, why) in zip(flags, checks) if flag), None)


def _bookkeep(job: Job, step: int, start_step: int, batch: Batch, stats: Any, grad_norm: torch.Tensor,
              meter: StepMeter, progress: Progress) -> dict[str, Any]:
    """Counters, the history row (step 1, every log_every, the last) and the bar. The bar's counter, ETA
    and tok/s move every step from host timing and host-known counts; loss, grad norm and memory (device
    reads) refresh only on logged steps."""
    c = job.counters
    tokens, examples = batch_counts(batch)
    tokens = stats.tokens if tokens is None else tokens      # no token ids (a custom module): its count
    c["tokens"] += tokens
    c["loss_tokens"] = c.values.get("loss_tokens", 0) + stats.tokens
    c["examples"] = c.values.get("examples", 0) + examples
    rates = meter.add(tokens, stats.tokens, examples)
    job.history.step_loss(stats.loss)     # every step's loss reaches the plot, logged or not
    oom_events = job.oom.drain()     # micro-batch changes: into the history, and onto the bar now
    for event in oom_events:
        job.history.append(event)
    row = {"kind": "train", "step": step, "loss": stats.loss, "lr": job.scheduler.get_last_lr()[0],
           "tokens": c["tokens"], "examples": c["examples"], "micro_batch": job.oom.micro_batch_size,
           "epoch": c["epoch"], **rates}
    if "loss_tokens_per_s" in rates:
        row["loss_tokens"] = c["loss_tokens"]
    # history.jsonl gets the same rows whether or not the run was resumed; the first step after a
    # resume is only shown on the bar.
    logged = step % job.cadence.log_every == 0 or step == job.total_steps or step == 1
    slow = None
    if logged or step == start_step + 1 or oom_events:
        mem = memory_stats(job.device)
        row.update(grad_norm=float(grad_norm), rss_mb=mem["rss"] / 2**20, elapsed=c["elapsed"], time=time.time())
        if "allocated" in mem:
            row.update(gpu_alloc_mb=mem["allocated"] / 2**20, gpu_reserved_mb=mem["reserved"] / 2**20)
        if job.scaler.is_enabled():
            row["loss_scale"] = job.scaler.get_scale()
        if logged:
            row["step_losses"] = job.history.take_losses()
            job.history.append(row)
        meter.reset()
        slow = slow_fields(row)
    left = job.deadline.eta_text(step, job.total_steps) \
        if job.deadline is not None and job.deadline.remaining() is not None else None
    progress.update(step, slow, step_s=job.calibration.step_seconds() if job.calibration else None,
                    **fast_fields(row, rates, job.oom.micro_batch_size, left))
    return row


def _crashed(job: Job, step: int, phase: str, exc: BaseException) -> None:
    """An unexpected exception: save the state when it is consistent (the step was complete: after it,
    or while evaluating), so a crash never costs more than the step it happened in; log the traceback.
    While reading data, computing gradients or updating, the stream or the weights are half-advanced:
    the last checkpoint stays the place to resume from."""
    from memfit.metrics import log_exception
    where = f"while {PHASES.get(phase, phase)} at step {step}"
    note = f"memfit: {type(exc).__name__} {where}"
    if job.checkpointer is not None and phase in ("after", "eval") and step > 0:
        try:
            path = job.checkpointer.save(step)
            note += (f"; emergency checkpoint {path.name} saved (resume with --resume auto)" if path else
                     "; the emergency checkpoint could not be saved (see memfit.log)")
        except Exception as save_exc:  # noqa: BLE001 - the original error is the one to report
            log.error(f"emergency checkpoint at step {step} failed: {save_exc!r}")
            note += "; the emergency checkpoint failed (see memfit.log)"
    elif job.checkpointer is not None:
        note += "; the training state was half-updated, so no emergency checkpoint (the last one is intact)"
    exc.add_note(note)
    log_exception(exc)


def _torch_rng(state: tuple | None = None) -> tuple | None:
    """Get (no argument) or set the torch CPU + CUDA generator states."""
    if state is None:
        return torch.get_rng_state(), (torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None)
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state_all(state[1])
    return None
