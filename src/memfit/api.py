"""`memfit.fit`: memfit's loop for any nn.Module — precision, accumulation, checkpoints, OOM recovery,
deadline and exact resume — from a script or a notebook.

    result = memfit.fit(model, dataset, loss_fn=my_loss, output_dir="runs/student",
                        config={"batch_size": 8, "gradient_accumulation_steps": 4, "max_steps": 1000,
                                "lr": 3e-4, "save_every": 100}, resume="auto")

`loss_fn(model, batch) -> (loss_sum, count)`: the SUM of the loss over the batch and how many items it
covers; memfit divides by the count of the whole effective batch, so any micro-batch split (and OOM
recovery's re-split) gives the same gradient. The division comes before backward (fp16's GradScaler
needs the mean's magnitude): memfit estimates the count from the first micro-batch, or set
`loss_fn.count = lambda batch: ...` to give it exactly. A batch is a dict of tensors with the rows first.
`train_data` is a list / map-style Dataset of examples (batched with `collate_fn`, default
torch's default_collate) or an iterable of effective batches that has state_dict()/load_state_dict().

In a notebook: Ctrl-C (SIGINT) finishes the step, saves a full checkpoint and returns a result with
status "stopped"; call fit again with resume="auto" to continue. Each call releases the previous run's
optimizer state and gradients, also when it ended in an exception (a traceback kept by the notebook
would otherwise pin them).
"""

from __future__ import annotations

import dataclasses
import gc
import logging
import time
import weakref
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch

from memfit import config as C

log = logging.getLogger("memfit")
_previous: list[weakref.ref] = []     # the last run's Job: released when the next fit starts


@dataclass
class FitResult:
    status: str                        # finished | stopped (signal / deadline: resumable) | early_stopped
    step: int
    metrics: dict[str, float]
    run_dir: Path | None
    final_model: Path | None
    reason: str = ""
    history: list[dict[str, Any]] = field(default_factory=list)


class DatasetBatches:
    """Effective batches drawn from a map-style dataset in a (seed, epoch) permutation; state (epoch,
    position) resumes at the exact next example without touching the ones before it."""

    def __init__(self, dataset, rows: int, collate_fn: Callable | None, seed: int, shuffle: bool = True,
                 loop: bool = True) -> None:
        from torch.utils.data import default_collate
        self.dataset, self.rows, self.seed = dataset, rows, seed
        self.collate = collate_fn or default_collate
        self.shuffle, self.loop = shuffle, loop
        self.epoch, self.position = 0, 0

    def __len__(self) -> int:
        return -(-len(self.dataset) // self.rows)

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        n = len(self.dataset)
        while True:
            order = np.arange(n)
            if self.shuffle:
                order = np.random.default_rng([self.seed, self.epoch]).permutation(n)
            while self.position < n:
                idx = order[self.position:self.position + self.rows]
                self.position += len(idx)
                yield as_batch(self.collate([self.dataset[int(i)] for i in idx]))
            if not self.loop:
                self.position = 0
                return
            self.epoch, self.position = self.epoch + 1, 0

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "position": self.position, "size": len(self.dataset), "seed": self.seed}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["size"] != len(self.dataset):
            raise ValueError(f"the checkpoint's dataset had {state['size']} examples, "
                             f"this one {len(self.dataset)}")
        self.epoch, self.position = int(state["epoch"]), int(state["position"])


def as_batch(batch: Any) -> dict[str, torch.Tensor]:
    if not isinstance(batch, dict) or not all(torch.is_tensor(v) for v in batch.values()):
        raise TypeError(f"a batch must be a dict of tensors with the rows first "
                        f"(got {type(batch).__name__}); "
                        "return a dict from your dataset or collate_fn")
    return batch


