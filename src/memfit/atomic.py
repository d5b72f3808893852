"""Crash-safe file-system steps: fsync, write-then-rename, whole-folder swap and whole-folder deletion.

Every memfit folder that a reader may use (a checkpoint step-<N>/, best/, final_model/, a cached GGUF
folder, an exported adapter) is written complete beside its final name, then swapped in by `swap_in`:

  1. the new folder's files and the folder itself are fsynced (save_pretrained does not fsync);
  2. the new folder takes the final name: one atomic exchange where the file system has one
     (renameat2 RENAME_EXCHANGE: the target name never disappears), otherwise the old folder is renamed
     to `.old-<name>-<pid>` and the new one renamed into place;
  3. only then is the old folder removed (renamed to `.del-…` first, so it disappears as a whole).

A kill at any point leaves the target complete (old or new), or, only between the two renames of the
fallback, a `.old-<name>-<pid>` that `recover` renames back. `swap_in` runs `recover` first, and so
does every start-up clean-up that scans these names.

Layer 0: imports nothing from memfit.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
import shutil
from collections.abc import Callable
from pathlib import Path

OLD = ".old-"        # prefix of the previous folder during a swap: `.old-<name>-<pid>`
DELETING = ".del-"   # prefix of a folder being deleted: `.del-<name>-<pid>` (leftovers are removed)


def fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some file systems (FUSE mounts) refuse fsync on directories
    finally:
        os.close(fd)


def fsync_tree(path: Path) -> None:
    """Every file under `path`, then every directory, bottom up: the folder's content is on disk."""
    for root, dirs, files in os.walk(path, topdown=False):
        for name in files:
            p = os.path.join(root, name)
            if os.path.islink(p):
                continue
            fd = os.open(p, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_dir(Path(root))


def atomic_write_text(path: Path, text: str) -> None:
    """Write-then-rename, so a reader sees the old or the new content, never half of one."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def rmtree(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)


def remove_dir(path: Path, midway: Callable[[Path], None] | None = None) -> None:
    """Delete a folder so that a kill at any moment leaves it whole or gone: renamed out of its name
    first (one atomic rename, made durable), then removed. A plain rmtree killed half-way left e.g. a
    step-<N>/ whose manifest lists files already deleted. `midway(dir)`: a test hook inside the removal."""
    gone = path.with_name(f"{DELETING}{path.name}-{os.getpid()}")
    rmtree(gone)
    try:
        os.rename(path, gone)
    except FileNotFoundError:
        return
    fsync_dir(path.parent)
    if midway is not None:
        midway(gone)
    rmtree(gone)


def old_name(final: Path) -> Path:
    return final.with_name(f"{OLD}{final.name}-{os.getpid()}")


def recover(final: Path) -> bool:
    """Finish swaps of `final` that a kill interrupted: with `final` absent, its `.old-<name>-<pid>` is
    renamed back (True); with `final` present, any `.old-` copy is obsolete and removed."""
    parent = final.parent
    if not parent.is_dir():
        return False
    prefix = f"{OLD}{final.name}-"
    olds = sorted(p for p in parent.iterdir() if p.name.startswith(prefix) and p.name[len(prefix):].isdigit())
    restored = False
    for p in olds:
        if not final.exists():
            os.rename(p, final)
            fsync_dir(parent)
            restored = True
        else:
            remove_dir(p)
    return restored


_RENAME_EXCHANGE = 2
_AT_FDCWD = -100
_libc = None


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap the names `a` and `b` (Linux renameat2); False where the system cannot."""
    global _libc
    if _libc is None:
        try:
            _libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
            _libc.renameat2  # noqa: B018  (glibc >= 2.28)
        except (OSError, AttributeError):
            _libc = False
    if not _libc:
        return False
    rc = _libc.renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE)
    if rc == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EPERM, errno.EXDEV):
        return False    # this file system has no exchange: the two-rename fallback
    raise OSError(err, os.strerror(err), str(b))


# False forces the two-rename path (what a file system without renameat2 gets; the tests use it too).
EXCHANGE = True


def swap_in(new: Path, final: Path, *, durable: bool = True,
            between: Callable[[str], None] | None = None) -> Path:
    """Make the complete folder `new` (a sibling of `final`) be `final`; the old `final`, if any, is
    removed only once the new one holds the name. durable=False skips the fsync of a folder whose
    writer already fsynced every file (the checkpoint writer). `between(step)`: a test hook called
    after each step ('synced', 'exchanged' | 'old-aside', 'renamed')."""
    new, final = Path(new), Path(final)
    step = between or (lambda _name: None)
    recover(final)
    if durable:
        fsync_tree(new)
    step("synced")
    if final.exists() and EXCHANGE and _exchange(new, final):
        fsync_dir(final.parent)
        step("exchanged")
        remove_dir(new)           # `new` now names the old folder
        return final
    old = None
    if final.exists():
        old = old_name(final)
        rmtree(old)
        os.rename(final, old)
        fsync_dir(final.parent)
        step("old-aside")
    os.rename(new, final)
    fsync_dir(final.parent)
    step("renamed")
    if old is not None:
        remove_dir(old)
    return final
