"""Does the CPU live-tensor tracker cost anything after its window? (issue 12)

On a CPU, memfit.train.calibrate measures the step's peak memory with memfit.memtrack.LiveTensorTracker, a
dispatch mode that sees every op, during the first TRACKED_STEPS steps only. This bench shows, side by side in
one run, that the steps after that window run as fast as in a run that never starts the tracker: the same
`memfit train` command (30 steps, a 1M-parameter GPT-2, fp32, --log-every 1), once as is and once with the
tracker's window set to 0 steps (a child that patches Calibration's default before calling memfit's CLI),
interleaved over rounds (order alternating). Per run: the mean step time of steps 11-30 from history.jsonl.
Last line:
    tracked_vs_untracked=<tokens/s ratio, steps 11-30>  window_cost=<tracked steps 1-2 / untracked steps 1-2>

    python bench/tracker_overhead.py --rounds 3
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
from chaos import child_env, make_corpus                       # noqa: E402  (the harness's corpus and child env)
from plan_vs_run import CALIBRATED_AT, COMMON, PRETRAIN, STEPS  # noqa: E402  (the same 30-step pretrain run)

# The child: memfit's CLI, with the tracker's window (Calibration's tracked_steps default) set from argv[1].
CHILD = ("import sys; from memfit.train import calibrate as c; d = list(c.Calibration.__init__.__defaults__); "
         "d[-2] = int(sys.argv[1]); c.Calibration.__init__.__defaults__ = tuple(d); "
         "from memfit.cli import main; sys.exit(main(sys.argv[2:]))")


def run(tracked: int, corpus: Path, out: Path) -> tuple[float, float]:
    """(mean seconds of steps 11-30, mean seconds of steps 1-2) of one run."""
    cmd = [sys.executable, "-c", CHILD, str(tracked), "train", "--data", str(corpus / "train.txt"),
           "--val-data", str(corpus / "val.txt"), "--text-split", "paragraph", *PRETRAIN, "--precision", "fp32",
           *COMMON, "--output-dir", str(out)]
    r = subprocess.run(cmd, capture_output=True, text=True, env=child_env({"OMP_NUM_THREADS": "2"}))
    if r.returncode != 0:
        raise RuntimeError(f"exit {r.returncode}\n{' '.join(cmd)}\n{r.stderr[-3000:]}")
    rows = [json.loads(x) for x in (out / "history.jsonl").read_text().splitlines()]
    t = {x["step"]: x["elapsed"] for x in rows if x["kind"] == "train"}
    after = statistics.mean(t[s] - t[s - 1] for s in range(CALIBRATED_AT + 1, STEPS + 1))
    window = statistics.mean([t[2] - t[1], t[1] - t.get(0, 0.0)]) if 0 in t else t[2] - t[1]
    return after, window


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="tracker-overhead-"))
    corpus = make_corpus(tmp / "corpus")
    res: dict[int, list[tuple[float, float]]] = {2: [], 0: []}
    print(f"{'round':>5s} {'tracker':>8s} {'s/step 11-30':>13s} {'s/step window':>14s}", flush=True)
    for i in range(args.rounds):
        for tracked in ((2, 0) if i % 2 == 0 else (0, 2)):
            after, window = run(tracked, corpus, tmp / f"r{i}-t{tracked}")
            res[tracked].append((after, window))
            print(f"{i:5d} {'on' if tracked else 'never':>8s} {after:13.4f} {window:14.4f}", flush=True)
    on = statistics.median(a for a, _ in res[2])
    off = statistics.median(a for a, _ in res[0])
    w_on = statistics.median(w for _, w in res[2])
    w_off = statistics.median(w for _, w in res[0])
    print(f"tracked_vs_untracked={off / on:.3f} window_cost={w_on / w_off:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
