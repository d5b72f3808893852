"""Disk chaos: fill the disk under a real `memfit train` at random points; nothing good may be lost.

    python bench/disk_chaos.py                 # 10 fills, ~3-6 minutes on 2 shared cores (needs root)
    python bench/disk_chaos.py --fills 3

A tmpfs is mounted (a real small filesystem); the run lives on it. Each round starts the run with
`--resume auto` (a fresh run once the previous one finished), waits until it has a checkpoint and then a
random number of steps more, and fills the disk with a file written beside the run, leaving a random few
MB free: sometimes enough for rotation to make room (the run goes on), usually not (it must stop
resumably, exit 75, naming the disk). After every round:
  - the newest good checkpoint from before the fill still verifies (sizes + sha256) and loads, or a newer
    good one superseded it;
  - the run ended 0 or 75, and its newest checkpoint verifies and loads (weights and state.pt).
Then the filler is removed and the next round resumes.

Last line: fills=<n> lost=<n>   (lost: rounds where a good checkpoint was lost, or the exit was not 0/75)
"""

from __future__ import annotations

import argparse
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import chaos as H  # noqa: E402
import diskfill  # noqa: E402

MB = 1_000_000


def loadable(ckpt: Path) -> str | None:
    """None if `ckpt` verifies and its weights (and state.pt, for a full one) load; else why not."""
    sys.path.insert(0, str(H.ROOT / "src"))
    from memfit.ckpt.formats import load_state_file
    from memfit.ckpt.io import STATE_FILE, load_model_state, verify_checkpoint
    manifest, problems = verify_checkpoint(ckpt)
    if problems:
        return "; ".join(problems)
    try:
        load_model_state(ckpt, manifest)
        if manifest.get("kind") == "full":
            load_state_file(ckpt / STATE_FILE)
    except Exception as e:  # noqa: BLE001
        return f"does not load: {e}"
    return None


def newest_good(run: Path) -> Path | None:
    for step in reversed(H.checkpoint_steps(run)):
        p = run / "checkpoints" / f"step-{step}"
        if loadable(p) is None:
            return p
    return None


def round_(disk: Path, run: Path, corpus: Path, steps: int, rng: random.Random, out: Path) -> tuple[str, bool]:
    args = H.train_args(run, corpus, steps, save_every=4, eval_every=8, log_every=1,
                        extra=["--keep-last", "2", "--resume", "auto"])
    at = H.log_size(run)
    proc = H.start(args, out)
    H.wait_training(run, at, proc)
    t0 = time.monotonic()
    while not H.checkpoint_steps(run) and proc.poll() is None and time.monotonic() - t0 < 300:
        time.sleep(0.01)
    H.wait_step(run, H.last_step(run) + rng.randint(0, 6), proc)
    before = newest_good(run) or newest_good(run)    # (again if rotation removed one while listing)
    leave = rng.randint(0, 6 * MB)
    filler = diskfill.fill(disk, leave) if proc.poll() is None else None
    rc = proc.wait(600)
    problems = []
    if rc not in (0, 75):
        problems.append(f"exit {rc}")
    if before is not None and before.exists():
        why = loadable(before)
        if why:
            problems.append(f"{before.name} (good before the fill) is now damaged: {why}")
    newest = newest_good(run)
    if before is not None and (newest is None or int(newest.name[5:]) < int(before.name[5:])):
        problems.append(f"{before.name} (good before the fill) is gone and nothing newer is good")
    if newest is None:
        problems.append("no loadable checkpoint after the round")
    if rc == 0 and not (run / "final_model" / "model.safetensors").exists():
        problems.append("exit 0 without final_model/")
    if filler is not None:
        filler.unlink()
    what = (f"fill leaving {leave / MB:.1f} MB at step<={H.last_step(run)}: rc={rc}, good before "
            f"{before.name if before else None}, newest good after {newest.name if newest else None}")
    return what + ("" if not problems else f"  LOST: {'; '.join(problems)}"), not problems


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--fills", type=int, default=10)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--disk-mb", type=int, default=40)
    ap.add_argument("--seed", type=int, default=None)
    a = ap.parse_args(argv)
    seed = a.seed if a.seed is not None else random.SystemRandom().randrange(1 << 30)
    rng = random.Random(seed)
    work = Path(tempfile.mkdtemp(prefix="memfit-disk-chaos-"))
    corpus = H.make_corpus(work / "corpus")
    loadable(work)                        # import torch/memfit now, not in the middle of a round
    disk = work / "disk"
    why = diskfill.mount_tmpfs(disk, a.disk_mb * MB)
    if why:
        print(why)
        return 2
    print(f"disk chaos: seed {seed}, {a.fills} fills, {a.steps}-step runs on a {a.disk_mb} MB tmpfs at {disk}",
          flush=True)
    lost, runs = 0, 0
    try:
        run = disk / f"run{runs}"
        for i in range(a.fills):
            if (run / "final_model").exists():     # finished: the next round is a new run
                shutil.rmtree(run)
                runs += 1
                run = disk / f"run{runs}"
            what, ok = round_(disk, run, corpus, a.steps, rng, work / "disk-chaos.out")
            lost += not ok
            print(f"fill {i + 1}: {what}", flush=True)
    finally:
        diskfill.umount(disk)
    if not lost:
        shutil.rmtree(work, ignore_errors=True)
    else:
        print(f"output kept in {work}")
    print(f"fills={a.fills} lost={lost}")
    return 0 if not lost else 1


if __name__ == "__main__":
    sys.exit(main())