def make_config(config: C.Config | dict | None, output_dir: str | Path | None, options: dict) -> C.Config:
    """A Config from a Config, a dict of nested or flat options ({"lr": 3e-4} or {"optim": {...}}),
    and keyword options on top; task "custom". Raises ConfigError listing every problem."""
    base = C.Config(task="custom")
    if isinstance(config, C.Config):
        base = dataclasses.replace(config, task="custom")
    elif config:
        base = C.from_dict(dict(config), base)
    cfg = C.from_dict(options, base) if options else base
    if output_dir is not None:
        cfg = cfg.replace(run={"output_dir": str(output_dir)})
    from memfit.hardware import with_platform
    return with_platform(C.with_job_defaults(cfg))


def release_previous() -> None:
    """Free what an earlier fit() left reachable (optimizer state, gradients), then the allocator cache."""
    while _previous:
        job = _previous.pop()()
        if job is not None:
            release(job)
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def release(job) -> None:
    if job.optimizer is not None:
        job.optimizer.state.clear()
        job.optimizer.zero_grad(set_to_none=True)
    job.model.zero_grad(set_to_none=True)


def fit(model: torch.nn.Module, train_data, loss_fn: Callable | None = None, eval_fn: Callable | None = None,
        config: C.Config | dict | None = None, output_dir: str | Path | None = None, *,
        eval_data=None, collate_fn: Callable | None = None,
        on_step: Callable[[int, dict], None] | None = None,
        **options) -> FitResult:
    """Train `model` in place with memfit's loop; returns a FitResult (the run's metrics and paths).

    eval_fn(model) -> {"metric": value, ...} (or a float: val_loss), run every `eval_every` steps and at
    the end under torch.no_grad(); eval_data: a dataset scored with loss_fn as val_loss instead.
    options: any config field by name (lr=3e-4, max_steps=500, resume="auto", precision="fp32", ...)."""
    from memfit.ckpt.state import seed_everything
    from memfit.jobs.common import assemble_job, common_problems, gradient_checkpointing_problem, steps_for
    from memfit.run_length import with_epoch_cadence
    from memfit.jobs.rundir import prepare_run_dir, run_dir_for
    from memfit.metrics import setup_logging
    from memfit.models.loss import causal_lm_loss

    release_previous()
    cfg = make_config(config, output_dir, options)
    run_dir = Path(cfg.run.output_dir) if cfg.run.output_dir else _fresh_dir(run_dir_for(cfg))
    problems = common_problems(cfg, run_dir)
    is_stream = hasattr(train_data, "state_dict") and hasattr(train_data, "load_state_dict")
    if not is_stream and not (hasattr(train_data, "__getitem__") and hasattr(train_data, "__len__")):
        problems.append(f"train_data: a {type(train_data).__name__} is neither a dataset (len + indexing) "
                        "nor a resumable iterable of batches (state_dict/load_state_dict); a plain "
                        "DataLoader cannot resume exactly: pass its dataset and collate_fn instead")
    elif not is_stream and len(train_data) == 0:
        problems.append("train_data is empty")
    if is_stream and cfg.train.max_steps is None and not hasattr(train_data, "__len__"):
        problems.append("train_data is an iterable without len(): give max_steps")
    if cfg.train.gradient_checkpointing and gradient_checkpointing_problem(model):
        problems.append(gradient_checkpointing_problem(model))
    if cfg.budget.auto_fit:   # the planner shapes the models memfit builds or loads, not any nn.Module
        problems.append("auto_fit: memfit.fit trains your own module, which the planner cannot shape; give "
                        "batch_size (and the other knobs) yourself, or plan a memfit model with `memfit plan`")
    if problems:
        raise C.ConfigError(problems)
    prepare_run_dir(cfg, run_dir)
    setup_logging(run_dir, cfg.run.quiet)
    seed_everything(cfg.train.seed)

    from memfit.device import detect
    device = detect()
    eff = cfg.effective_batch()
    data = train_data if is_stream else DatasetBatches(train_data, eff, collate_fn, cfg.train.seed)
    # (an iterable without len() has no epoch: validation required max_steps for it)
    total_steps = steps_for(cfg, len(data)) if hasattr(data, "__len__") else cfg.train.max_steps
    if hasattr(data, "__len__"):
        cfg = with_epoch_cadence(cfg, len(data))
    loss = loss_fn or causal_lm_loss
    job = assemble_job(cfg, model, data, total_steps, device, run_dir, loss_fn=loss)
    _previous.append(weakref.ref(job))
    job.hooks.on_step = on_step
    if eval_fn is not None or eval_data is not None:
        job.hooks.evaluate = partial(_evaluate, job, eval_fn, eval_data, collate_fn, eff, loss)
    job.hooks.export = partial(_export, model, run_dir / "final_model")
    try:
        result = _train(job)
        return FitResult(result.status, result.step, result.metrics, run_dir, result.final_model,
                         result.reason, list(job.history.rows))
    except BaseException as e:
        # A notebook keeps the last traceback (sys.last_traceback): its frames' locals would pin this
        # run's activations and batches until the next error. The lines stay, the locals go.
        import traceback
        traceback.clear_frames(e.__traceback__)
        raise
    finally:
        release(job)
        del job          # the frame stays in a kept traceback; the job (and its partials) must not
        gc.collect()


