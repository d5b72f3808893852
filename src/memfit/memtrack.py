"""Exact live tensor bytes on any device, for measuring memory on a CPU.

Process RSS does not measure tensors (the allocator keeps freed pages, Python keeps arenas), so
memory truth on CPU is the sum of the bytes of live tensor storages. A TorchDispatchMode sees every
op's outputs; each new storage is counted once and uncounted by a weakref finalizer when torch
frees it (storages keep their Python object alive while the C++ storage lives, so the finalizer
fires exactly at the free). Storages that exist before entering (parameters, optimizer state) are
found with a gc scan so the figure is "everything live", like torch.cuda.memory_allocated().
"""

from __future__ import annotations

import gc
import warnings
import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


class LiveTensorTracker(TorchDispatchMode):
    """with LiveTensorTracker() as t: ...; t.peak_bytes, t.current_bytes; t.reset_peak()."""

    def __init__(self, device: str | None = None, count_existing: bool = True) -> None:
        super().__init__()
        self.device = device
        self.count_existing = count_existing
        self.current_bytes = 0
        self.peak_bytes = 0
        self._seen: dict[int, int] = {}  # id(storage object) -> nbytes

    def _add(self, t: torch.Tensor) -> None:
        if not isinstance(t, torch.Tensor) or t.is_meta:
            return
        if self.device is not None and t.device.type != self.device:
            return
        try:
            st = t.untyped_storage()
        except (RuntimeError, NotImplementedError):
            return
        key = id(st)
        if key in self._seen:
            return
        n = st.nbytes()
        self._seen[key] = n
        self.current_bytes += n
        weakref.finalize(st, self._free, key)

    def _free(self, key: int) -> None:
        self.current_bytes -= self._seen.pop(key, 0)

    def reset_peak(self) -> None:
        self.peak_bytes = self.current_bytes

    def __enter__(self):
        if self.count_existing:
            gc.collect()
            with warnings.catch_warnings():  # isinstance() on deprecated module objects warns
                warnings.simplefilter("ignore")
                objs = [o for o in gc.get_objects() if isinstance(o, torch.Tensor)]
            for obj in objs:
                try:
                    if isinstance(obj, torch.Tensor):
                        self._add(obj)
                        if obj.grad is not None:
                            self._add(obj.grad)
                except ReferenceError:
                    pass
        self.peak_bytes = self.current_bytes
        return super().__enter__()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                self._add(t)
        if self.current_bytes > self.peak_bytes:
            self.peak_bytes = self.current_bytes
        return out


class ByteLimit(LiveTensorTracker):
    """A LiveTensorTracker that raises torch.OutOfMemoryError once live tensor bytes exceed `limit`: the
    CPU analogue of the CUDA allocator refusing a block, so OOM recovery runs its real code path."""

    def __init__(self, limit: int, device: str | None = None, count_existing: bool = True) -> None:
        super().__init__(device=device, count_existing=count_existing)
        self.limit = limit

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = super().__torch_dispatch__(func, types, args, kwargs)
        if self.current_bytes > self.limit:
            raise torch.OutOfMemoryError(f"injected: {self.current_bytes} live bytes > {self.limit}")
        return out
