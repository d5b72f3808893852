"""What happens after the training loop: the resumable stop, or the end of the run.

    stopped (signal / deadline / full disk):  save, [deadline: evaluate + export], exit 75
    finished:  save FIRST (from here a stop never costs training again), then evaluate, export and the
               job's final summary (`Job.finalize`) within the deadline; a SIGINT/SIGTERM in that phase
               cuts it within a moment and exits 75: `--resume auto` redoes only the evaluation/export.

A signal that arrived during the last step does not stop the run: the step is the last one, so the run
saves and finishes (as if the signal had come a moment later, after a normal end).
"""

from __future__ import annotations

import errno
import logging
import re
import time
from pathlib import Path

from memfit.metrics import plot_history
from memfit.train.job import EXIT_NOTHING_SAVED, EXIT_OK, EXIT_STOPPED, Job, TrainResult
from memfit.train.signals import StopNow

log = logging.getLogger("memfit")
NOT_SAVED = "this step is not saved; --resume auto continues from the newest checkpoint"
PHASES = {"data": "reading the next batch", "grad": "computing gradients", "update": "applying the update",
          "after": "after the step", "eval": "evaluating"}

FINISH_WITH_RESUME = "run `--resume auto` to finish the export"


class KeyboardStop:
    """A KeyboardInterrupt (a notebook's Ctrl-C where no signal handler could be installed), handled like
    SIGINT when it lands where the step can be completed exactly: while computing gradients the
    effective batch is still in hand, so the loop redoes the step from its first micro-batch, then
    saves; after the step or while evaluating, it saves. While reading data or applying the update the
    state may be half-changed: the loop stops without a new save (`unsaved`)."""

    def __init__(self) -> None:
        self.reason: str | None = None     # set once one arrived: why the loop stops
        self.unsaved = False               # stop now, writing no checkpoint

    def interrupted(self, phase: str) -> None:
        if self.reason is not None:
            raise KeyboardInterrupt        # a second one while finishing: give up
        log.warning(f"memfit: KeyboardInterrupt ({PHASES.get(phase, phase)}): "
                    + ("redoing this step's gradients, then saving a checkpoint" if phase == "grad" else
                       "saving a checkpoint" if phase in ("after", "eval") else
                       "the training state may be half-updated, so no new checkpoint is written; "
                       "the last good one is kept")
                    + " (interrupt again to abort at once)")
        self.unsaved = phase in ("data", "update")
        self.reason = (f"KeyboardInterrupt while {PHASES[phase]} ({NOT_SAVED})" if self.unsaved else
                       "received KeyboardInterrupt")


def stop(job: Job, step: int, reason: str, last_eval: dict, save: bool) -> TrainResult:
    """The resumable stop: a checkpoint of `step` (unless the state may be half-updated), and at the
    deadline the evaluation and export of that step too."""
    job.history.append({"kind": "stop", "step": step, "reason": reason})   # before the save: it stays
    if job.checkpointer is not None and save:
        _save(job, step)
    at_deadline = reason.startswith("the time limit")
    if at_deadline and job.hooks.evaluate is not None:
        last_eval = _evaluate(job, step)      # (also rewrites training_history.json and the plots)
    else:
        _write_outputs(job)
    final = _export(job) if at_deadline else None
    if job.checkpointer is not None and job.checkpointer.newest() is None:
        return nothing_saved(job, step, reason)
    log.info(f"stopped at step {step}/{job.total_steps}: {reason}. Resume with the same command "
             f"and --resume auto.")
    return TrainResult("stopped", EXIT_STOPPED, step, last_eval, final, reason)


