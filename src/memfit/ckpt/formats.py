"""The bytes of a checkpoint's files: streaming safetensors, weights_only-safe state trees, and the
hashing `Sink` every checkpoint file is written through.

Everything is written tensor by tensor through a `Sink` that hashes (sha256) and counts the bytes as
they go out, so a save never holds a second copy of the model in host RAM, the manifest's hashes cost no
extra read, and the disk budget can stop a save the moment it would overrun. Loading memory-maps the
files (copy-on-write), so a resume does not hold the checkpoint and the model in anonymous RAM at once.
"""

from __future__ import annotations

import hashlib
import json
import mmap
import os
import struct
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

CHUNK = 16 << 20


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used; the message names the file and what is wrong with it."""


class BudgetExceeded(RuntimeError):
    """Raised by a Sink when the next write would take the run directory past its disk budget."""


# ---------------------------------------------------------------- hashed, durable files

class Sink:
    """A write-only file wrapper that hashes and counts, and asks `budget(n)` before each write."""

    def __init__(self, f, budget: Callable[[int], None] | None = None,
                 hook: Callable[[int], None] | None = None) -> None:
        self.f, self.budget, self.hook = f, budget, hook
        self.sha = hashlib.sha256()
        self.n = 0
        self.error: BaseException | None = None

    def write(self, b) -> int:
        mv = memoryview(b).cast("B")
        if self.budget is not None:
            try:
                self.budget(len(mv))
            except BudgetExceeded as e:
                self.error = e      # torch.save's zip writer may mask it with its own error on exit
                raise
        self.sha.update(mv)
        self.f.write(mv)
        self.n += len(mv)
        if self.hook is not None:
            self.hook(self.n)
        return len(mv)

    def flush(self) -> None:
        self.f.flush()


def durable_file(path: Path, write: Callable[[Sink], None], budget=None, hook=None) -> dict:
    with open(path, "wb") as f:
        sink = Sink(f, budget, hook)
        try:
            write(sink)
        except Exception:
            if sink.error is not None:
                raise sink.error from None
            raise
        f.flush()
        os.fsync(f.fileno())
    return {"bytes": sink.n, "sha256": sink.sha.hexdigest()}


def sha256_file(path: Path) -> tuple[int, str]:
    h, n = hashlib.sha256(), 0
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
            n += len(chunk)
    return n, h.hexdigest()


# ---------------------------------------------------------------- safetensors, one tensor at a time

_ST_DTYPES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
              torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
              torch.uint8: "U8", torch.bool: "BOOL"}
for _name, _code in (("float8_e4m3fn", "F8_E4M3"), ("float8_e5m2", "F8_E5M2"), ("uint16", "U16"),
                     ("uint32", "U32"), ("uint64", "U64")):
    if hasattr(torch, _name):
        _ST_DTYPES[getattr(torch, _name)] = _code
_ST_CODES = {v: k for k, v in _ST_DTYPES.items()}


def split_tensors(state: dict[str, Any], what: str) -> tuple[dict[str, torch.Tensor], dict[str, str],
                                                             dict[str, Any]]:
    """(unique tensors, aliases {dup: canonical}, JSON-able extras) of a flat model state dict.

    Tied weights (GPT-2's lm_head = wte) share storage; safetensors refuses duplicates, so each tied
    tensor is written once and re-created as an alias on load."""
    tensors: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    extras: dict[str, Any] = {}
    seen: dict[tuple, str] = {}
    for k, v in state.items():
        if not isinstance(k, str):
            raise TypeError(f"{what}: keys must be strings (got {k!r})")
        if isinstance(v, torch.Tensor):
            if v.numel() > 0 and v.device.type != "meta":
                key = (v.device.type, v.untyped_storage().data_ptr(), v.storage_offset(), tuple(v.shape),
                       v.stride(), v.dtype)
                if key in seen:
                    aliases[k] = seen[key]
                    continue
                seen[key] = k
            if v.dtype not in _ST_DTYPES:
                raise TypeError(f"{what}: tensor {k!r} has dtype {v.dtype}, which safetensors cannot hold")
            tensors[k] = v
        else:
            try:
                json.dumps(v)
            except TypeError:
                raise TypeError(f"{what}: entry {k!r} is a {type(v).__name__}; the model part's state must "
                                "be tensors plus JSON-able values") from None
            extras[k] = v
    return tensors, aliases, extras


def _order(tensors: dict[str, torch.Tensor]) -> list[str]:
    # Largest element size first: with an 8-byte-aligned header every tensor then starts aligned.
    return sorted(tensors, key=lambda k: -tensors[k].element_size())


def write_safetensors(sink: Sink, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    """The safetensors format (8-byte header length, JSON header, raw bytes), streamed per tensor."""
    header: dict[str, Any] = {"__metadata__": metadata}
    offset = 0
    names = _order(tensors)
    for k in names:
        t = tensors[k]
        n = t.numel() * t.element_size()
        header[k] = {"dtype": _ST_DTYPES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + n]}
        offset += n
    hb = json.dumps(header, separators=(",", ":")).encode()
    hb += b" " * (-len(hb) % 8)
    sink.write(struct.pack("<Q", len(hb)))
    sink.write(hb)
    for k in names:
        t = tensors[k].detach()
        if t.numel() == 0:
            continue
        if t.device.type != "cpu":
            t = t.to("cpu")            # one tensor at a time: host RAM holds at most this one
        t = t.contiguous().reshape(-1).view(torch.uint8)
        buf = t.numpy()
        for i in range(0, len(buf), CHUNK):
            sink.write(buf[i:i + CHUNK])


def read_safetensors_header(path: Path) -> tuple[dict[str, Any], int]:
    size = path.stat().st_size
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise CheckpointError(f"{path.name}: truncated ({size} bytes, no header)")
        (n,) = struct.unpack("<Q", raw)
        if n > min(size - 8, 256 << 20):
            raise CheckpointError(f"{path.name}: header length {n} exceeds the file ({size} bytes)")
        try:
            header = json.loads(f.read(n))
        except ValueError as e:
            raise CheckpointError(f"{path.name}: unreadable header ({e})") from None
    return header, 8 + n


def load_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors backed by a private (copy-on-write) memory map of the file, plus the metadata."""
    header, start = read_safetensors_header(path)
    meta = header.pop("__metadata__", {}) or {}
    size = path.stat().st_size
    out: dict[str, torch.Tensor] = {}
    with open(path, "rb") as f:
        mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY) if size else None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for k, info in header.items():
            dtype = _ST_CODES.get(info["dtype"])
            if dtype is None:
                raise CheckpointError(f"{path.name}: tensor {k!r} has unknown dtype {info['dtype']}")
            b, e = info["data_offsets"]
            shape = info["shape"]
            if start + e > size:
                raise CheckpointError(f"{path.name}: tensor {k!r} lies past the end of the file")
            numel = int(np.prod(shape)) if shape else 1
            if e - b == 0 or numel == 0:
                out[k] = torch.empty(shape, dtype=dtype)
                continue
            t = torch.frombuffer(mm, dtype=dtype, count=numel, offset=start + b)
            out[k] = t.reshape(shape)
    return out, meta


