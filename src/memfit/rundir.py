"""The run directory: where it is, whether this run may write there, config.yaml written first.

Rules (DESIGN.md "Contracts"): a directory holding a *different* run's config is refused unless
--resume or --overwrite says otherwise; the same run without --resume is refused too (starting
fresh would overwrite its files); `--resume auto` on a directory with nothing to resume starts
fresh, so a notebook cell can simply be re-run.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import time
from pathlib import Path

from memfit import config as C

# Options that may change between a run and its resumption without making it "another run".
_RESUME_FREE = {("checkpoint", "resume"), ("checkpoint", "overwrite"), ("budget", "time_limit"),
                ("budget", "deadline"), ("run", "quiet"), ("run", "output_dir"), ("run", "name"),
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


def check_run_dir(cfg: C.Config, run_dir: Path) -> list[str]:
    """Problems with writing this run to run_dir (empty list = fine)."""
    cfg_file = run_dir / "config.yaml"
    if not run_dir.exists():
        return []
    if not run_dir.is_dir():
        return [f"--output-dir {run_dir} exists and is not a directory"]
    if not cfg_file.exists():
        if any(run_dir.iterdir()) and not cfg.checkpoint.overwrite:
            return [f"--output-dir {run_dir} is not empty and holds no memfit run: choose another "
                    f"directory or pass --overwrite"]
        return []
    if cfg.checkpoint.overwrite or cfg.checkpoint.resume:
        return []
    try:
        old = C.load_yaml(cfg_file)
    except C.ConfigError:
        return [f"{cfg_file} is not a readable memfit config: pass --overwrite to replace the run"]
    diffs = config_differences(old, cfg)
    if diffs:
        return [f"{run_dir} holds a different run ({'; '.join(diffs[:4])}"
                f"{' ...' if len(diffs) > 4 else ''}): pass --resume auto to continue it with these "
                f"options, --overwrite to replace it, or choose another --output-dir"]
    return [f"{run_dir} already holds this run: pass --resume auto to continue it or --overwrite to "
            f"start over"]


def prepare_run_dir(cfg: C.Config, run_dir: Path) -> None:
    """Create the directory and write config.yaml first (atomically)."""
    if cfg.checkpoint.overwrite and run_dir.exists():
        for child in run_dir.iterdir():
            shutil.rmtree(child) if child.is_dir() else child.unlink()
    run_dir.mkdir(parents=True, exist_ok=True)
    tmp = run_dir / "config.yaml.tmp"
    C.save_yaml(cfg, tmp)
    os.replace(tmp, run_dir / "config.yaml")
