"""Coming back: which checkpoint to resume from (the run directory's, the mirror's, or an explicit
path), verifying it, and loading it into the state registry.

Candidates are tried newest first (on a tie the local copy before the mirror's); one whose files do
not match its manifest, or whose state.pt the safe loader refuses, is named and skipped. A weights-only
(light) checkpoint is the fallback when no full one is usable. Corrupt checkpoints and any past the
resumed step are set aside (never deleted here), so a later --resume auto cannot pick them.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from memfit.atomic import rmtree
from memfit.ckpt.formats import CheckpointError
from memfit.ckpt.io import MANIFEST, MODEL_FILE, STATE_FILE, load_model_state, verify_checkpoint
from memfit.ckpt.policy import Entry, list_checkpoints, set_aside
from memfit.ckpt.salvage import read_state
from memfit.ckpt.state import StateRegistry

# (entry, None) for a local checkpoint, (entry, mirror) for one the mirror holds
Candidate = tuple[Entry, Any]
# (entry, local path, manifest, state of the non-model parts)
Chosen = tuple[Entry, Path, dict, dict | None]


def candidates(ckdir: Path, mirror, spec: str) -> tuple[list[Candidate], list[Path], str]:
    """(candidates newest first, our own checkpoint directories, where they were looked for)."""
    own_dirs = [ckdir]
    if spec == "auto":
        cands: list[Candidate] = [(e, None) for e in list_checkpoints(ckdir)]
        if mirror is not None:
            cands += [(e, mirror) for e in mirror.entries()]
            if isinstance(mirror.target.root, Path):
                own_dirs.append(mirror.target.ckdir)
        where = str(ckdir) + (f" or {mirror.where}" if mirror else "")
    else:
        cands, where = explicit(Path(spec).expanduser())
    # newest first; on a tie the local copy before the mirror's
    cands.sort(key=lambda c: (-c[0].step, c[1] is not None))
    return cands, own_dirs, where


def explicit(p: Path) -> tuple[list[Candidate], str]:
    if not p.exists():
        raise CheckpointError(f"--resume {p}: no such file or directory")
    if p.is_file():
        p = p.parent
    if (p / MANIFEST).exists() or (p / MODEL_FILE).exists() or (p / STATE_FILE).exists():
        manifest, problems = verify_checkpoint(p)
        if problems:
            raise CheckpointError(f"--resume {p}: {'; '.join(problems)}")
        return [(Entry(int(manifest["step"]), p), None)], str(p)
    ckdir = p / "checkpoints" if (p / "checkpoints").is_dir() else p
    entries = list_checkpoints(ckdir)
    if not entries:
        raise CheckpointError(f"--resume {p}: no checkpoints (step-<N>/ directories) there")
    return [(e, None) for e in entries], str(ckdir)


def choose(cands: list[Candidate], ckdir: Path, log: Callable[[str], None]
           ) -> tuple[Chosen | None, list[Entry], list[tuple[Path, str]]]:
    """(the newest usable checkpoint or None, the unusable entries, (path, why) of each unusable one).
    A mirror's checkpoint is first fetched into `ckdir`/.tmp-fetch-<name>-<pid>."""
    chosen = light = None
    bad: list[Entry] = []
    damage: list[tuple[Path, str]] = []
    for entry, source in cands:
        try:
            path = entry.path if source is None else source.target.local_copy(
                entry, ckdir / f".tmp-fetch-{entry.path.name}-{os.getpid()}")
        except Exception as e:
            log(f"checkpoint: cannot fetch {entry.path} ({e}); trying the previous one")
            continue
        manifest, problems = verify_checkpoint(path)
        state = None
        if not problems and manifest.get("kind") == "full":
            try:
                state = read_state(path)     # a file the safe loader refuses is damage too
            except CheckpointError as e:
                problems = [str(e)]
        if problems:
            log(f"checkpoint: {path} is unusable: {'; '.join(problems)}; falling back to the "
                "previous checkpoint")
            bad.append(entry)
            damage.append((path, "; ".join(problems)))
            continue
        if manifest.get("kind") != "full":
            light = light or (entry, path, manifest)
            continue
        chosen = (entry, path, manifest, state)
        break
    if chosen is None and light is not None:
        chosen = (*light, {})
        log(f"checkpoint: no full checkpoint; {light[1]} has weights only, so the optimizer, data "
            "position and counters start fresh")
    return chosen, bad, damage


def load_into(registry: StateRegistry, model: torch.nn.Module, path: Path, manifest: dict,
              state: dict | None, log: Callable[[str], None]) -> list[str]:
    """Load the checkpoint into the registry (the model too); returns the parts it had no state for."""
    if state is None:
        state = read_state(path) if manifest["kind"] == "full" else {}
    model_state = load_model_state(path, manifest)
    if registry.get("model") is not None:
        state["model"] = model_state
    else:
        model.load_state_dict(model_state)
    unused = [k for k in state if k not in registry.names()]
    try:
        missing = registry.load_state_dict(state, strict=False)
    except (ValueError, RuntimeError) as e:   # another model's weights, another data stream
        lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
        raise CheckpointError(f"{path} does not belong to this run: {'; '.join(lines[:3])}"
                              f"{' ...' if len(lines) > 3 else ''}") from None
    if missing and manifest["kind"] == "full":
        log(f"checkpoint: {path.name} has no state for {', '.join(missing)} (left as initialised)")
    if unused:
        log(f"checkpoint: {path.name} holds state this run does not use: {', '.join(unused)}")
    return missing


def tidy(own_dirs: list[Path], ckdir: Path, step: int, bad: list[Entry], log: Callable[[str], None],
         keep: Path | None = None) -> None:
    """In our own directories, set aside the corrupt checkpoints and any past the resumed step (a
    future this resume abandons) so a later --resume auto cannot pick them. Nothing is deleted
    until the next good save."""
    bad_paths = {e.path for e in bad}
    for d in own_dirs:
        for e in list_checkpoints(d):
            if e.path == keep or not (e.path in bad_paths or e.step > step):
                continue
            dst = set_aside(e, "corrupt" if e.path in bad_paths else "abandoned")
            log(f"checkpoint: set {e.path} aside as {dst.name}")
    for p in ckdir.glob(".tmp-fetch-*"):
        rmtree(p)