def _fresh_dir(path: Path) -> Path:
    n, p = 1, path
    while p.exists():
        n += 1
        p = path.with_name(f"{path.name}-{n}")
    return p


def _train(job):
    """train() under the SIGINT/SIGTERM handlers (Ctrl-C in a notebook included): stop, save, return."""
    from memfit.train.finish import record_result
    from memfit.train.loop import train
    from memfit.train.signals import GracefulInterrupt
    with GracefulInterrupt(log=log.warning) as interrupt:
        job.interrupt = interrupt
        result = record_result(job, train(job))
    if job.checkpointer is not None:
        job.checkpointer.wait()
    if result.status == "stopped":
        log.warning(f"memfit: stopped resumably at step {result.step} ({result.reason}); call fit(...) again "
                    f"with output_dir={str(job.run_dir)!r}, resume='auto' to continue")
    return result


@torch.no_grad()
def _evaluate(job, eval_fn, eval_data, collate_fn, rows: int, loss_fn) -> dict[str, float]:
    model = job.model
    was_training = model.training
    model.eval()
    try:
        if eval_fn is not None:
            out = eval_fn(model)
            return {"val_loss": float(out)} if isinstance(out, (int, float, torch.Tensor)) else \
                {k: (float(v) if isinstance(v, (int, float, torch.Tensor)) else v) for k, v in out.items()}
        from memfit.train.step import micro_batches
        total, count = 0.0, 0
        for batch in DatasetBatches(eval_data, rows, collate_fn, 0, shuffle=False, loop=False):
            for mb in micro_batches(batch, job.oom.micro_batch_size):
                mb = {k: v.to(job.device.torch_device) for k, v in mb.items()}
                with job.precision.autocast():
                    s, n = loss_fn(model, mb)
                total, count = total + float(s), count + int(n)
        return {"val_loss": total / max(count, 1)}
    finally:
        model.train(was_training)


def _export(model: torch.nn.Module, out: Path) -> Path:
    """An HF model's own format; any other module: model.safetensors of its state_dict (tied tensors once)."""
    if hasattr(model, "save_pretrained"):
        from memfit.export import export_hf
        return export_hf(model, None, out)
    import os

    from safetensors.torch import save_model

    from memfit.atomic import rmtree, swap_in
    tmp = out.with_name(out.name + f".tmp-{os.getpid()}")
    rmtree(tmp)
    tmp.mkdir(parents=True)
    try:
        save_model(model, str(tmp / "model.safetensors"))
        (tmp / "README.txt").write_text(f"{type(model).__name__} weights, "
                                        f"saved {time.strftime('%Y-%m-%d %H:%M')}.\n"
                                        "Load: safetensors.torch.load_model(model, 'model.safetensors')\n")
    except BaseException:
        rmtree(tmp)
        raise
    swap_in(tmp, out)        # the previous `out` stays until the new one is complete and in place
    return out
