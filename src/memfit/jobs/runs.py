"""`memfit runs [DIR]`: every run under runs/ (or DIR) with its status, step, best metric and size, read
from the files memfit writes — nothing is inferred from process names or timing.

    running   a process holds run.lock (runfiles.RunLock: the kernel drops a dead process's lock) and has
              not written the summary since it took it (a notebook kernel keeps the lock after its run)
    finished  training_history.json's summary says finished and final_model/ exists
    stopped   the summary says stopped, or the run ended without a summary but left a checkpoint (killed):
              resumable, with the command that continues it
    failed    does not fit (the history's last event), nothing saved, or no checkpoint to continue
"""

from __future__ import annotations

import argparse
import errno
import fcntl
import json
import os
import shlex
from pathlib import Path
from typing import Any

from memfit.runfiles import LOCK

SUBCOMMAND = {"pretrain": "train", "finetune": "finetune", "classify": "classify"}


def add_parser(sub) -> None:
    r = sub.add_parser("runs", help="List runs: status (finished / stopped + resume command / failed / "
                       "running), step, best metric, size on disk.",
                       description="List the runs under DIR (default runs/), or the run DIR itself, from the "
                       "files memfit writes in each run directory.")
    r.add_argument("dir", nargs="?", default=None, metavar="DIR", help="Runs folder or one run (default: runs/).")
    r.add_argument("--json", action="store_true", help="Print one JSON object per run, as a list.")
    r.set_defaults(run_command=main)


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def _last_rows(path: Path, limit: int = 65536) -> list[dict]:
    """The rows of history.jsonl's last `limit` bytes (the newest events; the file grows with the run)."""
    try:
        with open(path, "rb") as f:
            f.seek(max(0, f.seek(0, os.SEEK_END) - limit))
            lines = f.read().splitlines()
    except OSError:
        return []
    rows = []
    for line in lines:
        try:
            rows.append(json.loads(line))
        except ValueError:
            continue           # the first, cut line (or a line being written)
    return rows


def lock_holder(run_dir: Path) -> str | None:
    """The PID in run.lock when a live process holds its flock; None when nobody does."""
    path = run_dir / LOCK
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError as e:
        if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            return os.pread(fd, 64, 0).decode(errors="replace").strip() or "?"
        raise
    finally:
        os.close(fd)       # also releases the shared lock just taken
    return None


def _segment_ended(run_dir: Path) -> bool:
    """Whether training_history.json was written after the lock was taken (RunLock.acquire writes its PID
    into run.lock). With a status in it, that was record_result ending the segment: each process starts
    with an empty summary, so the writes during a segment (at each evaluation) carry no status."""
    try:
        return (run_dir / "training_history.json").stat().st_mtime_ns >= (run_dir / LOCK).stat().st_mtime_ns
    except OSError:
        return False


def resume_command(run_dir: Path, task: str | None) -> str:
    """Continues the run with its own options: config.yaml holds every one of them."""
    d = shlex.quote(str(run_dir))
    if task in SUBCOMMAND:
        return f"memfit {SUBCOMMAND[task]} --config {shlex.quote(str(run_dir / 'config.yaml'))} " \
               f"--resume auto --output-dir {d}"
    return f"memfit.fit(..., output_dir={str(run_dir)!r}, resume='auto')   (the same call, resume='auto')"


def _task(run_dir: Path) -> str | None:
    import yaml
    try:   # a damaged config.yaml still lists the run (the job kind then comes from the summary)
        return (yaml.safe_load((run_dir / "config.yaml").read_text()) or {}).get("task")
    except (OSError, ValueError, AttributeError, yaml.YAMLError):
        return None


