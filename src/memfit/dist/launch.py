"""`memfit train|finetune|classify ... --nproc N` and `memfit launch --nproc N script.py`: torchrun
(`python -m torch.distributed.run`) as a child process, never a fork of this one, so it works from a
notebook cell whose kernel already initialised CUDA.

    torchrun runs in its own session: a Ctrl-C in the terminal reaches this launcher only, which forwards
    SIGTERM/SIGINT to the workers themselves (their pids: dist/worker.py) so the job stops at an agreed
    step and saves (torchrun, signalled, would SIGKILL them 30 s later, mid-save for a large model);
    torchrun dies with this launcher (parent-death signal: SIGTERM, which it forwards to the workers, which
    die with it too: dist/env.die_with_parent), so a SIGKILLed launcher leaves no orphan holding the run;
    the exit code is the workers' agreed one (0, 75, 2, 3), which rank 0 writes to a file: torchrun itself
    returns 1 for any non-zero worker code.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from memfit.dist.env import PR_SET_PDEATHSIG
from memfit.dist.worker import AGREED, LAUNCH_DIR_ENV

FLAGS = ("--nproc", "--nnodes", "--node-rank", "--rdzv-endpoint")
ENDPOINT = re.compile(r"^\[?[\w.\-:]+\]?:\d{1,5}$")


@dataclass(frozen=True)
class Launch:
    nproc: int = 1
    nnodes: int = 1
    node_rank: int = 0
    rdzv_endpoint: str | None = None

    @property
    def wanted(self) -> bool:
        """A torchrun job is needed (and this process is not already one of its workers)."""
        return (self.nproc > 1 or self.nnodes > 1) and "WORLD_SIZE" not in os.environ


def add_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("processes (torchrun: one per GPU, or several on a CPU)")
    g.add_argument("--nproc", dest="launch_nproc", metavar="N", default=None,
                   help="Processes on this machine (default 1). N > 1 runs torchrun with gloo on CPU, nccl "
                        "on GPUs; the effective batch is micro-batch x accumulation x all processes.")
    g.add_argument("--nnodes", dest="launch_nnodes", metavar="N", default=None,
                   help="Machines in the job (default 1); each runs the same command with its --node-rank.")
    g.add_argument("--node-rank", dest="launch_node_rank", metavar="N", default=None,
                   help="This machine's index, 0 .. nnodes-1 (default 0).")
    g.add_argument("--rdzv-endpoint", dest="launch_rdzv_endpoint", metavar="HOST:PORT", default=None,
                   help="Where the machines meet (node 0's address and a free port); needed with --nnodes > 1.")


def _int(value: str | None, flag: str, default: int, low: int, problems: list[str]) -> int:
    if value is None:
        return default
    try:
        n = int(value)
    except ValueError:
        problems.append(f"{flag} must be a whole number (got {value!r})")
        return default
    if n < low:
        problems.append(f"{flag} must be >= {low} (got {n})")
        return default
    return n


def from_args(args: argparse.Namespace, problems: list[str]) -> Launch:
    """The launch options, every bad value appended to `problems` (exit 2 before anything is written)."""
    nproc = _int(getattr(args, "launch_nproc", None), "--nproc", 1, 1, problems)
    nnodes = _int(getattr(args, "launch_nnodes", None), "--nnodes", 1, 1, problems)
    node_rank = _int(getattr(args, "launch_node_rank", None), "--node-rank", 0, 0, problems)
    endpoint = getattr(args, "launch_rdzv_endpoint", None)
    if node_rank >= nnodes:
        problems.append(f"--node-rank must be below --nnodes ({nnodes}) (got {node_rank})")
    if endpoint is not None and not ENDPOINT.match(endpoint):
        problems.append(f"--rdzv-endpoint must be HOST:PORT (got {endpoint!r})")
    if nnodes > 1 and endpoint is None:
        problems.append(f"--nnodes {nnodes} needs --rdzv-endpoint HOST:PORT (node 0's address and a free port)")
    return Launch(nproc, nnodes, node_rank, endpoint)


FLAGS_ENV = "MEMFIT_LAUNCH_FLAGS"      # the launch flags, for the resume command a worker prints


def flags_of(launch: Launch) -> list[str]:
    out = ["--nproc", str(launch.nproc)]
    if launch.nnodes > 1 or launch.rdzv_endpoint:
        out += ["--nnodes", str(launch.nnodes), "--node-rank", str(launch.node_rank),
                "--rdzv-endpoint", launch.rdzv_endpoint or ""]
    return out


def relaunch_flags() -> list[str]:
    """In a worker this launcher started: the flags that start the same job again (else [])."""
    import shlex
    return shlex.split(os.environ.get(FLAGS_ENV, ""))


def strip_flags(argv: list[str]) -> list[str]:
    """`argv` without the launch flags (and their values): what each worker runs."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a in FLAGS:
            skip = True
        elif not a.startswith(tuple(f + "=" for f in FLAGS)):
            out.append(a)
    return out


