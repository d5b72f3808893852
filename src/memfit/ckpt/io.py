"""Bytes on disk: streaming safetensors, weights_only-safe state files, manifests, fsync, verification.

Everything here writes tensor by tensor through a `Sink` that hashes (sha256) and counts the bytes as
they go out, so a save never holds a second copy of the model in host RAM, the manifest's hashes cost no
extra read, and the disk budget can stop a save the moment it would overrun. Loading memory-maps the
files (copy-on-write), so a resume does not hold the checkpoint and the model in anonymous RAM at once.
"""

from __future__ import annotations

import hashlib
import json
import mmap
import os
import signal
import struct
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from memfit.atomic import atomic_write_text, fsync_dir

MANIFEST = "manifest.json"
MODEL_FILE = "model.safetensors"
MODEL_INDEX = "model.safetensors.index.json"
STATE_FILE = "state.pt"
FORMAT = "memfit-checkpoint"
FORMAT_VERSION = 1
KILL_ENV = "MEMFIT_TEST_KILL_DURING_SAVE"      # "N" or "N:phase": SIGKILL self during the N-th save
KILL_MARKER_ENV = "MEMFIT_TEST_KILL_MARKER"    # where to write the marker (default run_dir/KILLED_DURING_SAVE)

_CHUNK = 16 << 20


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used; the message names the file and what is wrong with it."""


class BudgetExceeded(RuntimeError):
    """Raised by a Sink when the next write would take the run directory past its disk budget."""


# ---------------------------------------------------------------- durable writes

def dir_bytes(path: Path) -> int:
    """Apparent size of every file under `path` (links not followed)."""
    total = 0
    for root, _dirs, files in os.walk(path):
        for name in files:
            try:
                total += os.lstat(os.path.join(root, name)).st_size
            except OSError:
                pass  # deleted while walking (rotation, mirror)
    return total


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


def _durable_file(path: Path, write: Callable[[Sink], None], budget=None, hook=None) -> dict:
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
        while chunk := f.read(_CHUNK):
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
        for i in range(0, len(buf), _CHUNK):
            sink.write(buf[i:i + _CHUNK])


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


# ---------------------------------------------------------------- the test-only kill hook

class KillSwitch:
    """MEMFIT_TEST_KILL_DURING_SAVE=N[:phase]: SIGKILL this process during its N-th save.

    phase: `model` (after model.safetensors), `state` (half-way through state.pt, the default),
    `manifest` (everything written and fsynced, before the rename), `delete` (after the save, half-way
    through deleting the checkpoint that the keep-K rotation drops). A marker file is written first so
    a test can assert that the kill really happened inside a save."""

    def __init__(self, run_dir: Path) -> None:
        spec = os.environ.get(KILL_ENV, "").strip()
        self.save_no, self.phase = 0, "state"
        if spec:
            n, _, phase = spec.partition(":")
            self.save_no = int(n)
            self.phase = phase or "state"
        self.marker = Path(os.environ.get(KILL_MARKER_ENV) or run_dir / "KILLED_DURING_SAVE")
        self.count = 0

    def armed(self) -> bool:
        return self.save_no > 0 and self.count == self.save_no

    def maybe_kill(self, phase: str, step: int, tmp: Path) -> None:
        if not (self.armed() and phase == self.phase):
            return
        with open(self.marker, "w") as f:
            json.dump({"step": step, "phase": phase, "pid": os.getpid(), "tmp": str(tmp),
                       "time": time.time()}, f)
            f.flush()
            os.fsync(f.fileno())
        os.kill(os.getpid(), signal.SIGKILL)


    def midway_delete(self, step: int, path: Path) -> None:
        """phase `delete`: remove one file of `path` (a directory being deleted), then SIGKILL."""
        if not (self.armed() and self.phase == "delete"):
            return
        first = next((p for p in sorted(path.iterdir()) if p.name != MANIFEST), None)
        if first is not None:
            first.unlink()
        self.maybe_kill("delete", step, path)


# ---------------------------------------------------------------- checkpoint directories

def write_checkpoint_dir(tmp: Path, *, step: int, kind: str, model_state: dict[str, Any],
                         other_state: dict[str, Any] | None, budget: Callable[[int], None] | None,
                         kill: KillSwitch | None = None, max_shard_bytes: int = 2 << 30,
                         extra_files: dict[str, bytes] | None = None,
                         extra_manifest: dict | None = None) -> dict:
    """Write model weights (+ state.pt for a full checkpoint), any `extra_files` and the manifest
    (written last: its presence means the rest is complete) into `tmp`; fsync all.

    Returns the manifest. The caller verifies and renames `tmp` into place."""
    tmp.mkdir(parents=True, exist_ok=False)
    tensors, aliases, extras = split_tensors(model_state, "model")
    files: dict[str, dict] = {}
    meta = {"format": "pt", "memfit_step": str(step)}
    if aliases:
        meta["memfit_aliases"] = json.dumps(aliases)
    if extras:
        meta["memfit_extras"] = json.dumps(extras)

    shards = _shard(tensors, max_shard_bytes)
    if len(shards) == 1:
        files[MODEL_FILE] = _durable_file(tmp / MODEL_FILE,
                                          lambda s: write_safetensors(s, tensors, meta), budget)
        model_files = [MODEL_FILE]
    else:
        weight_map: dict[str, str] = {}
        model_files = []
        for i, names in enumerate(shards):
            fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            part = {k: tensors[k] for k in names}
            files[fname] = _durable_file(tmp / fname, lambda s, p=part: write_safetensors(s, p, meta), budget)
            weight_map.update({k: fname for k in names})
            model_files.append(fname)
        index = {"metadata": {"total_size": sum(t.numel() * t.element_size() for t in tensors.values()),
                              **meta}, "weight_map": weight_map}
        text = json.dumps(index, indent=1).encode()
        files[MODEL_INDEX] = _durable_file(tmp / MODEL_INDEX, lambda s: s.write(text), budget)
    if kill is not None:
        kill.maybe_kill("model", step, tmp)

    if kind == "full":
        plain = to_plain(other_state or {}, "state")
        hook = None
        if kill is not None and kill.armed() and kill.phase == "state":
            half = max(1, _tensor_bytes(other_state) // 2)
            hook = lambda n: kill.maybe_kill("state", step, tmp) if n >= half else None
        files[STATE_FILE] = _durable_file(tmp / STATE_FILE, lambda s: torch.save(plain, s), budget, hook)

    for name, data in (extra_files or {}).items():
        files[name] = _durable_file(tmp / name, lambda s, d=data: s.write(d), budget)

    manifest = {"format": FORMAT, "version": FORMAT_VERSION, "step": step, "kind": kind,
                "created": time.strftime("%Y-%m-%dT%H:%M:%S"), "unix_time": time.time(),
                "model_files": model_files, "parts": ["model"] + sorted((other_state or {}) if kind == "full"
                                                                       else []),
                "files": files, "total_bytes": sum(v["bytes"] for v in files.values())}
    manifest.update(extra_manifest or {})
    text = json.dumps(manifest, indent=1).encode()
    _durable_file(tmp / MANIFEST, lambda s: s.write(text), budget)
    fsync_dir(tmp)
    if kill is not None:
        kill.maybe_kill("manifest", step, tmp)
    return manifest


def _shard(tensors: dict[str, torch.Tensor], max_bytes: int) -> list[list[str]]:
    shards: list[list[str]] = [[]]
    size = 0
    for k, t in tensors.items():
        n = t.numel() * t.element_size()
        if shards[-1] and size + n > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(k)
        size += n
    return shards


def _tensor_bytes(obj: Any) -> int:
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(_tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_tensor_bytes(v) for v in obj)
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


def read_manifest(path: Path) -> dict:
    mf = path / MANIFEST
    if not mf.exists():
        raise CheckpointError(f"{MANIFEST} is missing (the save never finished)")
    try:
        m = json.loads(mf.read_text())
    except (ValueError, OSError) as e:
        raise CheckpointError(f"{MANIFEST} is unreadable ({e})") from None
    if not isinstance(m, dict) or m.get("format") != FORMAT or not isinstance(m.get("files"), dict):
        raise CheckpointError(f"{MANIFEST} is not a memfit checkpoint manifest")
    return m


def verify_checkpoint(path: Path, hashes: bool = True) -> tuple[dict | None, list[str]]:
    """(manifest, problems). Every listed file must exist with the manifest's size and sha256."""
    try:
        m = read_manifest(path)
    except CheckpointError as e:
        return None, [str(e)]
    problems = []
    for name, info in m["files"].items():
        p = path / name
        if not p.exists():
            problems.append(f"{name} is missing")
            continue
        size = p.stat().st_size
        if size != info["bytes"]:
            problems.append(f"{name} is {size} bytes, the manifest says {info['bytes']} "
                            f"({'truncated' if size < info['bytes'] else 'grown'})")
            continue
        if hashes:
            _, digest = sha256_file(p)
            if digest != info["sha256"]:
                problems.append(f"{name} is corrupt (sha256 {digest[:12]}… != manifest {info['sha256'][:12]}…)")
    if m.get("kind") == "full" and STATE_FILE not in m["files"]:
        problems.append(f"full checkpoint without {STATE_FILE}")
    return m, problems