def describe(run_dir: Path) -> dict[str, Any]:
    from memfit.ckpt.io import dir_bytes
    from memfit.ckpt.policy import list_checkpoints
    summary = _read_json(run_dir / "training_history.json").get("summary") or {}
    rows = _last_rows(run_dir / "history.jsonl")
    ckpts = list_checkpoints(run_dir / "checkpoints")
    task = _task(run_dir) or summary.get("job")
    newest = ckpts[-1].step if ckpts else None
    last_step = max([r["step"] for r in rows if isinstance(r.get("step"), int)], default=None)
    info: dict[str, Any] = {"run": str(run_dir), "job": task, "status": None, "reason": summary.get("reason") or "",
                            "step": summary.get("step"), "total_steps": summary.get("total_steps"),
                            "best": summary.get("best"), "checkpoint": newest, "resume": None,
                            "size_bytes": dir_bytes(run_dir)}
    holder = lock_holder(run_dir)
    last_kind = rows[-1].get("kind") if rows else None
    # The holder ended its segment (a notebook kernel keeps the lock until it exits): a summary status
    # written since it took the lock, or the history's last word is a failure; or it is this process.
    if holder is not None and ((summary.get("status") and _segment_ended(run_dir)) or last_kind == "does_not_fit"
                               or holder == str(os.getpid())):
        holder = None
    status = summary.get("status")
    if holder is not None:
        info.update(status="running", reason=f"PID {holder}", step=max(last_step or 0, newest or 0))
    elif last_kind == "does_not_fit":
        info.update(status="failed", reason=f"does not fit: {rows[-1].get('message', '')}".strip(),
                    step=last_step)
    elif status == "finished" and (run_dir / "final_model").is_dir():
        info["status"] = "finished"
    elif status == "stopped" and newest is not None:
        info["status"] = "stopped"
    elif newest is not None:   # no clean stop recorded after the newest checkpoint: killed (or crashed)
        info.update(status="stopped", step=newest,
                    reason="ended without a clean stop (killed?); the newest checkpoint continues it")
    else:
        info.update(status="failed", reason=info["reason"] or ("nothing was saved" if status == "not_saved"
                                                               else "no checkpoint to continue"))
    if info["status"] == "stopped" or (info["status"] == "failed" and newest is not None):
        info["resume"] = resume_command(run_dir, task)
    return info


def find_runs(root: Path) -> list[Path]:
    if (root / "config.yaml").is_file():
        return [root]
    return sorted(p for p in root.iterdir() if p.is_dir() and (p / "config.yaml").is_file())


def _size(n: int) -> str:
    for unit, k in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= k:
            return f"{n / k:.1f} {unit}"
    return f"{n} B"


def format_table(runs: list[dict[str, Any]]) -> str:
    head = ("RUN", "JOB", "STATUS", "STEP", "BEST", "SIZE")
    table = [head]
    for r in runs:
        step = "-" if r["step"] is None else str(r["step"]) + (f"/{r['total_steps']}" if r["total_steps"] else "")
        b = r["best"]
        best = f"{b['metric']} {b['value']:.4g} @{b['step']}" if b else "-"
        table.append((r["run"], r["job"] or "-", r["status"], step, best, _size(r["size_bytes"])))
    widths = [max(len(row[i]) for row in table) for i in range(len(head))]
    lines = []
    for i, row in enumerate(table):
        lines.append("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip())
        if i and (runs[i - 1]["reason"] or runs[i - 1]["resume"]):
            r = runs[i - 1]
            if r["reason"]:
                lines.append(f"    {r['status']}: {r['reason']}")
            if r["resume"]:
                lines.append(f"    resume: {r['resume']}")
    return "\n".join(lines)


def main(args: argparse.Namespace) -> int:
    from memfit.config import ConfigError
    root = Path(args.dir) if args.dir else Path("runs")
    if not root.is_dir():
        if args.dir is None:
            print("no runs yet: runs/ does not exist here (memfit runs DIR lists another folder)")
            return 0
        raise ConfigError([f"memfit runs {args.dir}: " + ("not a directory" if root.exists()
                                                          else "no such directory")])
    runs = [describe(p) for p in find_runs(root)]
    if args.json:
        print(json.dumps(runs, indent=1))
    elif not runs:
        print(f"no runs under {root} (a run directory holds config.yaml)")
    else:
        print(format_table(runs))
    return 0
