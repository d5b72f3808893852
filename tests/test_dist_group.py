"""memfit.dist: torchrun's environment read without torch, and the collectives every agreed decision uses,
run on 2 real processes (torchrun, gloo)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from memfit.dist.env import World, from_env

ROOT = Path(__file__).resolve().parents[1]


def test_world_from_the_torchrun_environment():
    assert from_env({}) == World(0, 1, 0)
    assert not from_env({}).distributed and from_env({}).is_main
    w = from_env({"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1"})
    assert (w.rank, w.world_size, w.local_rank, w.distributed, w.is_main) == (3, 4, 1, True, False)
    assert from_env({"WORLD_SIZE": "1", "RANK": "0"}) == World()
    assert from_env({"WORLD_SIZE": "two"}) == World()      # garbage: a plain process


@pytest.mark.slow
def test_collectives_on_two_torchrun_processes(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           str(ROOT / "tests" / "dist_worker_group.py"), str(tmp_path)],
                          env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    seen = [json.loads((tmp_path / f"rank-{r}.json").read_text()) for r in (0, 1)]
    for r, s in enumerate(seen):
        assert (s["rank"], s["world_size"], s["active"], s["env_matches"]) == (r, 2, True, True)
        assert s["agree_one"] is True and s["agree_none"] is False
        assert s["flags"] == [True, False, True]
        assert s["sum"] == [3.0, 2.0 ** 41 + 1]
        assert s["broadcast"] == {"from": 0}
        assert s["grads"] == [[3.0] * 3, [5.0] * 4]
    assert seen[0]["gather"] == [0, 10] and seen[1]["gather"] is None
    assert (tmp_path / "order.txt").read_text() == "0\n1\n"   # rank 0 first, then the others
