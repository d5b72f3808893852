"""What a second process costs or buys here: `memfit train` on 1 process vs `memfit train --nproc 2`
(torchrun, gloo on a CPU; nccl on GPUs), the same model and the same global effective batch.

    python bench/ddp_overhead.py                  # 2 rounds of 30 steps each way (~3 minutes on 2 cores)
    python bench/ddp_overhead.py --rounds 3 --steps 60

The 1- and 2-process runs alternate (1,2 then 2,1, ...), so a neighbour's load drifting over the minutes
falls on both. tokens/s: global tokens over the wall time of the steps after the first 3 (start-up, the
first compile-free warm-up), from history.jsonl. Memory: the plan's peak live tensor bytes per device and
rank 0's measured peak (memtrack: the tensors Python can see; DDP's C++ gradient buckets are not among
them, and the plan has no DDP term yet: the figures compare the per-rank training step).

Last line: tokens_per_s 1proc=<x> 2proc=<y> ratio=<y/x> peak_err_pct 1proc=<a> 2proc=<b>
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path

import chaos as H


def _rate(run: Path, skip: int = 3) -> float:
    rows = [r for r in H.history(run, keep_timing=True) if r["kind"] == "train"][skip:]
    return (rows[-1]["tokens"] - rows[0]["tokens"]) / (rows[-1]["elapsed"] - rows[0]["elapsed"])


def _peak(run: Path) -> tuple[int, int]:
    pvm = json.loads((run / "training_history.json").read_text())["summary"]["plan_vs_measured"]
    return pvm["plan_peak_bytes"], pvm["measured_peak_bytes"]


def one(work: Path, corpus: Path, nproc: int, steps: int, batch: int, tag: str) -> dict:
    run = work / tag
    extra = ["--batch-size", str(batch // nproc)] + (["--nproc", str(nproc)] if nproc > 1 else [])
    args = H.train_args(run, corpus, steps, save_every=10 * steps, eval_every=0, log_every=1, extra=extra)
    rc = H.run(args, work / f"{tag}.out")
    if rc != 0:
        raise SystemExit(f"{tag}: exit {rc}\n" + (work / f"{tag}.out").read_text()[-3000:])
    plan, measured = _peak(run)
    return {"tokens_per_s": _rate(run), "plan": plan, "measured": measured}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--batch", type=int, default=8, help="global effective batch (rows of 32 tokens)")
    a = ap.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="ddp-overhead-"))
    corpus = H.make_corpus(work / "corpus")
    res: dict[int, list[dict]] = {1: [], 2: []}
    for r in range(a.rounds):
        for n in ((1, 2) if r % 2 == 0 else (2, 1)):
            res[n].append(one(work, corpus, n, a.steps, a.batch, f"r{r}-n{n}"))
            x = res[n][-1]
            print(f"round {r} nproc {n}: {x['tokens_per_s']:,.0f} tokens/s; peak per rank: plan "
                  f"{x['plan']:,} B, measured {x['measured']:,} B", flush=True)
    rate = {n: statistics.median(x["tokens_per_s"] for x in v) for n, v in res.items()}
    err = {n: 100 * (v[-1]["plan"] - v[-1]["measured"]) / v[-1]["measured"] for n, v in res.items()}
    print(f"{'':10s}{'1 process':>14s}{'2 processes':>14s}")
    print(f"{'tokens/s':10s}{rate[1]:>14,.0f}{rate[2]:>14,.0f}")
    print(f"{'plan B':10s}{res[1][-1]['plan']:>14,}{res[2][-1]['plan']:>14,}")
    print(f"{'measured B':10s}{res[1][-1]['measured']:>14,}{res[2][-1]['measured']:>14,}")
    print(f"tokens_per_s 1proc={rate[1]:.0f} 2proc={rate[2]:.0f} ratio={rate[2] / rate[1]:.2f} "
          f"peak_err_pct 1proc={err[1]:+.1f} 2proc={err[2]:+.1f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
