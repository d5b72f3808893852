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
    from memfit.jobs.common import assemble_job, gradient_checkpointing_problem, run_job, run_length, start_run
    from memfit.jobs.rundir import run_dir_for
    from memfit.models.loss import lm_loss

    release_previous()
    cfg = make_config(config, output_dir, options)
    is_stream = hasattr(train_data, "state_dict") and hasattr(train_data, "load_state_dict")

    def fit_problems(cfg: C.Config, run_dir: Path) -> list[str]:
        problems = []
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
            problems.append("auto_fit: memfit.fit trains your own module, which the planner cannot shape; "
                            "give batch_size (and the other knobs) yourself, or plan a memfit model with "
                            "`memfit plan`")
        return problems

    start = start_run(cfg, fit_problems,
                      Path(cfg.run.output_dir) if cfg.run.output_dir else _fresh_dir(run_dir_for(cfg)),
                      planned=False)
    cfg, run_dir = start.cfg, start.run_dir
    from memfit.dist.env import global_batch
    eff = global_batch(cfg)      # micro x accumulation x ranks
    data = train_data if is_stream else DatasetBatches(train_data, eff, collate_fn, cfg.train.seed)
    # (an iterable without len() has no epoch: validation required max_steps for it)
    cfg, total_steps = run_length(cfg, len(data) if hasattr(data, "__len__") else None)
    loss = loss_fn or lm_loss(cfg.train.chunked_loss)
    job = assemble_job(cfg, model, data, total_steps, start.device, run_dir, loss_fn=loss)
    _previous.append(weakref.ref(job))
    job.hooks.on_step = on_step
    if eval_fn is not None or eval_data is not None:
        job.hooks.evaluate = partial(_evaluate, job, eval_fn, eval_data, collate_fn, eff)
    job.hooks.export = partial(_export, model, run_dir / "final_model")
    try:
        result = run_job(job, _announce)
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


def _announce(job, result) -> None:
    """How to continue a stopped fit (run_job's last words; the CLI prints its command instead)."""
    if result.status == "stopped":
        log.warning(f"memfit: stopped resumably at step {result.step} ({result.reason}); call fit(...) again "
                    f"with output_dir={str(job.run_dir)!r}, resume='auto' to continue")


def _evaluate(job, eval_fn, eval_data, collate_fn, rows: int) -> dict[str, float]:
    """eval_fn(model) as given (its own batching, under no_grad), else THE evaluation of eval_data with
    the job's loss (OOM-safe: an OOM shrinks the eval micro-batch and redoes the batch)."""
    if eval_fn is not None:
        model = job.model
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                out = eval_fn(model)
        finally:
            model.train(was_training)
        return {"val_loss": float(out)} if isinstance(out, (int, float, torch.Tensor)) else \
            {k: (float(v) if isinstance(v, (int, float, torch.Tensor)) else v) for k, v in out.items()}
    from memfit.train.evaluate import job_loss
    val = DatasetBatches(eval_data, rows, collate_fn, 0, shuffle=False, loop=False)
    return {"val_loss": job_loss(job, iter(val))["val_loss"]}


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
