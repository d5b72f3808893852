"""What the loop runs (`Job`) and what it returns (`TrainResult`): the contract between memfit.jobs, which
assembles a job, and memfit.train, which runs it. Its own module so the loop and its finish
(train/loop.py, train/finish.py) both depend on it and never on each other in a circle.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import torch

from memfit.ckpt.state import StateRegistry, ValueState
from memfit.config import Config
from memfit.device import DeviceInfo
from memfit.dist.env import World
from memfit.metrics import History
from memfit.models.loss import causal_lm_loss
from memfit.precision import Precision
from memfit.train.oom import OOMController
from memfit.train.step import Batch, LossFn

if TYPE_CHECKING:    # annotations only: the checkpointer and the deadline are built by memfit.jobs
    from memfit.ckpt.checkpointer import Checkpointer
    from memfit.train.calibrate import Calibration
    from memfit.train.ddp import DistTraining
    from memfit.train.deadline import Deadline
    from memfit.train.signals import GracefulInterrupt

EXIT_OK, EXIT_NOTHING_SAVED, EXIT_STOPPED = 0, 1, 75


class TrainData(Protocol):
    """The training stream: effective batches (the rows of one optimizer step), resumable exactly."""

    def __iter__(self) -> Iterator[Batch]: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


@dataclass
class Hooks:
    """What a job kind adds to the loop; each one optional."""
    evaluate: Callable[[], dict[str, float]] | None = None   # -> {"val_loss": ..., ...}
    sample: Callable[[], str] | None = None                  # a generation shown at each eval
    export: Callable[[], Path] | None = None                 # final_model/ writer
    finalize: Callable[[], dict] | None = None   # after the export: the job's summary (e.g. full validation)
    on_step: Callable[[int, dict], None] | None = None       # tests and callbacks


@dataclass
class Cadence:
    """How often the loop logs and evaluates, and whether it draws the bar."""
    log_every: int = 10
    eval_every: int = 0
    quiet: bool = False


@dataclass
class Job:
    """Everything the loop touches. Built by memfit.jobs.common (CLI) or memfit.api.fit (any nn.Module)."""
    cfg: Config
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    precision: Precision
    device: DeviceInfo
    train_data: TrainData
    total_steps: int
    registry: StateRegistry
    history: History
    counters: ValueState                                     # step, tokens, epoch, elapsed (+ examples)
    oom: OOMController                                       # training's micro-batch / OOM recovery
    eval_oom: OOMController                                  # evaluation's own micro-batch / OOM recovery
    run_dir: Path | None = None
    loss_fn: LossFn = causal_lm_loss
    checkpointer: Checkpointer | None = None
    deadline: Deadline | None = None
    interrupt: GracefulInterrupt | None = None               # set by memfit.jobs.common.run_job
    calibration: Calibration | None = None                   # the plan's figures (jobs); else train() makes one
    hooks: Hooks = field(default_factory=Hooks)
    cadence: Cadence = field(default_factory=Cadence)
    world: World = field(default_factory=World)              # rank / world size (dist/env.py): the planner reads it
    dist: DistTraining | None = None                         # N ranks: DDP and the agreed decisions (train/ddp.py)


@dataclass
class TrainResult:
    status: str                 # finished | stopped (deadline / signal / full disk) | early_stopped | not_saved
    exit_code: int
    step: int
    metrics: dict[str, float] = field(default_factory=dict)
    final_model: Path | None = None
    reason: str = ""
