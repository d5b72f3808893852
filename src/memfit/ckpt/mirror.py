"""--mirror-to: copy each finished checkpoint (and best/) elsewhere in a background thread.

Same atomic rules as the run directory (a temporary name, every file's sha256 checked against the
manifest on the way, fsync, rename, `latest` last) and the same keep-K, so a run survives the loss of
the machine's own disk. A plain path (a mounted Drive is one) is written with os calls; any other
fsspec URL (s3://, gs://, memory://...) goes through fsspec, where "rename" is the backend's move.

The thread never falls behind by more than one checkpoint: a newer request replaces a pending one
(the older would be rotated away anyway). Failures are logged and retried with the next checkpoint;
they never stop training.
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Callable
from pathlib import Path

from memfit.atomic import DELETING, OLD, recover, rmtree, swap_in
from memfit.ckpt.formats import CheckpointError
from memfit.ckpt.io import MANIFEST, copy_checkpoint, read_manifest
from memfit.ckpt.policy import STEP_RE, Entry, clean_stale, list_checkpoints, rotate, write_latest


class LocalTarget:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.ckdir = root / "checkpoints"

    def prepare(self, log) -> None:
        self.ckdir.mkdir(parents=True, exist_ok=True)
        clean_stale(self.ckdir, log)
        for p in [*self.root.glob(".tmp-best-*"), *self.root.glob(f"{DELETING}*")]:
            rmtree(p)
        recover(self.root / "best")         # killed between the two renames of a best/ swap

    def put(self, src: Path, manifest: dict, keep_last: int, mode: str, log) -> None:
        tmp = self.ckdir / f".tmp-{src.name}-{os.getpid()}"
        rmtree(tmp)
        copy_checkpoint(src, tmp, manifest)
        swap_in(tmp, self.ckdir / src.name, durable=False)   # copy_checkpoint fsynced it
        write_latest(self.ckdir, src.name)
        rotate(self.ckdir, keep_last, mode, lambda p: False, log)

    def put_best(self, src: Path, manifest: dict) -> None:
        tmp = self.root / f".tmp-best-{os.getpid()}"
        rmtree(tmp)
        copy_checkpoint(src, tmp, manifest)
        swap_in(tmp, self.root / "best", durable=False)

    def entries(self) -> list[Entry]:
        return list_checkpoints(self.ckdir)

    def local_copy(self, entry: Entry, scratch: Path) -> Path:
        return entry.path


class FsspecTarget:
    def __init__(self, url: str) -> None:
        try:
            import fsspec
        except ImportError:
            raise CheckpointError(f"--mirror-to {url} needs fsspec (pip install fsspec and the filesystem "
                                  "package for this URL)") from None
        self.url = url
        self.fs, root = fsspec.core.url_to_fs(url)
        self.root = root.rstrip("/")
        self.ckdir = f"{self.root}/checkpoints"

    def prepare(self, log) -> None:
        self.fs.makedirs(self.ckdir, exist_ok=True)
        for d in (self.ckdir, self.root):
            names = self._names(d)
            for name in names:
                if name.startswith(".tmp-"):
                    self.fs.rm(f"{d}/{name}", recursive=True)
                elif name.startswith(OLD):      # an upload cut between its two moves (see _upload)
                    final = name[len(OLD):].rsplit("-", 1)[0]
                    if final in names:
                        self.fs.rm(f"{d}/{name}", recursive=True)
                    else:
                        self.fs.mv(f"{d}/{name}", f"{d}/{final}", recursive=True)
                        names.append(final)
                        log(f"mirror: restored {d}/{final} (replacing it was interrupted)")

    def _names(self, d: str | None = None) -> list[str]:
        try:
            return [p.rstrip("/").rsplit("/", 1)[-1] for p in self.fs.ls(d or self.ckdir, detail=False)]
        except FileNotFoundError:
            return []

    def _upload(self, src: Path, manifest: dict, dst: str) -> None:
        tmp = f"{dst.rsplit('/', 1)[0]}/.tmp-{dst.rsplit('/', 1)[1]}-{os.getpid()}"
        if self.fs.exists(tmp):
            self.fs.rm(tmp, recursive=True)
        for name in manifest["files"]:
            self.fs.put_file(str(src / name), f"{tmp}/{name}")
        self.fs.pipe_file(f"{tmp}/{MANIFEST}", json.dumps(manifest, indent=1).encode())
        # A backend's move is no atomic rename (an object store copies), so the old copy is moved aside,
        # not deleted, until the new one holds the name: an interruption leaves one that prepare() restores.
        old = f"{dst.rsplit('/', 1)[0]}/{OLD}{dst.rsplit('/', 1)[1]}-{os.getpid()}"
        had_old = self.fs.exists(dst)
        if had_old:
            if self.fs.exists(old):
                self.fs.rm(old, recursive=True)
            self.fs.mv(dst, old, recursive=True)
        self.fs.mv(tmp, dst, recursive=True)
        if had_old:
            self.fs.rm(old, recursive=True)

    def put(self, src: Path, manifest: dict, keep_last: int, mode: str, log) -> None:
        self._upload(src, manifest, f"{self.ckdir}/{src.name}")
        self.fs.pipe_file(f"{self.ckdir}/latest", (src.name + "\n").encode())
        steps = sorted((int(m.group(1)), n) for n in self._names() if (m := STEP_RE.match(n)))
        newest_first = [n for _, n in reversed(steps)]
        for name in newest_first[keep_last:]:
            self.fs.rm(f"{self.ckdir}/{name}", recursive=True)
        if mode == "auto":
            fulls = 0
            for name in newest_first[:keep_last]:
                m = json.loads(self.fs.cat_file(f"{self.ckdir}/{name}/{MANIFEST}"))
                if m.get("kind") != "full":
                    continue
                fulls += 1
                if fulls > 2:
                    m["files"].pop("state.pt", None)
                    m.update(kind="light", parts=["model"],
                             total_bytes=sum(v["bytes"] for v in m["files"].values()))
                    self.fs.pipe_file(f"{self.ckdir}/{name}/{MANIFEST}", json.dumps(m, indent=1).encode())
                    self.fs.rm(f"{self.ckdir}/{name}/state.pt")

    def put_best(self, src: Path, manifest: dict) -> None:
        self._upload(src, manifest, f"{self.root}/best")

    def entries(self) -> list[Entry]:
        # Paths here are remote names; local_copy() fetches one before it is verified and loaded.
        out = [Entry(int(m.group(1)), Path(f"{self.ckdir}/{n}")) for n in self._names()
               if (m := STEP_RE.match(n))]
        return sorted(out, key=lambda e: e.step)

    def local_copy(self, entry: Entry, scratch: Path) -> Path:
        rmtree(scratch)
        scratch.mkdir(parents=True)
        remote = str(entry.path)
        for p in self.fs.ls(remote, detail=False):
            name = p.rstrip("/").rsplit("/", 1)[-1]
            self.fs.get_file(p, str(scratch / name))
        return scratch


class Mirror:
    """Background copier. `submit(dir)` returns at once; `wait()` blocks until the queue is empty."""

    def __init__(self, target: str, keep_last: int, mode: str, log: Callable[[str], None]) -> None:
        local = target.removeprefix("file://")
        self.target = FsspecTarget(target) if "://" in local else LocalTarget(Path(local).expanduser())
        self.where = target
        self.keep_last, self.mode, self.log = keep_last, mode, log
        self.target.prepare(log)
        self._cv = threading.Condition()
        self._pending: dict[str, Path] = {}      # "ckpt" / "best" -> source dir (newest request wins)
        self._busy: set[Path] = set()
        self._thread: threading.Thread | None = None
        self.copied: list[str] = []
        self.errors: list[str] = []

    # the training thread -------------------------------------------------------------------
    def submit(self, src: Path, what: str = "ckpt") -> None:
        with self._cv:
            self._pending[what] = src
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name="memfit-mirror", daemon=True)
                self._thread.start()
            self._cv.notify_all()

    def is_busy(self, path: Path) -> bool:
        """True while `path` is queued or being copied (rotation leaves it alone until then)."""
        with self._cv:
            return path in self._busy or path in self._pending.values()

    def wait(self, timeout: float | None = None) -> bool:
        with self._cv:
            return self._cv.wait_for(lambda: not self._pending and not self._busy, timeout)

    def entries(self) -> list[Entry]:
        try:
            return self.target.entries()
        except Exception as e:
            self.log(f"mirror: cannot list {self.where} ({e})")
            return []

    # the mirror thread ---------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            with self._cv:
                if not self._pending:
                    return
                what, src = next(iter(self._pending.items()))
                del self._pending[what]
                self._busy.add(src)
            try:
                manifest = read_manifest(src)
                if what == "best":
                    self.target.put_best(src, manifest)
                else:
                    self.target.put(src, manifest, self.keep_last, self.mode, self.log)
                self.copied.append(f"{what}:{src.name}")
            except Exception as e:  # the mirror is a convenience; training goes on
                msg = f"mirror: could not copy {src.name} to {self.where} ({type(e).__name__}: {e}); " \
                      "will retry with the next checkpoint"
                self.errors.append(msg)
                self.log(msg)
            finally:
                with self._cv:
                    self._busy.discard(src)
                    self._cv.notify_all()
