"""Training on N ranks (DistributedDataParallel): what train() does differently, as a few hooks.

    every rank reads the SAME global effective batch from the stream (so the data position, and its
    exact resume, do not depend on the world size) and trains on rows r::N of it;
    each micro-step runs under DDP's no_sync (no collective inside a forward/backward that an OOM can
    cut), then the ranks agree on "did anyone run out of memory" (all shrink together and redo the
    step), then the gradients are summed once over the ranks;
    the loss of a micro-batch is divided by the label-token count of the whole GLOBAL batch (counted on
    the global batch every rank holds, before any backward), so the summed gradient equals the
    1-process gradient of the same batch exactly (up to float summation order);
    stops (signal, deadline, early stopping, a full disk) and saves are agreed by one all-reduce;
    rank 0 alone writes checkpoints, history, plots and final_model/; each rank's RNG state is
    gathered into rank 0's checkpoints before a save and handed back on resume.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable
from typing import Any

import torch

from memfit.ckpt.state import RNGState
from memfit.dist import group
from memfit.dist.env import World
from memfit.train.step import Batch, StepStats, declared_count

log = logging.getLogger("memfit")


class RankStates:
    """Registry part `ranks` (rank 0): every rank's RNG state as of the last gather, with its step."""

    def __init__(self) -> None:
        self.state: dict[str, Any] = {}

    def state_dict(self) -> dict[str, Any]:
        return dict(self.state)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.state = dict(state)


class DistTraining:
    def __init__(self, world: World, model: torch.nn.Module, device: torch.device) -> None:
        self.world = world
        self.model = model
        self.ddp: torch.nn.Module | None = None     # wrapped after resume (DDP broadcasts rank 0's weights)
        self.device = device
        self.ranks = RankStates()

    # --- start: one state on every rank ---------------------------------------------------------
    def share_resume(self, registry, start_step: int) -> int:
        """Rank 0 resumed (or started fresh): every other rank loads the same state (all parts but the
        weights, which DDP broadcasts), then its own RNG state if the checkpoint holds one."""
        state = None
        if self.world.is_main:
            state = {k: v for k, v in registry.state_dict().items() if k != "model"} if start_step else {}
        state = group.broadcast(state)
        start_step = group.broadcast(start_step)
        if not self.world.is_main and state:
            registry.load_state_dict(state, strict=False)
        rngs = (state or {}).get("ranks", {})
        if start_step and rngs.get("step") == start_step and self.world.rank < len(rngs.get("rng", [])):
            RNGState().load_state_dict(rngs["rng"][self.world.rank])
        elif start_step and self.world.rank:
            log.info(f"rank {self.world.rank}: the checkpoint holds no RNG state of this rank; "
                     "continuing from rank 0's")
        from torch.nn.parallel import DistributedDataParallel as DDP
        ids = [self.device.index or 0] if self.device.type == "cuda" else None
        # broadcast_buffers=False: no collective inside a forward an OOM can interrupt (torch 2.13 warns it
        # is deprecated; its replacement still syncs at init, which is what we avoid: silenced once per rank)
        import warnings
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*broadcast_buffers.*", category=FutureWarning)
            self.ddp = DDP(self.model, device_ids=ids, broadcast_buffers=False)
        return start_step

    # --- one step --------------------------------------------------------------------------------
    def shard(self, batch: Batch) -> Batch:
        """Rows r::N of the global effective batch (rank r)."""
        r, n = self.world.rank, self.world.world_size
        return {k: v[r::n] if torch.is_tensor(v) and v.dim() > 0 else v for k, v in batch.items()}

    def global_count(self, loss_fn, batch: Batch) -> int | None:
        """The label-token count of the whole global batch (None: the loss declares no count)."""
        return declared_count(loss_fn, batch)

    def micro_context(self) -> contextlib.AbstractContextManager:
        return self.ddp.no_sync()

    def agree(self, flag: bool) -> bool:
        return group.agree(flag)

    def reduce_step(self, stats: StepStats, params: Callable[[], list[torch.nn.Parameter]]) -> StepStats:
        """After the agreed successful accumulation: loss and count summed over the ranks, each rank's
        gradients put on the global count's scale (a loss whose count was estimated), then summed."""
        loss_sum, tokens, rows = group.all_sum([stats.loss_sum, float(stats.tokens), float(stats.rows)])
        grads = [p for p in params() if p.requires_grad]
        if stats.denom and tokens > 0 and stats.denom != tokens:
            for p in grads:
                if p.grad is not None:
                    p.grad.mul_(stats.denom / tokens)
        group.sum_gradients(grads)
        return StepStats(loss_sum, int(tokens), stats.micro_steps, int(rows), denom=tokens)

    # --- decisions -------------------------------------------------------------------------------
    def agree_flags(self, flags: list[bool]) -> list[bool]:
        return group.agree_flags(flags)

    def gather_rng(self, step: int) -> None:
        """Every rank's RNG state into rank 0's next checkpoint (a collective: all ranks call it)."""
        rngs = group.gather(RNGState().state_dict())
        if self.world.is_main:
            self.ranks.state = {"step": step, "rng": rngs}

    def done(self) -> None:
        """The end: wait until rank 0 has finished its writes (torchrun tears down the others when one
        rank exits first with a non-zero code)."""
        group.barrier()
