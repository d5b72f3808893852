"""Helpers of the run-directory tests (the fixtures `corpus` and `finished_run` are in conftest.py): a copy
of a finished run to damage, and a snapshot to prove that a refused command changed nothing."""

from __future__ import annotations

import hashlib
import subprocess
from pathlib import Path


def snapshot(d: Path) -> dict[str, str]:
    """sha256 of every file under d (and the empty directories), by relative path."""
    return {str(p.relative_to(d)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "<dir>"
            for p in sorted(d.rglob("*"))}


def copy_run(src: Path, dst: Path) -> Path:
    """A copy with modes and times kept (cp -a), so a test can damage it without touching the original."""
    subprocess.run(["cp", "-a", str(src), str(dst)], check=True)
    return dst
