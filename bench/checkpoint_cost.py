"""What a checkpoint costs for the default `memfit train` model: bytes on disk and seconds per save,
full (weights + optimizer + scheduler + RNG + data stream + counters) vs lightweight (weights only),
and the time to verify + load one on resume.

    python bench/checkpoint_cost.py            # ~2-4 minutes on 2 shared cores

It runs the real CLI with the defaults (a ~3M-parameter GPT-2, BPE vocabulary 8192, seq-len 256,
micro-batch 16, Shakespeare) for a few steps with a checkpoint after every step, once with
--save-optimizer-state full and once with light, then resumes the full run once. Numbers are read
from memfit.log ("checkpoint: saved step-N (full, 22.3 MB, 0.31s)"). Each save includes writing
every file through the hashing sink, fsync, re-reading every file to verify its sha256, the rename
and keep-K rotation.

Last line: full_mb=<x> full_s=<median> light_mb=<x> light_s=<median> load_s=<x>
"""

from __future__ import annotations

import argparse
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import chaos as H  # (memfit_cmd, child_env)

SAVED = re.compile(r"checkpoint: saved step-(\d+) \((full|light), ([\d.]+) (B|KB|MB|GB), ([\d.]+)s\)")
LOADED = re.compile(r"resumed from .* verified and loaded in ([\d.]+)s")
UNIT = {"B": 1e-6, "KB": 1e-3, "MB": 1.0, "GB": 1e3}


def run(out_dir: Path, mode: str, steps: int, extra: list[str]) -> int:
    args = ["--max-steps", str(steps), "--save-every", "1", "--keep-last", "3", "--eval-every", "0",
            "--sample-tokens", "0", "--quiet", "--save-optimizer-state", mode, "--output-dir", str(out_dir),
            *extra]
    env = {k: v for k, v in H.child_env().items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    return subprocess.run([*H.memfit_cmd(), "train", *args], env=env, check=False,
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL).returncode


def saves(log: str) -> list[tuple[int, str, float, float]]:
    return [(int(m[0]), m[1], float(m[2]) * UNIT[m[3]], float(m[4])) for m in SAVED.findall(log)]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--dir", default=None)
    ap.add_argument("extra", nargs="*", help="more `memfit train` flags (e.g. --target-params 20M)")
    a = ap.parse_args(argv)
    work = Path(a.dir) if a.dir else Path(tempfile.mkdtemp(prefix="memfit-ckcost-"))
    out: dict[str, dict] = {}
    for mode in ("full", "light"):
        d = work / mode
        shutil.rmtree(d, ignore_errors=True)
        rc = run(d, mode, a.steps, a.extra)
        log = (d / "memfit.log").read_text()
        if rc != 0:
            print(log[-2000:])
            return 1
        rows = [r for r in saves(log) if r[1] == mode]
        times = [r[3] for r in rows[1:]] or [r[3] for r in rows]      # the first save warms the caches
        out[mode] = {"mb": statistics.median(r[2] for r in rows), "s": statistics.median(times),
                     "n": len(rows), "model": re.search(r"model: (.*)", log)[1]}
    # resume the full run once (it is finished: load, then nothing left to train)
    d = work / "full"
    run(d, "full", a.steps, [*a.extra, "--resume", "auto"])
    m = LOADED.findall((d / "memfit.log").read_text())
    load_s = float(m[-1]) if m else float("nan")
    print(f"model: {out['full']['model']}")
    for mode in ("full", "light"):
        o = out[mode]
        print(f"{mode:5s}: {o['mb']:7.2f} MB per checkpoint, median save {o['s']:.2f}s over {o['n']} saves")
    print(f"resume: verify (sha256 of every file) + load of the newest full checkpoint {load_s:.2f}s")
    if not a.dir:
        shutil.rmtree(work, ignore_errors=True)
    print(f"full_mb={out['full']['mb']:.2f} full_s={out['full']['s']:.2f} light_mb={out['light']['mb']:.2f} "
          f"light_s={out['light']['s']:.2f} load_s={load_s:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
