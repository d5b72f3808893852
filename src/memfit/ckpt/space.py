"""Disk space: how much a run may use, how big one checkpoint is, and which disk is full.

The free-space margin keeps the disk itself from filling up (history.jsonl, memfit.log and the plots
still need a little room after a checkpoint). It used to be max(256 MiB, 2% of the disk), which on a
60 MB disk is more than the disk: nothing was ever saved. It now scales with the checkpoint:

    margin = min(max(256 MiB, 2% of the disk) capped at 2 GiB,  max(4 MiB, one full checkpoint))

so a large model on a large disk keeps the old margin and a tiny model on a tiny disk keeps a few MB.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

MiB = 1 << 20


def fmt_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return str(n)


def existing_ancestor(path: Path) -> Path:
    """`path` or the nearest parent that exists (a run directory before it is created)."""
    p = Path(path).absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


def mount_point(path: Path) -> Path:
    p = existing_ancestor(path)
    while not os.path.ismount(p) and p != p.parent:
        p = p.parent
    return p


def free_bytes(path: Path) -> int:
    return shutil.disk_usage(existing_ancestor(path)).free


def disk_text(path: Path) -> str:
    """'the disk at /mnt/x (12.3 MB free of 60.0 MB)': what a user needs to find the full disk."""
    u = shutil.disk_usage(existing_ancestor(path))
    return f"the disk at {mount_point(path)} ({fmt_bytes(u.free)} free of {fmt_bytes(u.total)})"


def fs_margin(disk_total: int, full_checkpoint: int) -> int:
    old = int(min(2 << 30, max(256 * MiB, 0.02 * disk_total)))
    return min(old, max(4 * MiB, int(full_checkpoint)))


def full_checkpoint_estimate(weight_bytes: int, trainable_params: int, optimizer: str = "adamw") -> int:
    """Bytes of one full checkpoint before any has been written: the weights as stored (for LoRA the
    adapter), plus the optimizer's two moments per trainable parameter (fp32 for AdamW, ~1 byte each
    for 8-bit ones), plus RNG / data / counters and the manifest (8 KB: rather under than over, so no
    budget that could hold one is refused)."""
    per_param = 2.04 if "8bit" in optimizer else 8.0
    return int(weight_bytes + per_param * trainable_params + 8 * 1024)


def capacity_problem(run_dir: Path, disk_budget: int | None, full_checkpoint: int,
                     reclaimable: int = 0) -> str | None:
    """Exit-2 problem when the budget or the disk cannot hold one full checkpoint (None: it can).
    reclaimable: bytes of this run's old checkpoints that rotation may delete to make room."""
    if disk_budget is not None and disk_budget < full_checkpoint:
        return (f"--disk-budget {fmt_bytes(disk_budget)} cannot hold one checkpoint of this model "
                f"(~{fmt_bytes(full_checkpoint)}): raise it to at least {fmt_bytes(3 * full_checkpoint)} "
                "(two checkpoints and best/), or omit it to use the free disk space")
    u = shutil.disk_usage(existing_ancestor(run_dir))
    margin = fs_margin(u.total, full_checkpoint)
    if u.free + reclaimable - margin < full_checkpoint:
        return (f"{disk_text(run_dir)} cannot hold one checkpoint of this model "
                f"(~{fmt_bytes(full_checkpoint)} plus a {fmt_bytes(margin)} margin): free some space, "
                "or choose an --output-dir on a larger disk")
    return None

