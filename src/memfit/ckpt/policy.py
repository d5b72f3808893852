"""Which checkpoints to keep: listing, keep-K rotation, full -> light conversion, stale/corrupt clean-up.

A checkpoints directory holds `step-<N>/` members, a `latest` pointer, and possibly:
  .tmp-step-<N>-<pid>/   a save (or mirror copy) that never finished: removed on start
  .del-<name>-<pid>/     a checkpoint whose deletion was interrupted (renamed first): removed on start
  .old-step-<N>-<pid>/   the previous copy of a re-saved step, mid-swap: restored if the new one is absent
  corrupt-step-<N>-<t>/, abandoned-step-<N>-<t>/   set aside by resume (a bad file; a future that a resume
                         from an older step cut off): never resumed from, deleted after the next good save
                         or first when the disk budget needs room.
"""

from __future__ import annotations

import json
import os
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from memfit.atomic import DELETING, OLD, atomic_write_text, recover, remove_dir, rmtree
from memfit.ckpt.io import MANIFEST, dir_bytes, make_light

STEP_RE = re.compile(r"^step-(\d+)$")
ASIDE_RE = re.compile(r"^(corrupt|abandoned)-step-(\d+)")
LATEST = "latest"


@dataclass(frozen=True)
class Entry:
    step: int
    path: Path

    @property
    def kind(self) -> str | None:
        """'full' | 'light' from the manifest (no hashing); None if the manifest is unreadable."""
        try:
            return json.loads((self.path / MANIFEST).read_text()).get("kind")
        except (OSError, ValueError):
            return None


def list_checkpoints(ckdir: Path) -> list[Entry]:
    """step-<N> members, oldest first."""
    if not ckdir.is_dir():
        return []
    out = []
    for p in ckdir.iterdir():
        m = STEP_RE.match(p.name)
        if m and p.is_dir():
            out.append(Entry(int(m.group(1)), p))
    return sorted(out, key=lambda e: e.step)


def set_aside_dirs(ckdir: Path) -> list[Path]:
    if not ckdir.is_dir():
        return []
    return sorted(p for p in ckdir.iterdir() if ASIDE_RE.match(p.name) and p.is_dir())


def set_aside(entry: Entry, why: str) -> Path:
    """Rename out of the resume path (why: corrupt | abandoned); nothing is deleted here."""
    dst = entry.path.with_name(f"{why}-{entry.path.name}-{int(time.time())}")
    os.rename(entry.path, dst)
    return dst


def write_latest(ckdir: Path, name: str) -> None:
    atomic_write_text(ckdir / LATEST, name + "\n")


def clean_stale(ckdir: Path, log: Callable[[str], None]) -> None:
    """Remove what a killed save left behind; restore a step whose re-save was cut mid-swap."""
    if not ckdir.is_dir():
        return
    for p in sorted(ckdir.iterdir()):
        if p.name.startswith(".tmp-"):
            log(f"checkpoint: removing unfinished save {p.name} (the process was stopped while writing it)")
            rmtree(p)
        elif p.name.startswith(DELETING):
            rmtree(p)          # a deletion (rotation, disk budget) that a kill interrupted: finish it
        elif p.name.startswith(OLD):
            final = p.parent / p.name[len(OLD):].rsplit("-", 1)[0]
            if recover(final):
                log(f"checkpoint: restored {final.name} (a re-save of it was interrupted)")
        elif p.name.startswith(f".{LATEST}.tmp-"):
            p.unlink(missing_ok=True)


def rotation_plan(entries: list[Entry], keep_last: int, mode: str) -> tuple[list[Entry], list[Entry]]:
    """(to delete, to make light): keep the `keep_last` newest; in auto mode only the two newest full
    ones stay full, so a corrupt newest still leaves an exact resume while older ones cost weights only."""
    newest_first = sorted(entries, key=lambda e: -e.step)
    kept, dropped = newest_first[:keep_last], newest_first[keep_last:]
    lighten = []
    if mode == "auto":
        fulls = [e for e in kept if e.kind == "full"]
        lighten = fulls[2:]
    return dropped, lighten


def rotate(ckdir: Path, keep_last: int, mode: str, busy: Callable[[Path], bool],
           log: Callable[[str], None], midway: Callable[[Path], None] | None = None) -> int:
    """Apply the rotation plan, skipping members `busy` says are in use (a mirror copy). Returns bytes freed.
    `midway(dir)` runs half-way through each deletion (the test kill hook)."""
    dropped, lighten = rotation_plan(list_checkpoints(ckdir), keep_last, mode)
    freed = 0
    for e in dropped:
        if busy(e.path):
            continue
        freed += dir_bytes(e.path)
        remove_dir(e.path, midway)
    for e in lighten:
        if busy(e.path):
            continue
        try:
            freed += make_light(e.path)
        except Exception as exc:  # a damaged old member must not stop training
            log(f"checkpoint: could not make {e.path.name} weights-only ({exc})")
    return freed
