"""`memfit finetune` on 2 real torchrun processes (gloo, CPU) equals 1 process with the same global
effective batch: every job, not only `train`, reads micro x accumulation x ranks (Config.global_batch)."""

import json
import random

import pytest
import torch
from run_helpers import tiny_lm_folder
from test_ddp_train import _losses, _memfit, _weights

ARGS = ["--max-seq-len", "48", "--val-fraction", "0.2", "--eval-every", "0", "--eval-batches", "1",
        "--sample-tokens", "0", "--log-every", "1", "--lr", "3e-3", "--warmup-steps", "0", "--max-steps", "3",
        "--save-every", "3", "--precision", "fp32", "--quiet"]


@pytest.mark.slow      # two tiny fine-tunes in subprocesses, one of them on 2 ranks (~25 s on 2 shared cores)
def test_finetune_on_two_processes_equals_one(tmp_path):
    model = tiny_lm_folder(tmp_path / "lm", dropout=0.0)
    rng = random.Random(0)
    rows = [{"instruction": f"Add {a} and {b}.", "input": "", "output": f"{a + b}"}
            for a, b in ((rng.randint(10, 99), rng.randint(10, 99)) for _ in range(40))]
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    common = [*ARGS, "--model", str(model), "--data", str(data)]
    # global effective batch 8 both ways: 2 x 4 accumulation x 1 process, 2 x 2 accumulation x 2 processes
    p1 = _memfit([*common, "--batch-size", "2", "--gradient-accumulation-steps", "4",
                  "--output-dir", str(tmp_path / "one")], command="finetune")
    assert p1.returncode == 0, p1.stderr[-3000:]
    p2 = _memfit([*common, "--batch-size", "2", "--gradient-accumulation-steps", "2",
                  "--output-dir", str(tmp_path / "two")], nproc=2, command="finetune")
    assert p2.returncode == 0, p2.stderr[-8000:]
    l1, l2 = _losses(tmp_path / "one"), _losses(tmp_path / "two")
    assert [r[0] for r in l1] == [r[0] for r in l2] == [1, 2, 3]
    assert torch.allclose(torch.tensor([r[1] for r in l1]), torch.tensor([r[1] for r in l2]), rtol=1e-5)
    assert torch.allclose(torch.tensor([r[2] for r in l1]), torch.tensor([r[2] for r in l2]), rtol=1e-3)
    w1, w2 = _weights(tmp_path / "one"), _weights(tmp_path / "two")
    assert w1.keys() == w2.keys()
    diff = torch.cat([(w1[k] - w2[k]).abs().flatten() for k in w1])
    assert diff.max() <= 2 * 3e-3 * 3, diff.max()