def finish(job: Job, step: int, start_step: int, status: str, reason: str, last_eval: dict) -> TrainResult:
    """The end of the run: save, then evaluate / export / finalize, each of which a signal may cut."""
    interrupt = job.interrupt
    if interrupt is not None and interrupt.requested:
        name = interrupt.consume()
        log.warning(f"memfit: {name} arrived during the last step: saving, then finishing the evaluation and "
                    "export (interrupt again to stop at once; --resume auto finishes them later)")
    if job.checkpointer is not None:
        _save(job, step)
        if job.checkpointer.newest() is None:
            return nothing_saved(job, step, job.checkpointer.no_room or "the final checkpoint was not written")
    phase = "evaluating"
    try:
        with interrupt.cut_phase() if interrupt is not None else _nothing():
            short = _time_short(job)
            if short:
                return _resume_to_finish(job, step, last_eval, short)
            done = _eval_row(job, step) if step == start_step else None
            if done is not None:
                # Resumed from a checkpoint written after the last evaluation (older runs saved after it)
                last_eval = {k: v for k, v in done.items() if k not in ("kind", "step", "sample")}
            elif job.hooks.evaluate is not None:
                last_eval = _evaluate(job, step)
            phase = "exporting final_model/"
            final = _export(job, finished=True)
            _write_outputs(job)
            if job.hooks.export is not None and final is None and job.checkpointer is not None:
                # never "finished" without final_model/: the checkpoint holds the weights
                why = job.checkpointer.no_room or "no room"
                return _resume_to_finish(job, step, last_eval, f"final_model/ was not written ({why})")
            phase = "writing the final summary"
            if job.hooks.finalize is not None:
                last_eval = {**last_eval, **job.hooks.finalize()}
    except (StopNow, KeyboardInterrupt) as e:
        name = str(e) or type(e).__name__
        return _resume_to_finish(job, step, last_eval, f"received {name} while {phase}")
    return TrainResult(status, EXIT_OK, step, last_eval, final, reason)


def _resume_to_finish(job: Job, step: int, last_eval: dict, why: str) -> TrainResult:
    reason = f"{why}; training is complete and saved: {FINISH_WITH_RESUME}"
    log.warning(f"stopped at step {step}/{job.total_steps}: {reason}")
    return TrainResult("stopped", EXIT_STOPPED, step, last_eval, None, reason)


def _time_short(job: Job) -> str | None:
    """Why the evaluation + export cannot finish before the deadline (None: they can)."""
    d = job.deadline
    if d is None or d.remaining() is None:
        return None
    need = d.safety * (d.estimate("eval") + d.estimate("export")) + d.margin_s
    left = d.remaining()
    if left >= need:
        return None
    return (f"the time limit is near ({left:.0f}s left, the evaluation and export need ~{need:.0f}s)")


def nothing_saved(job: Job, step: int, reason: str) -> TrainResult:
    """A stop with no checkpoint at all: not resumable, so not exit 75; say what to do."""
    why = (f"{reason}; nothing was saved (no checkpoint exists), so this run cannot be resumed: free space "
           f"or raise --disk-budget, then run the same command again (it starts from step 0)")
    log.error(f"stopped at step {step}/{job.total_steps}: {why}")
    return TrainResult("not_saved", EXIT_NOTHING_SAVED, step, {}, None, why)


class _nothing:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc) -> None:
        return None


def _eval_row(job: Job, step: int) -> dict | None:
    for row in reversed(job.history.rows):
        if row.get("step", -1) < step:
            return None
        if row.get("kind") == "eval" and row.get("step") == step:
            return row
    return None


def _evaluate(job: Job, step: int) -> dict[str, float]:
    t0 = time.perf_counter()
    metrics = job.hooks.evaluate()
    row = {"kind": "eval", "step": step, **metrics}
    if job.calibration is not None:       # the plan's figures beside the measured ones
        row.update(job.calibration.fields())
    if job.hooks.sample is not None:
        row["sample"] = job.hooks.sample()
    if job.eval_oom is not None:
        for event in job.eval_oom.drain():   # eval micro-batch / sample length changes
            job.history.append(event)
    job.history.append(row)
    shown = "  ".join(f"{k}={v:.4g}" for k, v in metrics.items() if isinstance(v, float))
    log.info(f"step {step}: {shown}" + (f"\n  sample: {as_text(row['sample'])}" if "sample" in row else ""))
    if job.checkpointer is not None:
        job.checkpointer.update_best(step, metrics)
    _write_outputs(job)
    if job.deadline is not None:   # all of it (best/, plots too): the deadline reserves this much
        job.deadline.record("eval", time.perf_counter() - t0)
    return metrics


