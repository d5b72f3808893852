# %% [markdown]
# # memfit on a Kaggle/Colab T4, end to end
#
# doctor -> plan -> train with a time limit -> stop -> resume -> generate -> your own module via
# `memfit.fit` -> LoRA fine-tune -> merge. The sizes here are tiny so the whole thing runs on a laptop
# CPU in a few minutes (CI executes it); on a T4 use `configs/kaggle-t4-gpt2-10m.yaml` and a real
# `--time-limit` (or `--platform kaggle`). This file is the plain-script twin of `kaggle_t4.ipynb`:
# the same cells, with `sh("memfit ...")` where the notebook has `!memfit ...`.

# %%
import os
import shlex
import subprocess
import sys
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"          # nothing in this notebook downloads
BIN = Path(sys.executable).parent           # the memfit next to this Python (.venv/bin/memfit)
os.environ["PATH"] = f"{BIN}{os.pathsep}{os.environ['PATH']}"


def sh(cmd: str) -> int:
    """What `!cmd` does in the notebook: run it, show its output, go on whatever the exit code."""
    print(f"$ {cmd}", flush=True)
    return subprocess.run(shlex.split(cmd), check=False).returncode


# %% [markdown]
# ## 1. What this machine has (GPU, memory, disk, the precision `auto` picks, Kaggle/Colab limits)

# %%
sh("memfit doctor")

# %% [markdown]
# ## 2. Plan before allocating anything: will it fit a T4, and how long will it take?

# %%
TINY = "--data shakespeare --target-params 300k --seq-len 64 --vocab-size 1024 --max-examples 4 --batch-size 8 --precision fp32"
sh(f"memfit plan --gpu t4 {TINY}")

# %% [markdown]
# The same from Python: a `Config` in, a `Plan` out (nothing is allocated).

# %%
from memfit import config as C
from memfit.plan import make_plan, render_plan

cfg = C.Config(task="pretrain").replace(
    data={"data": ("shakespeare",), "seq_len": 64, "vocab_size": 1024},
    model={"target_params": 10_000_000}, train={"batch_size": 8}, budget={"gpu": "t4"})
plan = make_plan(cfg)
print(render_plan(plan).splitlines()[0])
print("fits:", plan.memory.fits, "| nvidia-smi on the T4:", f"{plan.memory.nvidia_smi / 2**20:.0f} MiB")

# %% [markdown]
# ## 3. Train with a session limit
#
# `--time-limit` is counted from the start of the process (a notebook's clock starts with the kernel).
# Near it, memfit stops with time left to save a full checkpoint, evaluate and export, and exits 75
# with the command that continues. Here the "session" is 45 seconds.

# %%
sh(f"memfit train {TINY} --max-steps 2000 --eval-every 100 --save-every 100 --time-limit 45s "
   "--output-dir runs/tiny")

# %% [markdown]
# ## 4. A new session: resume exactly where it stopped
#
# `--resume auto` continues the newest good checkpoint (model, optimizer, scheduler, RNGs, data
# position). A resume may change budgets and `--max-steps`: here 40 steps more than the stop, no limit.

# %%
stop_step = int(Path("runs/tiny/checkpoints/latest").read_text().split("-")[-1])
print("checkpointed at step", stop_step)
sh(f"memfit train {TINY} --max-steps {stop_step + 40} --eval-every 100 --save-every 100 "
   "--output-dir runs/tiny --resume auto")

# %% [markdown]
# ## 5. Generate with the final model (a stock Hugging Face folder)

# %%
sh('memfit generate --model runs/tiny/final_model --prompt "ROMEO:" --max-new-tokens 24 --temperature 0.8 --seed 0')

# %% [markdown]
# ## 6. Your own module: `memfit.fit`
#
# Any `nn.Module`, a loss function, a list of dicts. Same checkpoints, resume and stop as the CLI;
# in a notebook, interrupting the cell saves and returns `status == "stopped"`.

# %%
import torch
from torch import nn

import memfit


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 2))

    def forward(self, x):
        return self.net(x)


def loss_fn(model, batch):          # (sum of the loss over the batch, how many items)
    return nn.functional.cross_entropy(model(batch["x"]), batch["y"], reduction="sum"), len(batch["y"])


g = torch.Generator().manual_seed(0)
xs = torch.randn(256, 8, generator=g)
data = [{"x": x, "y": (x.sum() > 0).long()} for x in xs]
result = memfit.fit(Tiny(), data, loss_fn=loss_fn, eval_data=data[:64], output_dir="runs/own",
                    batch_size=16, epochs=1, lr=3e-3, eval_every=8, save_every=8, resume="auto")
print("fit:", result.status, "step", result.step, result.metrics)

# %% [markdown]
# ## 7. LoRA fine-tune the offline SmolLM2-135M-Instruct, then merge it
#
# Four steps on 48 made-up additions so it runs on a CPU; on a T4 drop `--max-steps`, add `--epochs 1`
# (or `--qlora --gradient-checkpointing --optimizer paged_adamw8bit` for a bigger model).

# %%
import json
import random

rng = random.Random(0)
with open("sft.jsonl", "w") as f:
    for _ in range(48):
        a, b = rng.randint(10, 99), rng.randint(10, 99)
        f.write(json.dumps({"instruction": f"Add {a} and {b}.", "output": f"{a} plus {b} equals {a + b}."}) + "\n")

sh("memfit finetune --model smollm2 --data sft.jsonl --lora --max-seq-len 64 --batch-size 4 --max-steps 4 "
   "--lr 2e-3 --precision fp32 --eval-every 0 --output-dir runs/sft")

# %%
sh("memfit merge --adapter runs/sft/final_model --out runs/sft/merged --dtype fp16")

# %% [markdown]
# The merged folder is a plain Hugging Face model: no memfit, no peft needed to load it.

# %%
from transformers import AutoModelForCausalLM, AutoTokenizer

merged = AutoModelForCausalLM.from_pretrained("runs/sft/merged")
tok = AutoTokenizer.from_pretrained("runs/sft/merged")
print("merged:", type(merged).__name__, f"{sum(p.numel() for p in merged.parameters()) / 1e6:.1f}M params,",
      "dtype", next(merged.parameters()).dtype)

# %% [markdown]
# ## 8. Every run in this folder, with its status and the command that continues a stopped one

# %%
sh("memfit runs runs")
