"""Which process of a torchrun job this is (RANK / WORLD_SIZE / LOCAL_RANK), read without importing torch.

`current()` is the one place the rest of memfit (the jobs, the planner, memfit.fit) learns the world size:
1 for a plain process, N under `torchrun` or `memfit ... --nproc N`.
"""

from __future__ import annotations

import ctypes
import os
import signal
from collections.abc import Mapping
from dataclasses import dataclass

PR_SET_PDEATHSIG = 1


@dataclass(frozen=True)
class World:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0: the only writer of checkpoints, history, plots and final_model/, and the only bar."""
        return self.rank == 0


def from_env(environ: Mapping[str, str] | None = None) -> World:
    env = os.environ if environ is None else environ
    try:
        size = int(env.get("WORLD_SIZE", "1"))
        rank = int(env.get("RANK", "0"))
        local = int(env.get("LOCAL_RANK", str(rank)))
    except ValueError:
        return World()
    if size <= 1:
        return World()
    return World(rank, size, local)


def current() -> World:
    """This process's place in the job (World() outside torchrun)."""
    return from_env()


def global_batch(cfg) -> int:
    """The effective batch of THIS job (a Config): micro x accumulation x the ranks of the torchrun job it
    runs in. Every job reads it here, so every rank reads the same global batch from the data."""
    return cfg.effective_batch(current().world_size)


def die_with_parent(sig: int = signal.SIGTERM) -> None:
    """Ask Linux to send `sig` when the parent (torchrun, or memfit's launcher) dies, so a SIGKILLed
    launcher leaves no worker holding the run directory's lock. SIGTERM: the worker stops at the next
    step and saves, like any SIGTERM. A no-op where prctl does not exist."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        parent = os.getppid()
        libc.prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0)
    except (OSError, AttributeError):
        return
    if os.getppid() != parent:        # the parent died before prctl took effect
        os.kill(os.getpid(), sig)
