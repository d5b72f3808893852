"""The run start on N ranks (torchrun): rank 0 does it alone (validation, plan gate, the run directory),
then tells the others the outcome, so every rank exits with the same code (2, 3) or starts the same job.
Ranks other than 0 write nothing into the run directory: they log to the console only at warnings.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from memfit import config as C
from memfit.device import DeviceInfo, DoesNotFit
from memfit.dist import group
from memfit.dist.env import World, current

log = logging.getLogger("memfit")


def join(device: DeviceInfo) -> World:
    """Join the torchrun job when there is one (gloo on CPU, nccl on CUDA); World() otherwise."""
    return group.init(device.type, current())


def start_together(world: World, start: Callable[[], Any], device: DeviceInfo, run_dir: Path, make_start):
    """Rank 0 runs `start()` (the whole run start); the others wait for its outcome: the same problems
    raised (exit 2 / 3 on every rank), or the config rank 0 settled on (--auto-fit's choices too)."""
    if world.is_main:
        try:
            started = start()
        except (C.ConfigError, DoesNotFit) as e:
            group.broadcast(("error", e))
            raise
        group.broadcast(("ok", started.cfg))
        return started
    kind, value = group.broadcast(None)
    if kind == "error":
        raise value
    from memfit.ckpt.state import seed_everything
    from memfit.metrics import quiet_libraries, setup_logging
    setup_logging(None, quiet=True)
    logging.getLogger("memfit").setLevel(logging.WARNING)
    quiet_libraries(value.run.verbose, quiet=True)    # rank 0 alone shows bars
    seed_everything(value.train.seed)    # the same model initialisation as rank 0 (DDP broadcasts it too)
    return make_start(value, run_dir, device)


def shared_tokenizer(cfg: C.Config, tok_dir: Path):
    """Rank 0 builds the tokenizer into the run directory; the others load what it wrote."""
    from memfit.data import build_tokenizer
    from memfit.runfiles import record
    world = current()
    with group.rank_zero_first():
        if world.is_main:
            record(tok_dir.parent, tok_dir.name)
            return build_tokenizer(cfg, tok_dir)
        from memfit.data.tokenizer import load_local_tokenizer
        return load_local_tokenizer(str(tok_dir))
