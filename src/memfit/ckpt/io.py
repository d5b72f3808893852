"""Checkpoint directories: writing one (model files, state.pt, extra files, the manifest last), reading
and verifying it against its manifest, turning a full one into weights-only, copying one, and the
test-only kill hook. The bytes of each file: memfit.ckpt.formats.
"""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from memfit.atomic import atomic_write_text, fsync_dir
from memfit.ckpt.formats import (
    CHUNK,
    CheckpointError,
    Sink,
    durable_file,
    load_safetensors,
    sha256_file,
    split_tensors,
    tensor_bytes,
    to_plain,
    write_safetensors,
)

MANIFEST = "manifest.json"
MODEL_FILE = "model.safetensors"
MODEL_INDEX = "model.safetensors.index.json"
STATE_FILE = "state.pt"
FORMAT = "memfit-checkpoint"
FORMAT_VERSION = 1
KILL_ENV = "MEMFIT_TEST_KILL_DURING_SAVE"      # "N" or "N:phase": SIGKILL self during the N-th save
KILL_MARKER_ENV = "MEMFIT_TEST_KILL_MARKER"    # where to write the marker (default run_dir/KILLED_DURING_SAVE)


# ---------------------------------------------------------------- sizes on disk

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


# ---------------------------------------------------------------- the test-only kill hook

class KillSwitch:
    """MEMFIT_TEST_KILL_DURING_SAVE=N[:phase]: SIGKILL this process during its N-th save.

    phase: `model` (after model.safetensors), `state` (half-way through state.pt, the default),
    `manifest` (everything written and fsynced, before the rename), `delete` (after the save, half-way
    through deleting the checkpoint that the keep-K rotation drops), `saved` (SIGTERM, not SIGKILL, once
    the save is complete: a stop that lands on a step already saved). A marker file is written first so
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
        os.kill(os.getpid(), signal.SIGTERM if phase == "saved" else signal.SIGKILL)


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
        files[MODEL_FILE] = durable_file(tmp / MODEL_FILE,
                                          lambda s: write_safetensors(s, tensors, meta), budget)
        model_files = [MODEL_FILE]
    else:
        weight_map: dict[str, str] = {}
        model_files = []
        for i, names in enumerate(shards):
            fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            part = {k: tensors[k] for k in names}
            files[fname] = durable_file(tmp / fname, lambda s, p=part: write_safetensors(s, p, meta), budget)
            weight_map.update({k: fname for k in names})
            model_files.append(fname)
        index = {"metadata": {"total_size": sum(t.numel() * t.element_size() for t in tensors.values()),
                              **meta}, "weight_map": weight_map}
        text = json.dumps(index, indent=1).encode()
        files[MODEL_INDEX] = durable_file(tmp / MODEL_INDEX, lambda s: s.write(text), budget)
    if kill is not None:
        kill.maybe_kill("model", step, tmp)

    if kind == "full":
        plain = to_plain(other_state or {}, "state")
        hook = None
        if kill is not None and kill.armed() and kill.phase == "state":
            half = max(1, tensor_bytes(other_state) // 2)
            hook = lambda n: kill.maybe_kill("state", step, tmp) if n >= half else None
        files[STATE_FILE] = durable_file(tmp / STATE_FILE, lambda s: torch.save(plain, s), budget, hook)

    for name, data in (extra_files or {}).items():
        files[name] = durable_file(tmp / name, lambda s, d=data: s.write(d), budget)

    manifest = {"format": FORMAT, "version": FORMAT_VERSION, "step": step, "kind": kind,
                "created": time.strftime("%Y-%m-%dT%H:%M:%S"), "unix_time": time.time(),
                "model_files": model_files, "parts": ["model"] + sorted((other_state or {}) if kind == "full"
                                                                       else []),
                "files": files, "total_bytes": sum(v["bytes"] for v in files.values())}
    manifest.update(extra_manifest or {})
    text = json.dumps(manifest, indent=1).encode()
    durable_file(tmp / MANIFEST, lambda s: s.write(text), budget)
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
                while chunk := f.read(CHUNK):
                    sink.write(chunk)
        got = durable_file(tmp / name, write)
        if got != {"bytes": info["bytes"], "sha256": info["sha256"]}:
            raise CheckpointError(f"{src / name} changed while being copied (or is corrupt)")
    text = json.dumps(manifest, indent=1).encode()
    durable_file(tmp / MANIFEST, lambda s: s.write(text))
    fsync_dir(tmp)
