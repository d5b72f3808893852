"""What the user sees and keeps: a progress bar, an append-only history, a summary JSON and PNG plots.

history.jsonl is append-only (one JSON object per logged step or eval) so a crash loses at most the
line being written; on resume it is truncated back to the checkpoint's step so the resumed run's
history is identical to an uninterrupted one. training_history.json and plots/training.png are
rewritten from it (cheap: a few thousand rows).
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Any

from memfit import console
from memfit.console import quiet_libraries  # noqa: F401  (decided in memfit.console; imported from here too)
from memfit.runfiles import record

log = logging.getLogger("memfit")

from memfit.plots import plot_history  # noqa: E402,F401  (its home is plots.py; imported from here too)

# Keys that differ between an interrupted+resumed run and an uninterrupted one: wall-clock, and what each
# session measures of itself (memory readings; a resumed session calibrates its own first steps).
TIMING_KEYS = ("time", "elapsed", "tokens_per_s", "examples_per_s", "loss_tokens_per_s", "rss_mb", "gpu_alloc_mb",
               "gpu_reserved_mb", "step_s", "measured_step_s",
               "measured_peak_bytes")


def setup_logging(run_dir: Path | None, quiet: bool = False) -> None:
    """memfit.log in the run dir gets everything; the console gets INFO lines (not under the bar)."""
    logger = logging.getLogger("memfit")
    logger.setLevel(logging.INFO)
    for h in list(logger.handlers):
        logger.removeHandler(h)
        h.close()
    if run_dir is not None:
        record(run_dir, "memfit.log")
        fh = logging.FileHandler(run_dir / "memfit.log")
        fh.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
        logger.addHandler(fh)
    if not quiet:
        sh = _TqdmHandler()
        sh.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(sh)
    logger.propagate = False


def log_exception(exc: BaseException) -> Path | None:
    """Write `exc`'s full traceback (and its notes) to memfit.log only (the console gets one line from
    the caller); once per exception. Returns the log file, or None when there is none."""
    logger = logging.getLogger("memfit")
    files = [h for h in logger.handlers if isinstance(h, logging.FileHandler)]
    if not getattr(exc, "_memfit_logged", False):
        logger.error(f"unexpected error: {type(exc).__name__}: {exc}", exc_info=exc, extra={"file_only": True})
        try:
            exc._memfit_logged = True       # type: ignore[attr-defined]
        except AttributeError:
            pass
    return Path(files[0].baseFilename) if files else None


class _TqdmHandler(logging.Handler):
    def emit(self, record: logging.LogRecord) -> None:
        if getattr(record, "file_only", False):
            return
        from tqdm.auto import tqdm
        tqdm.write(self.format(record))



def report_to_problem(report_to: str) -> str | None:
    """None if the --report-to backend can be imported, else what to install."""
    import importlib.util
    module = {"tensorboard": "tensorboard", "wandb": "wandb"}.get(report_to)
    if module and importlib.util.find_spec(module) is None:
        return f"--report-to {report_to}: the {module} package is not installed (pip install {module})"
    return None


class _Reporter:
    """Forwards numeric metrics to TensorBoard or Weights & Biases (only when asked for)."""

    def __init__(self, kind: str, run_dir: Path) -> None:
        self.kind = kind
        record(run_dir, kind)    # tensorboard/ or wandb/
        if kind == "tensorboard":
            from torch.utils.tensorboard import SummaryWriter
            self.writer = SummaryWriter(str(run_dir / "tensorboard"))
        else:
            import wandb
            self.run = wandb.init(dir=str(run_dir), name=run_dir.name, resume="allow")

    def log(self, row: dict[str, Any]) -> None:
        values = {f"{row.get('kind', 'x')}/{k}": v for k, v in row.items()
                  if isinstance(v, (int, float)) and k != "step"}
        if self.kind == "tensorboard":
            for k, v in values.items():
                self.writer.add_scalar(k, v, row.get("step", 0))
            self.writer.flush()
        else:
            self.run.log(values, step=row.get("step", 0))


class History:
    """Rows of metrics, append-only on disk (and forwarded to --report-to, if set)."""

    def __init__(self, run_dir: Path | None, report_to: str = "none") -> None:
        self.path = run_dir / "history.jsonl" if run_dir else None
        if run_dir:
            record(run_dir, "history.jsonl")
        self.rows: list[dict[str, Any]] = []
        self._saved_rows: int | None = None     # row count of the checkpoint being resumed
        self.pending_losses: list[float] = []    # every step's loss since the last train row (for the plot)
        self.summary: dict[str, Any] = {}         # training_history.json's "summary" (the loop's + the job's)
        self.reporter = _Reporter(report_to, run_dir) if report_to != "none" and run_dir else None

    def append(self, row: dict[str, Any]) -> None:
        self.rows.append(row)
        if self.path:
            with open(self.path, "a") as f:
                f.write(json.dumps(row) + "\n")
        if self.reporter is not None:
            self.reporter.log(row)

    def load_until(self, step: int) -> None:
        """On resume: keep the rows written before the checkpoint of `step` (its row count, when the
        checkpoint holds one; else the rows up to and including `step`), rewrite the file without the
        rest. Rows written after the save carry step numbers up to `step` too (an OOM event of the next
        step, the evaluation of a deadline stop): the resumed run writes them again if they recur. The
        one exception is the stop row of a stop that landed on the step just saved (SIGTERM right after a
        scheduled save): it comes right after the checkpoint's rows, the resumed run never writes it
        again, so it stays. `step` 0 (a fresh start) keeps nothing."""
        rows: list[dict[str, Any]] = []
        limit, self._saved_rows = self._saved_rows, None
        if self.path and self.path.exists():
            for line in self.path.read_text().splitlines():
                if step <= 0:
                    break
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:
                    break  # a line cut by a kill: everything after it is gone too
                if row.get("step", 0) > step:
                    break
                if limit is not None and len(rows) >= limit:
                    if len(rows) == limit and row.get("kind") == "stop" and row.get("step") == step:
                        rows.append(row)
                        continue
                    break
                rows.append(row)
            tmp = self.path.with_suffix(".tmp")
            tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
            os.replace(tmp, self.path)
        self.rows = rows

    def step_loss(self, loss: float) -> None:
        """Record one step's loss; take_losses() returns (and clears) the losses since the last train row."""
        self.pending_losses.append(loss)

    def take_losses(self) -> list[float]:
        out, self.pending_losses = self.pending_losses, []
        return out

    def state_dict(self) -> dict[str, Any]:
        # the losses of steps after the last train row are saved too, so a resumed history is identical
        return {"rows": len(self.rows), "pending_losses": list(self.pending_losses)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        # Used by the load_until() that follows (the truncation also needs the step).
        self._saved_rows = int(state["rows"]) if state.get("rows") is not None else None
        self.pending_losses = [float(x) for x in state.get("pending_losses", [])]

    def write_summary(self, run_dir: Path, extra: dict[str, Any] | None = None) -> None:
        summary = {"train": [r for r in self.rows if r.get("kind") == "train"],
                   "eval": [r for r in self.rows if r.get("kind") == "eval"],
                   "events": [r for r in self.rows if r.get("kind") not in ("train", "eval")]}
        extra = dict(extra or {})
        self.summary.update(extra.pop("summary", {}))   # a job's own figures join the loop's
        summary.update(extra)
        summary["summary"] = self.summary
        record(run_dir, "training_history.json")
        tmp = run_dir / "training_history.json.tmp"
        tmp.write_text(json.dumps(summary, indent=1))
        os.replace(tmp, run_dir / "training_history.json")


def phase_bar(desc: str, total: int | None = None, unit: str = "it"):
    """The one bar of a phase that is not training (evaluation, merge, export): tqdm.auto, so a widget in
    a notebook and one line redrawn in place in a terminal, at most once a second (a log captured from a
    pipe holds a few redraws, not one per item). Off under --quiet (console.PHASE_BARS_OFF)."""
    from tqdm.auto import tqdm
    return tqdm(total=total, desc=desc, unit=unit, dynamic_ncols=True, mininterval=1.0,
                disable=console.PHASE_BARS_OFF)


class StageBar:
    """A phase made of a few named stages (merge: load, apply, merge, save): one bar whose postfix names
    the stage running; `done()` after each stage, `close()` at the end (or use it as a context manager)."""

    def __init__(self, desc: str, stages: list[str]) -> None:
        self.stages = list(stages)
        self.bar = phase_bar(desc, len(self.stages), "stage")
        self.bar.set_postfix_str(self.stages[0], refresh=False)

    def done(self) -> None:
        n = self.bar.n + 1
        self.bar.set_postfix_str(self.stages[n] if n < len(self.stages) else "done", refresh=False)
        self.bar.update(1)

    def __enter__(self) -> StageBar:
        return self

    def __exit__(self, *exc: object) -> None:
        self.bar.close()


class Progress:
    """tqdm.auto bar (a widget in notebooks) with loss, lr, tokens/s and memory in the postfix. Once the
    run is calibrated its measured pace (`step_s`) sets the bar's rate, so its ETA."""

    def __init__(self, total: int, initial: int, disable: bool) -> None:
        self.bar = _paced_bar()(total=total, initial=initial, disable=disable, dynamic_ncols=True,
                                desc="train", unit="step", smoothing=0.1)
        self.t0 = time.perf_counter()
        self.slow: dict[str, Any] = {}

    def update(self, step: int, slow: dict[str, Any] | None = None, step_s: float | None = None,
               **fast: Any) -> None:
        """Every step: the counter (so the rate and ETA) and the `fast` fields; the `slow` ones (loss,
        memory: device reads) are kept from the last call that gave them."""
        if slow is not None:
            self.slow = slow
        self.bar.step_s = step_s
        self.bar.set_postfix({**self.slow, **fast}, refresh=False)
        self.bar.update(step - self.bar.n)

    def close(self) -> None:
        self.bar.close()


def _paced_bar():
    """tqdm.auto's bar class whose rate (and so remaining time) is 1 / step_s when step_s is set."""
    from tqdm.auto import tqdm

    class PacedBar(tqdm):
        step_s: float | None = None

        @property
        def format_dict(self):
            d = super().format_dict
            if self.step_s:
                d["rate"] = 1.0 / self.step_s
            return d

    return PacedBar
