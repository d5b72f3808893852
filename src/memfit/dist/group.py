"""The process group and the few collectives memfit uses: every decision that changes what the ranks do
next (an OOM, a stop, a save) is agreed by one all-reduce of flags, so no rank is left waiting in a
collective that the others never enter.

gloo on CPU, nccl on CUDA (the device layer says which). Every collective here runs outside the
forward/backward that an OOM can interrupt, so the ranks always reach them in the same order.
"""

from __future__ import annotations

import contextlib
import datetime
import os
from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as dist

from memfit.dist.env import World, current, die_with_parent

TIMEOUT_ENV = "MEMFIT_DIST_TIMEOUT_S"     # how long a collective may wait for a rank (default 30 min)


def init(device_type: str, world: World | None = None) -> World:
    """Join the torchrun job (idempotent); returns this process's World (World() when not distributed)."""
    world = world or current()
    if not world.distributed or dist.is_initialized():
        return world
    die_with_parent()
    timeout = datetime.timedelta(seconds=float(os.environ.get(TIMEOUT_ENV, "1800")))
    if device_type == "cuda":
        from memfit.device import use_cuda_device
        use_cuda_device(world.local_rank)
        dist.init_process_group("nccl", timeout=timeout, device_id=torch.device("cuda", world.local_rank))
    else:
        dist.init_process_group("gloo", timeout=timeout)
    return world


def active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" \
        else torch.device("cpu")


def agree_flags(flags: list[bool]) -> list[bool]:
    """Each flag True on every rank if it is True on any rank (one all-reduce MAX)."""
    if not active():
        return list(flags)
    t = torch.tensor([1 if f else 0 for f in flags], dtype=torch.int32, device=_device())
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return [bool(v) for v in t.tolist()]


def agree(flag: bool) -> bool:
    """True on every rank when any rank says True: the OOM decision, the stops."""
    return agree_flags([flag])[0]


def all_sum(values: list[float]) -> list[float]:
    """Element-wise sums over the ranks (float64, so token counts stay exact)."""
    if not active():
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=_device())
    dist.all_reduce(t)
    return t.tolist()


def broadcast(obj: Any = None) -> Any:
    """Rank 0's `obj` on every rank (pickled: small things and the resumed state)."""
    if not active():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather(obj: Any) -> list[Any] | None:
    """Every rank's `obj`, in rank order, on rank 0 (None elsewhere)."""
    if not active():
        return [obj]
    out: list[Any] | None = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    dist.gather_object(obj, out, dst=0)
    return out


def barrier() -> None:
    if active():
        dist.barrier()


@contextlib.contextmanager
def rank_zero_first() -> Iterator[None]:
    """Rank 0 runs the block (writes a file), then the others run it (read what rank 0 wrote)."""
    main = not active() or dist.get_rank() == 0
    if not main:
        barrier()
    yield
    if main:
        barrier()


def sum_gradients(params: list[torch.nn.Parameter], bucket_bytes: int = 25 << 20) -> None:
    """Sum .grad over the ranks in ~25 MB flat buckets (the size DDP uses); a missing grad counts as 0
    on that rank (the others may have one)."""
    if not active():
        return
    bucket: list[torch.nn.Parameter] = []
    size = 0
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        bucket.append(p)
        size += p.grad.numel() * p.grad.element_size()
        if size >= bucket_bytes:
            _reduce_bucket(bucket)
            bucket, size = [], 0
    if bucket:
        _reduce_bucket(bucket)


def _reduce_bucket(bucket: list[torch.nn.Parameter]) -> None:
    from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors
    grads = [p.grad for p in bucket]
    flat = _flatten_dense_tensors(grads)
    dist.all_reduce(flat)
    for g, r in zip(grads, _unflatten_dense_tensors(flat, grads)):
        g.copy_(r)


def close() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
