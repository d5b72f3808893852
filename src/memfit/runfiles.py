"""What memfit wrote in a run directory (`.memfit-files`) and who is using it (`run.lock`).

`.memfit-files` lists, one per line, the top-level entries of the run directory that memfit created:
a file (`config.yaml`, `history.jsonl`, ...) or a directory (`checkpoints/`, `best/`, `tokenizer/`, ...)
whose whole content is memfit's. Every writer records its entry *before* creating it, so a kill between
the two leaves a listed name that does not exist yet (harmless), never an unlisted memfit file.
`--overwrite` removes only listed entries (plus memfit's own temporary names, below) and refuses, before
removing anything, a directory that holds anything else: a file memfit did not write is never deleted.

`run.lock` is held with `fcntl.flock` on an open descriptor for as long as the process runs the job: the
kernel drops it when the process exits or is killed, so a stale lock cannot block a later run. The
holder's PID is written inside so a refused second process can name it.
"""

from __future__ import annotations

import errno
import fcntl
import os
import re
import shutil
from pathlib import Path

MANIFEST = ".memfit-files"
LOCK = "run.lock"
# Entries memfit writes in every run directory (used for run directories made before .memfit-files).
KNOWN = ("config.yaml", "tokenizer", "checkpoints", "best", "final_model", "history.jsonl",
         "training_history.json", "plots", "memfit.log", "tensorboard", "plan.json", "confusion_matrix.json",
         LOCK, MANIFEST)
KNOWN += ("wandb",)
# Leftovers of a killed write of a memfit entry NAME (write-then-rename, folder swaps), and the test kill
# hook's marker: memfit's too, but only next to a NAME memfit owns.
_FIXED_TRANSIENT = re.compile(r"^(\.tmp-best-\d+|KILLED_DURING_SAVE)$")
_TRANSIENT_OF = re.compile(r"^\.?(?P<name>.+?)(\.tmp-\d+|\.tmp|\.old)$")
_SWAP_OF = re.compile(r"^\.(?:old|del)-(?P<name>.+)-\d+$")     # memfit.atomic's swap and delete names
_OTHER_NAMES = {"history.tmp": "history.jsonl"}     # History.load_until's write-then-rename


def _transient(name: str, own: set[str]) -> bool:
    if _FIXED_TRANSIENT.match(name):
        return True
    if _OTHER_NAMES.get(name) in own:
        return True
    if (m := _SWAP_OF.match(name)) and (m.group("name") in own or _transient(m.group("name"), own)):
        return True
    m = _TRANSIENT_OF.match(name)
    return bool(m) and m.group("name") in own


def recorded(run_dir: Path) -> set[str] | None:
    """The entries listed in .memfit-files; None when the directory has no such file."""
    try:
        text = (Path(run_dir) / MANIFEST).read_text()
    except FileNotFoundError:
        return None
    return {line.strip().rstrip("/") for line in text.splitlines() if line.strip()}


def record(run_dir: Path, *names: str, create: bool = False) -> None:
    """Add top-level entries to .memfit-files (idempotent). Without `create` nothing happens in a
    directory that has no .memfit-files (a writer used outside a run directory, e.g. `memfit export
    --out DIR`, must not start claiming that directory)."""
    run_dir = Path(run_dir)
    have = recorded(run_dir)
    if have is None and not create:
        return
    new = [n for n in names if n not in (have or set())]
    if not new and have is not None:
        return
    with open(run_dir / MANIFEST, "a") as f:   # append: a kill mid-line loses at most that name
        f.write("".join(f"{n}\n" for n in ([MANIFEST] if have is None else []) + new))
        f.flush()
        os.fsync(f.fileno())


def claim(run_dir: Path) -> None:
    """Start .memfit-files in a directory the run-directory checks accepted. A run directory made before
    the list existed gets memfit's known entries that are present (and nothing else)."""
    run_dir = Path(run_dir)
    if recorded(run_dir) is None:
        present = [p.name for p in run_dir.iterdir() if p.name in KNOWN and p.name != MANIFEST]
        record(run_dir, *present, create=True)


def record_path(path: Path) -> None:
    """Record `path` (a file or directory directly inside a run directory) in its parent's list."""
    path = Path(path)
    record(path.parent, path.name)


def is_memfit_dir(run_dir: Path) -> bool:
    run_dir = Path(run_dir)
    return (run_dir / MANIFEST).exists() or (run_dir / "config.yaml").exists()


def _owned(run_dir: Path) -> set[str]:
    own = recorded(run_dir)
    if own is None:
        own = set(KNOWN) if (run_dir / "config.yaml").exists() else set()
    return own


def foreign_entries(run_dir: Path) -> list[str]:
    """Top-level entries of run_dir that memfit did not write (sorted)."""
    run_dir = Path(run_dir)
    own = _owned(run_dir)
    return sorted(p.name for p in run_dir.iterdir() if p.name not in own and not _transient(p.name, own))


def remove_owned(run_dir: Path) -> None:
    """Delete memfit's entries, and only those (anything else stays, whatever the caller checked). The
    lock file and the list stay; the list is reset afterwards (a kill before that leaves it listing
    names already gone: harmless), and goes on naming what this run writes."""
    run_dir = Path(run_dir)
    own = _owned(run_dir)
    for p in run_dir.iterdir():
        if p.name in (LOCK, MANIFEST) or not (p.name in own or _transient(p.name, own)):
            continue
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        else:
            p.unlink()
    tmp = run_dir / f"{MANIFEST}.tmp-{os.getpid()}"
    tmp.write_text(f"{MANIFEST}\n{LOCK}\n")
    os.replace(tmp, run_dir / MANIFEST)


class RunLocked(RuntimeError):
    """Another live process holds the run directory's lock."""


class RunLock:
    """An exclusive lock on run_dir/run.lock for this process's run (see the module docstring)."""

    def __init__(self, run_dir: Path) -> None:
        self.path = Path(run_dir) / LOCK
        self.fd: int | None = None

    def acquire(self) -> None:
        record(self.path.parent, LOCK)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise RunLocked(f"{self.path.parent} is in use by another memfit process (PID {holder}, "
                                f"holding {self.path}): wait for it to finish or stop it, or choose another "
                                "--output-dir") from None
            raise
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self.fd = fd

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)      # closing the descriptor drops the flock; the file stays (harmless)
            self.fd = None