def torchrun_command(launch: Launch, target: list[str]) -> list[str]:
    """python -m torch.distributed.run ... -m memfit.dist.worker TARGET (TARGET: `-m memfit.cli train
    ...` or `script.py ...`); one machine: --standalone (a free port, no endpoint to give)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(launch.nproc),
           "--max-restarts", "0"]
    if launch.nnodes == 1 and launch.rdzv_endpoint is None:
        cmd.append("--standalone")
    else:
        cmd += ["--nnodes", str(launch.nnodes), "--node-rank", str(launch.node_rank),
                "--rdzv-backend", "c10d", "--rdzv-endpoint", launch.rdzv_endpoint or "localhost:29400"]
    return [*cmd, "-m", "memfit.dist.worker", *target]


def _die_with_launcher() -> None:      # (runs in the child, between fork and exec)
    try:
        ctypes.CDLL(None).prctl(PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0)
    except (OSError, AttributeError):
        pass


def _worker_pids(here: Path) -> list[int]:
    pids = []
    for f in here.glob("pid.*"):
        try:
            pids.append(int(f.read_text()))
        except (OSError, ValueError):
            continue
    return pids


def _agreed_code(here: Path) -> int | None:
    """The lowest rank's code on this machine (rank 0 on node 0): the one the ranks agreed on."""
    codes = []
    for f in here.glob("code.*"):
        try:
            codes.append((int(f.name.split(".", 1)[1]), int(f.read_text())))
        except (OSError, ValueError):
            continue
    return min(codes)[1] if codes else None


def run(launch: Launch, target: list[str]) -> int:
    """Run TARGET on launch.nproc workers under torchrun; the workers' agreed exit code."""
    here = Path(tempfile.mkdtemp(prefix="memfit-launch-"))
    import shlex
    env = {**os.environ, LAUNCH_DIR_ENV: str(here), FLAGS_ENV: shlex.join(flags_of(launch))}
    src = str(Path(__file__).resolve().parents[2])     # memfit importable in the workers, as it is here
    env["PYTHONPATH"] = os.pathsep.join(p for p in (src, os.environ.get("PYTHONPATH")) if p)
    forwarded: list[int] = []
    proc = subprocess.Popen(torchrun_command(launch, target), env=env, start_new_session=True,
                            preexec_fn=_die_with_launcher)

    def forward(signum, _frame) -> None:
        forwarded.append(signum)
        pids = _worker_pids(here)
        for pid in pids or [proc.pid]:       # (before the workers started: torchrun stops them)
            try:
                os.kill(pid, signum)
            except ProcessLookupError:
                pass

    old = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        rc = proc.wait()
    finally:
        for s, h in old.items():
            signal.signal(s, h)
    code = _agreed_code(here)
    shutil.rmtree(here, ignore_errors=True)
    if rc == 0 and code is not None:
        return code
    if rc == 0:
        return 0
    if forwarded and code in AGREED:     # stopped by our forwarded signal; the workers had agreed
        return code
    print(f"memfit: a worker failed (torchrun exit {rc}); the last complete checkpoint is intact: "
          "continue with --resume auto", file=sys.stderr)
    return 1
