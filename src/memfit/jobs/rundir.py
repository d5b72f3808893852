"""The run directory: where it is, whether this run may write there, config.yaml written first.

Rules (DESIGN.md "Contracts"): a directory holding a *different* run's config is refused unless
--resume or --overwrite says otherwise; the same run without --resume is refused too (starting
fresh would overwrite its files); `--resume auto` on a directory with nothing to resume starts
fresh, so a notebook cell can simply be re-run.
"""

from __future__ import annotations

import dataclasses
import os
import time
from pathlib import Path

from memfit import config as C
from memfit import runfiles

# Options that may change between a run and its resumption without making it "another run".
_RESUME_FREE = {("checkpoint", "resume"), ("checkpoint", "overwrite"), ("budget", "time_limit"),
                ("budget", "deadline"), ("run", "quiet"), ("run", "verbose"), ("run", "output_dir"),
                ("run", "name"),
                ("budget", "preflight"), ("checkpoint", "mirror_to"), ("budget", "disk_budget")}


def run_dir_for(cfg: C.Config) -> Path:
    if cfg.run.output_dir:
        return Path(cfg.run.output_dir)
    name = cfg.run.name or f"{cfg.task}-{time.strftime('%Y%m%d-%H%M%S')}"
    return Path("runs") / name


def config_differences(old: C.Config, new: C.Config) -> list[str]:
    diffs = []
    for group in C.GROUPS:
        a, b = getattr(old, group), getattr(new, group)
        for f in dataclasses.fields(a):
            if (group, f.name) in _RESUME_FREE:
                continue
            va, vb = getattr(a, f.name), getattr(b, f.name)
            if va != vb:
                diffs.append(f"{group}.{f.name}: {va!r} -> {vb!r}")
    if old.task != new.task:
        diffs.append(f"task: {old.task!r} -> {new.task!r}")
    return diffs


def _has_checkpoints(run_dir: Path) -> bool:
    ck = run_dir / "checkpoints"
    return ck.is_dir() and any(ck.iterdir())


def _parent_problems(run_dir: Path) -> list[str]:
    """The nearest existing ancestor of a run directory still to be made must be a writable directory
    (os.access also sees a read-only mount, which denies even root)."""
    p = run_dir.absolute().parent
    while not p.exists():
        p = p.parent
    if not p.is_dir():
        return [f"--output-dir {run_dir}: {p} is a file, not a directory: choose another --output-dir"]
    if not os.access(p, os.W_OK | os.X_OK):
        return [f"--output-dir {run_dir}: {p} is not writable (a read-only file system or no permission): "
                "choose a writable directory"]
    return []


def check_run_dir(cfg: C.Config, run_dir: Path) -> list[str]:
    """Problems with writing this run to run_dir (empty list = fine). Reads only: nothing is written.

    --overwrite never removes a file memfit did not write: a directory that is not a memfit run, or one
    holding anything memfit did not write (.memfit-files), is refused. Where checkpoints exist the
    remedy offered is resuming them, never --overwrite (which would delete them)."""
    cfg_file = run_dir / "config.yaml"
    if not run_dir.exists():
        return _parent_problems(run_dir)
    if not run_dir.is_dir():
        return [f"--output-dir {run_dir} exists and is not a directory"]
    if not os.access(run_dir, os.W_OK | os.X_OK):
        return [f"--output-dir {run_dir} is not writable (a read-only file system or no permission): "
                "choose a writable directory"]
    if not any(run_dir.iterdir()):
        return []
    ckpts = _has_checkpoints(run_dir)
    if cfg.checkpoint.overwrite:
        if not runfiles.is_memfit_dir(run_dir):
            return [f"--overwrite: {run_dir} is not a memfit run directory (no config.yaml or "
                    f"{runfiles.MANIFEST}); nothing was removed: choose another (new or empty) --output-dir"]
        foreign = runfiles.foreign_entries(run_dir)
        if foreign:
            return [f"--overwrite: {run_dir} holds files memfit did not write ({', '.join(foreign[:10])}"
                    f"{' ...' if len(foreign) > 10 else ''}); nothing was removed: move them out or choose "
                    "another --output-dir"]
        return []
    resume_hint = (f"continue it with --resume auto --output-dir {run_dir} (the options come from your flags), "
                   "or start a new run in another --output-dir")
    if not cfg_file.exists():
        if ckpts:
            if cfg.checkpoint.resume:
                return []
            return [f"{run_dir} holds checkpoints but its config.yaml is missing: {resume_hint}"]
        if runfiles.recorded(run_dir) is not None and not runfiles.foreign_entries(run_dir):
            return []      # memfit's own files of a run stopped before its first checkpoint
        return [f"--output-dir {run_dir} is not empty and holds no memfit run: choose another (new or "
                "empty) directory"]
    if cfg.checkpoint.resume:
        return []
    replace = "" if ckpts else ", --overwrite to replace it"
    try:
        old = C.load_yaml(cfg_file)
    except C.ConfigError:
        if ckpts:
            return [f"{cfg_file} is not a readable memfit config but the directory holds checkpoints: "
                    f"{resume_hint}"]
        return [f"{cfg_file} is not a readable memfit config: pass --overwrite to replace the run"]
    diffs = config_differences(old, cfg)
    if diffs:
        return [f"{run_dir} holds a different run ({'; '.join(diffs[:4])}"
                f"{' ...' if len(diffs) > 4 else ''}): pass --resume auto to continue it with these "
                f"options{replace}, or choose another --output-dir"]
    return [f"{run_dir} already holds this run: pass --resume auto to continue it{replace}"
            + (", or choose another --output-dir" if ckpts else "")]


_LOCKS: dict[Path, runfiles.RunLock] = {}


def prepare_run_dir(cfg: C.Config, run_dir: Path) -> None:
    """Create the directory, take its lock, then (--overwrite) remove memfit's old files and write
    config.yaml first (atomically). The lock is held until this process exits or prepares the same
    directory again (a notebook re-running a cell)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    key = run_dir.resolve()
    if key in _LOCKS:
        _LOCKS.pop(key).release()
    runfiles.claim(run_dir)
    lock = runfiles.RunLock(run_dir)
    try:
        lock.acquire()
    except runfiles.RunLocked as e:
        raise C.ConfigError([str(e)]) from None
    _LOCKS[key] = lock
    if cfg.checkpoint.overwrite:
        runfiles.remove_owned(run_dir)
    runfiles.record(run_dir, "config.yaml")
    tmp = run_dir / "config.yaml.tmp"
    C.save_yaml(cfg, tmp)
    os.replace(tmp, run_dir / "config.yaml")
