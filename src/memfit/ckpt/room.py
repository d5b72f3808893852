"""The disk budget of one run directory: what it may occupy, what the next checkpoint will take, and
making room by deleting old checkpoints.

Before writing, the size is predicted from the tensors; set-aside and old rotation members are deleted
(never the newest full one, never best/) until it fits; if it still does not, the caller logs why and
training goes on. The bytes of a save in progress are counted as they are written (`guard`), so usage
never passes the budget.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

from memfit.atomic import remove_dir
from memfit.ckpt.formats import BudgetExceeded, split_tensors, tensor_stats
from memfit.ckpt.io import MANIFEST, dir_bytes
from memfit.ckpt.policy import list_checkpoints, set_aside_dirs
from memfit.ckpt.space import capacity_problem, disk_text, fmt_bytes, fs_margin


def _manifest_or_none(path: Path) -> dict | None:
    try:
        return json.loads((path / MANIFEST).read_text())
    except (OSError, ValueError):
        return None


class Room:
    def __init__(self, run_dir: Path, ckdir: Path, disk_budget: int | None,
                 full_estimate: Callable[[], int], mirror, log: Callable[[str], None]) -> None:
        self.run_dir, self.ckdir, self.disk_budget = run_dir, ckdir, disk_budget
        self.mirror, self.log = mirror, log
        self.sizes: dict[str, int] = {}       # last actual size per kind (full / light / best)
        for e in reversed(list_checkpoints(ckdir)):
            m = _manifest_or_none(e.path)
            if m and m.get("kind") in ("full", "light"):
                self.sizes.setdefault(m["kind"], dir_bytes(e.path))
        self.full_bytes = self.sizes.get("full") or full_estimate()
        # never fill the disk itself; the margin scales with the checkpoint (memfit.ckpt.space)
        self.fs_margin = fs_margin(shutil.disk_usage(ckdir).total, self.full_bytes)
        self.peak_bytes = 0                    # highest run-dir usage reached while writing (for tests)

    def capacity_problem(self) -> str | None:
        """Exit-2 text when not even one full checkpoint can ever fit (counting what rotation may free)."""
        entries = list_checkpoints(self.ckdir)
        old = [e.path for e in entries[:-1]] + set_aside_dirs(self.ckdir)
        return capacity_problem(self.run_dir, self.disk_budget, self.full_bytes,
                                sum(dir_bytes(p) for p in old))

    def busy(self, path: Path) -> bool:
        return self.mirror is not None and self.mirror.is_busy(path)

    def allowed_bytes(self) -> int:
        """What the run directory may occupy now: --disk-budget, and never more than the disk holds
        (free space minus a margin)."""
        usage = dir_bytes(self.run_dir)
        hard = usage + shutil.disk_usage(self.run_dir).free - self.fs_margin
        return min(self.disk_budget, hard) if self.disk_budget else hard

    def predict(self, kind: str, model_state: dict, other: dict | None) -> int:
        """Bytes the next checkpoint of `kind` will take: the tensors' bytes (a lower bound) plus format
        overhead, or the last one's size when that is larger. An underestimate is still caught while
        writing (BudgetExceeded), and the bytes written so far then inform the next prediction."""
        tensors, _, _ = split_tensors(model_state, "model")
        nbytes, count = tensor_stats(tensors)
        raw, overhead = nbytes + 128 * count, 8192           # safetensors header, manifest
        if kind == "full":
            ob, oc = tensor_stats(other or {})
            raw, overhead = raw + ob + 512 * oc, overhead + 16384   # zip entries, pickled RNG and counters
        if self.sizes.get(kind):
            return max(raw, int(self.sizes[kind] * 1.01) + 4096)
        return raw + overhead

    def guard(self, what: str, kind: str) -> Callable[[int], None]:
        """The writer's budget check, asked before each write."""
        usage0, allowed = dir_bytes(self.run_dir), self.allowed_bytes()
        written = 0

        def guard(n: int) -> None:
            nonlocal written
            if usage0 + written + n > allowed:
                self.sizes[kind] = max(self.sizes.get(kind, 0), written + n)   # predict better next time
                raise BudgetExceeded(f"{what} would take the run directory past its disk budget "
                                     f"({fmt_bytes(usage0 + written + n)} > {fmt_bytes(allowed)})")
            written += n
            self.peak_bytes = max(self.peak_bytes, usage0 + written)
        return guard

    def make_room(self, need: int, what: str) -> bool:
        """Free set-aside, then old rotation members (oldest first; never the newest full one, never
        best/) until `need` more bytes fit; False (logged) if they cannot."""
        allowed = self.allowed_bytes()
        usage = dir_bytes(self.run_dir)
        if usage + need <= allowed:
            return True
        entries = list_checkpoints(self.ckdir)
        fulls = [e for e in entries if e.kind == "full"]
        keep = (fulls or entries)[-1] if entries else None
        candidates = set_aside_dirs(self.ckdir) + [e.path for e in entries if e != keep]
        if self.mirror is None and usage - sum(dir_bytes(p) for p in candidates) + need > allowed:
            candidates = []   # deleting them all would still not make room: keep them (nothing is gained)
        for waited in (False, True):
            for p in candidates:
                if not p.exists():
                    continue
                if self.busy(p):
                    continue
                remove_dir(p)
                self.log(f"checkpoint: deleted {p.name} to keep the run directory within its disk budget")
                usage = dir_bytes(self.run_dir)
                if usage + need <= allowed:
                    return True
            if waited or self.mirror is None or not any(p.exists() for p in candidates):
                break
            self.mirror.wait()          # members the mirror is still copying become deletable
        self.log(f"checkpoint: {what} needs ~{fmt_bytes(need)} but the run directory already uses "
                 f"{fmt_bytes(usage)} of the {fmt_bytes(allowed)} it may use"
                 + (f"; keeping {keep.path.name} and the older checkpoints" if keep else ""))
        return False

    def text(self, need: int) -> str:
        """Why `need` more bytes do not fit: the disk (named, with its free space) or the budget."""
        usage = dir_bytes(self.run_dir)
        hard = usage + shutil.disk_usage(self.run_dir).free - self.fs_margin
        if self.disk_budget and self.disk_budget <= hard:
            return (f"no room: ~{fmt_bytes(need)} more would take the run directory ({fmt_bytes(usage)}) past "
                    f"--disk-budget {fmt_bytes(self.disk_budget)}")
        return (f"no room on {disk_text(self.run_dir)}: ~{fmt_bytes(need)} more is needed and "
                f"{fmt_bytes(self.fs_margin)} stays free")
