"""Run by tests/test_dist_group.py under a real `torchrun --nproc-per-node 2` (gloo): each rank exercises
memfit.dist.group's collectives and writes what it saw to OUT/rank-<r>.json."""

import json
import sys
from pathlib import Path

import torch

from memfit.dist import group
from memfit.dist.env import current

out = Path(sys.argv[1])
world = group.init("cpu")
r = world.rank
seen: dict = {"rank": r, "world_size": world.world_size, "active": group.active()}
seen["agree_one"] = group.agree(r == 1)              # only rank 1 says True: both must see True
seen["agree_none"] = group.agree(False)
seen["flags"] = group.agree_flags([r == 0, False, r == 1])
seen["sum"] = group.all_sum([1.0 + r, 2.0 ** 40 + r])   # float64: exact above 2**24
seen["broadcast"] = group.broadcast({"from": r})
seen["gather"] = group.gather(r * 10)
# gradients: rank r holds grad = (r+1) * ones, and one parameter has no grad on rank 1 (counts as 0)
ps = [torch.nn.Parameter(torch.zeros(3)), torch.nn.Parameter(torch.zeros(2, 2))]
ps[0].grad = torch.full((3,), float(r + 1))
if r == 0:
    ps[1].grad = torch.full((2, 2), 5.0)
group.sum_gradients(ps, bucket_bytes=8)               # tiny buckets: the loop over buckets runs
seen["grads"] = [p.grad.flatten().tolist() for p in ps]
order = out / "order.txt"
with group.rank_zero_first():
    with open(order, "a") as f:
        f.write(f"{r}\n")
seen["env_matches"] = current() == world
(out / f"rank-{r}.json").write_text(json.dumps(seen))
group.close()
