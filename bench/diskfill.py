"""A real small filesystem for the disk tests and bench/disk_chaos.py: mount a tmpfs, fill it.

tmpfs needs root (CI runs as root); `mount_tmpfs` returns why it could not mount instead of raising, so
a test can skip with the reason (and fail when the CI environment variable is set).
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path


def mount_tmpfs(where: Path, size_bytes: int) -> str | None:
    """Mount a tmpfs of `size_bytes` at `where` (created); None on success, else the reason."""
    where.mkdir(parents=True, exist_ok=True)
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_bytes}", "tmpfs", str(where)],
                       capture_output=True, text=True, check=False)
    if r.returncode != 0:
        return f"cannot mount a tmpfs at {where}: {(r.stderr or r.stdout).strip() or r.returncode}"
    return None


def umount(where: Path) -> None:
    subprocess.run(["umount", "-l", str(where)], capture_output=True, check=False)


def fill(where: Path, leave_bytes: int, name: str = "filler.bin") -> Path:
    """Write real bytes (tmpfs does not count sparse holes) into `where/name` until `leave_bytes` are
    free, as another program writing beside the run would."""
    path = where / name
    chunk = b"\0" * (1 << 20)
    with open(path, "ab") as f:
        while True:
            free = shutil.disk_usage(where).free
            n = min(len(chunk), free - leave_bytes)
            if n <= 0:
                break
            try:
                f.write(chunk[:n])
                f.flush()
            except OSError:
                break
        os.fsync(f.fileno())
    return path