def _save(job: Job, step: int) -> None:
    t0 = time.perf_counter()
    path = job.checkpointer.save(step)
    if job.deadline is not None and path is not None:
        job.deadline.record("save", time.perf_counter() - t0)


def _export(job: Job, finished: bool = False) -> Path | None:
    """final_model/ (within the disk budget); once a finished run's export is written, --keep-last 0
    removes the checkpoints."""
    if job.hooks.export is None:
        return None
    if job.checkpointer is not None:
        need = job.checkpointer.export_bytes()
        if not job.checkpointer.make_room(need, "final_model/"):
            job.checkpointer.no_room = job.checkpointer.room_text(need)
            log.warning(f"final_model/ (~{need / 1e6:.1f} MB) was not written: {job.checkpointer.no_room}; "
                        f"the newest checkpoint holds the weights (memfit export --run {job.run_dir} "
                        f"--checkpoint latest --out DIR)")
            return None
    t0 = time.perf_counter()
    try:
        path = job.hooks.export()
    except OSError as e:        # the disk filled while writing: the temporary folder is discarded
        if e.errno != errno.ENOSPC or job.checkpointer is None:
            raise
        job.checkpointer.no_room = f"the disk filled while writing final_model/ ({e})"
        log.warning(f"final_model/ was not written: {job.checkpointer.no_room}")
        return None
    if job.deadline is not None:
        job.deadline.record("export", time.perf_counter() - t0)
    if finished and path is not None and job.checkpointer is not None:
        job.checkpointer.finish()
    return path


def _write_outputs(job: Job) -> None:
    if job.run_dir is None:
        return
    job.history.write_summary(job.run_dir)
    plot_history(job.history.rows, job.run_dir / "plots" / "training.png", job.history.pending_losses)


def record_result(job: Job, result: TrainResult) -> TrainResult:
    """The run's summary in training_history.json, the same for every job kind (status, why it stopped,
    step, best metric, where the model is), and result.metrics never empty: the latest evaluation in the
    history (also one from before a resume) and the last step's training loss."""
    evals = [r for r in job.history.rows if r.get("kind") == "eval" and r.get("phase") != "before"]
    train_rows = [r for r in job.history.rows if r.get("kind") == "train"]
    losses = job.history.pending_losses or (train_rows[-1:] and train_rows[-1].get("step_losses")) or []
    latest = {k: v for k, v in (evals[-1] if evals else {}).items() if k not in ("kind", "step", "sample")}
    result.metrics = {**latest, **result.metrics}
    if losses or train_rows:
        result.metrics.setdefault("train_loss", losses[-1] if losses else train_rows[-1]["loss"])
    ck = job.checkpointer
    best = None
    if ck is not None and ck.tracker.step is not None:
        best = {"metric": ck.metric, "value": ck.tracker.value, "step": ck.tracker.step}
    c = job.counters
    if job.calibration is not None:      # the closing summary: the plan beside what was measured
        log.info(job.calibration.closing())
        job.history.summary["plan_vs_measured"] = {**job.calibration.fields(), **job.calibration.errors()}
    job.history.summary.update(
        job=job.cfg.task, status=result.status, reason=result.reason, exit_code=result.exit_code,
        step=result.step, total_steps=job.total_steps, best=best,
        final_model=str(result.final_model) if result.final_model else None,
        tokens=c["tokens"], examples=c.values.get("examples"),
        metrics={k: v for k, v in result.metrics.items() if isinstance(v, (int, float, str))})
    if job.run_dir is not None:
        job.history.write_summary(job.run_dir)
    return result


def as_text(sample: str, indent: int = len("  sample: ")) -> str:
    """A sample as the text it is, its lines indented under its label (not a Python repr with \\n escapes);
    runs of blank lines fold into one so a young model's newlines do not fill the console. Every job's
    samples (pretraining's eval sample, fine-tuning's held-out completions) are printed through it."""
    text = re.sub(r"\n\s*\n+", "\n\n", sample.strip())
    if not text:
        return "(empty: the model produced only whitespace)"
    first, *rest = text.split("\n")
    return "\n".join([first] + [(" " * indent + line) if line else "" for line in rest])