def load_model_state(path: Path, manifest: dict) -> dict[str, Any]:
    """The model part's state dict (memory-mapped tensors, tied aliases restored, extras merged)."""
    state: dict[str, Any] = {}
    meta: dict[str, str] = {}
    for fname in manifest.get("model_files", [MODEL_FILE]):
        tensors, meta = load_safetensors(path / fname)     # every shard carries the same metadata
        state.update(tensors)
    for k, canon in json.loads(meta.get("memfit_aliases", "{}")).items():
        state[k] = state[canon]
    state.update(json.loads(meta.get("memfit_extras", "{}")))
    return state


def make_light(path: Path) -> int:
    """Turn a full checkpoint into a weights-only one: manifest first (so a kill in between leaves a valid
    light checkpoint with a stray file), then delete state.pt. Returns the bytes freed."""
    m = read_manifest(path)
    if m.get("kind") != "full":
        return 0
    m["files"].pop(STATE_FILE, None)
    m["kind"] = "light"
    m["parts"] = ["model"]
    m["total_bytes"] = sum(v["bytes"] for v in m["files"].values())
    atomic_write_text(path / MANIFEST, json.dumps(m, indent=1))
    freed = 0
    if (path / STATE_FILE).exists():
        freed = (path / STATE_FILE).stat().st_size
        (path / STATE_FILE).unlink()
    return freed


def copy_checkpoint(src: Path, tmp: Path, manifest: dict) -> None:
    """Copy the files a manifest lists (checking each sha256 on the way) plus the manifest; fsync all."""
    tmp.mkdir(parents=True, exist_ok=False)
    for name, info in manifest["files"].items():
        def write(sink: Sink, name=name) -> None:
            with open(src / name, "rb") as f:
                while chunk := f.read(_CHUNK):
                    sink.write(chunk)
        got = _durable_file(tmp / name, write)
        if got != {"bytes": info["bytes"], "sha256": info["sha256"]}:
            raise CheckpointError(f"{src / name} changed while being copied (or is corrupt)")
    text = json.dumps(manifest, indent=1).encode()
    _durable_file(tmp / MANIFEST, lambda s: s.write(text))
    fsync_dir(tmp)