# ---------------------------------------------------------------- weights_only-safe plain trees

_TAG = "__memfit_type__"


def to_plain(obj: Any, where: str = "state") -> Any:
    """Make a state tree loadable by `torch.load(weights_only=True)`: numpy arrays and scalars become
    tagged bytes / python scalars (restored by `from_plain`); unknown objects are refused by name."""
    if isinstance(obj, torch.Tensor):
        return obj.detach() if obj.requires_grad or isinstance(obj, torch.nn.Parameter) else obj
    if obj is None or isinstance(obj, (bool, int, float, complex, str, bytes, torch.dtype, torch.Size,
                                       torch.device)):
        return obj
    if isinstance(obj, dict):
        out = type(obj)() if type(obj) is not dict and hasattr(type(obj), "move_to_end") else {}
        for k, v in obj.items():
            out[to_plain(k, where)] = to_plain(v, f"{where}.{k}")
        return out
    if isinstance(obj, np.ndarray):
        if obj.dtype == object:
            raise TypeError(f"{where}: numpy object arrays cannot be saved safely")
        return {_TAG: "ndarray", "dtype": obj.dtype.str, "shape": list(obj.shape),
                "data": np.ascontiguousarray(obj).tobytes()}
    if isinstance(obj, np.generic):
        return {_TAG: "npscalar", "dtype": obj.dtype.str, "value": obj.item()}
    if isinstance(obj, (set, frozenset)):
        return {_TAG: "set", "items": [to_plain(v, where) for v in obj]}
    if isinstance(obj, tuple):
        return tuple(to_plain(v, f"{where}[{i}]") for i, v in enumerate(obj))  # namedtuples -> tuple
    if isinstance(obj, list):
        return [to_plain(v, f"{where}[{i}]") for i, v in enumerate(obj)]
    raise TypeError(f"{where}: cannot save a {type(obj).__module__}.{type(obj).__qualname__} in a checkpoint "
                    "(state_dict() must return tensors, numbers, strings, lists, tuples and dicts)")


def from_plain(obj: Any) -> Any:
    if isinstance(obj, dict):
        tag = obj.get(_TAG) if len(obj) <= 4 else None
        if tag == "ndarray":
            return np.frombuffer(obj["data"], dtype=np.dtype(obj["dtype"])).reshape(obj["shape"]).copy()
        if tag == "npscalar":
            return np.dtype(obj["dtype"]).type(obj["value"])
        if tag == "set":
            return {from_plain(v) for v in obj["items"]}
        out = type(obj)() if type(obj) is not dict and hasattr(type(obj), "move_to_end") else {}
        for k, v in obj.items():
            out[k] = from_plain(v)
        return out
    if isinstance(obj, tuple):
        return tuple(from_plain(v) for v in obj)
    if isinstance(obj, list):
        return [from_plain(v) for v in obj]
    return obj


def load_state_file(path: Path) -> dict[str, Any]:
    try:
        raw = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError:
        raw = torch.load(path, map_location="cpu", weights_only=True)   # file systems without mmap
    return from_plain(raw)


# ---------------------------------------------------------------- sizes

def tensor_bytes(obj: Any) -> int:
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(tensor_bytes(v) for v in obj)
    return 0


def tensor_stats(obj: Any) -> tuple[int, int]:
    """(bytes, count) of the tensors in a state tree (for predicting a checkpoint's size)."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size(), 1
    items = obj.values() if isinstance(obj, dict) else obj if isinstance(obj, (list, tuple)) else ()
    b = c = 0
    for v in items:
        vb, vc = tensor_stats(v)
        b, c = b + vb, c + vc
    return b, c
