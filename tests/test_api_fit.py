"""memfit.fit on a user's own two-input module with a custom (loss_sum, count) loss: injected OOM survived,
Ctrl-C (SIGINT) saves and a second call resumes, a SIGKILLed process resumes bit-identically, and each call
releases the previous run's optimizer state and gradients (also after an exception)."""

import gc
import os
import signal
import subprocess
import sys
import textwrap
import weakref
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import memfit
from memfit import api

SETUP = textwrap.dedent('''
    import torch, torch.nn as nn

    class Student(nn.Module):
        """An image branch and a text branch feeding one head (a vision+text student in miniature)."""
        def __init__(self):
            super().__init__()
            self.img = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 32), nn.ReLU(), nn.Dropout(0.1))
            self.txt = nn.EmbeddingBag(100, 32)
            self.head = nn.Linear(64, 4)

        def forward(self, image, tokens):
            return self.head(torch.cat([self.img(image), self.txt(tokens)], -1))

    def make_data(n, seed=0):
        g = torch.Generator().manual_seed(seed)
        y = torch.randint(0, 4, (n,), generator=g)
        img = torch.randn(n, 3, 8, 8, generator=g) + y[:, None, None, None] * 0.5
        tok = torch.randint(0, 100, (n, 6), generator=g) + y[:, None] * 10
        return [{"image": img[i], "tokens": tok[i] % 100, "y": y[i]} for i in range(n)]

    def loss_fn(model, batch):
        logits = model(batch["image"], batch["tokens"])
        return nn.functional.cross_entropy(logits.float(), batch["y"], reduction="sum"), batch["y"].numel()

    OPTIONS = dict(batch_size=8, gradient_accumulation_steps=2, max_steps=10, lr=3e-3, warmup_steps=2,
                   eval_every=5, log_every=1, precision="fp32", quiet=True, inject_oom_above_tokens=4)
''')
ns: dict = {}
exec(SETUP, ns)


def new_model():
    torch.manual_seed(0)
    return ns["Student"]()


def train_rows(result):
    return [(r["step"], r["loss"], r["lr"], r["micro_batch"]) for r in result.history if r["kind"] == "train"]


def test_custom_module_survives_injected_oom(tmp_path):
    model = new_model()
    result = memfit.fit(model, ns["make_data"](96), loss_fn=ns["loss_fn"], eval_data=ns["make_data"](32, 1),
                        output_dir=tmp_path / "run", **ns["OPTIONS"])
    assert result.status == "finished" and result.step == 10
    ooms = [r for r in result.history if r["kind"] == "oom"]
    assert ooms and ooms[0]["old_micro_batch"] == 8 and ooms[0]["new_micro_batch"] == 4
    rows = train_rows(result)
    assert all(r[3] == 4 for r in rows) and rows[-1][1] < rows[0][1]
    assert "val_loss" in result.metrics and (result.final_model / "model.safetensors").exists()
    assert (result.run_dir / "best" / "model.safetensors").exists()


def test_sigint_saves_and_a_second_call_resumes_exactly(tmp_path):
    reference = new_model()
    ref = memfit.fit(reference, ns["make_data"](96), loss_fn=ns["loss_fn"], output_dir=tmp_path / "ref",
                     **ns["OPTIONS"])

    def ctrl_c(step, row):
        if step == 4:
            signal.raise_signal(signal.SIGINT)      # what Ctrl-C in a notebook delivers to the kernel

    model = new_model()
    first = memfit.fit(model, ns["make_data"](96), loss_fn=ns["loss_fn"], output_dir=tmp_path / "cut",
                       on_step=ctrl_c, **ns["OPTIONS"])
    assert first.status == "stopped" and first.step == 4
    assert (tmp_path / "cut" / "checkpoints" / "step-4" / "state.pt").exists()
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler     # handlers restored
    second = memfit.fit(model, ns["make_data"](96), loss_fn=ns["loss_fn"], output_dir=tmp_path / "cut",
                        resume="auto", **ns["OPTIONS"])
    assert second.status == "finished" and second.step == 10
    assert train_rows(second) == train_rows(ref)
    a, b = reference.state_dict(), model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_killed_process_resumes_bit_identically(tmp_path):
    script = tmp_path / "job.py"
    script.write_text(SETUP + textwrap.dedent('''
        import os, signal, sys
        import memfit
        out, kill_at = sys.argv[1], int(sys.argv[2])
        def on_step(step, row):
            if step == kill_at:
                os.kill(os.getpid(), signal.SIGKILL)
        torch.manual_seed(0)
        memfit.fit(Student(), make_data(96), loss_fn=loss_fn, output_dir=out, on_step=on_step, resume="auto",
                   save_every=3, **OPTIONS)
    '''))
    env = {**os.environ, "PYTHONPATH": str(Path(memfit.__file__).parents[1])}

    def run(out, kill_at):
        return subprocess.run([sys.executable, str(script), str(out), str(kill_at)], env=env,
                              capture_output=True, text=True, timeout=300)

    killed = run(tmp_path / "cut", 5)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert (tmp_path / "cut" / "checkpoints" / "step-3").exists()
    assert not (tmp_path / "cut" / "final_model").exists()
    resumed = run(tmp_path / "cut", -1)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    whole = run(tmp_path / "whole", -1)
    assert whole.returncode == 0, whole.stderr[-2000:]
    a = load_file(tmp_path / "whole" / "final_model" / "model.safetensors")
    b = load_file(tmp_path / "cut" / "final_model" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_each_call_releases_the_previous_runs_memory(tmp_path):
    model = new_model()
    refs = {}

    def grab(step, row):
        refs["opt"] = weakref.ref(api._previous[-1]().optimizer)

    memfit.fit(model, ns["make_data"](32), loss_fn=ns["loss_fn"], output_dir=tmp_path / "one", on_step=grab,
               **{**ns["OPTIONS"], "max_steps": 2})
    gc.collect()
    assert refs["opt"]() is None and all(p.grad is None for p in model.parameters())

    calls = {"n": 0}

    def failing_loss(m, batch):
        calls["n"] += 1
        if calls["n"] > 5:
            raise RuntimeError("boom")
        return ns["loss_fn"](m, batch)

    # excinfo keeps the traceback, as a notebook does (sys.last_traceback)
    with pytest.raises(RuntimeError, match="boom") as excinfo:
        memfit.fit(model, ns["make_data"](32), loss_fn=failing_loss, output_dir=tmp_path / "two",
                   on_step=grab,
                   **{**ns["OPTIONS"], "inject_oom_above_tokens": None})
    gc.collect()
    opt = refs["opt"]()
    assert opt is None or not opt.state
    assert all(p.grad is None for p in model.parameters())
    assert excinfo.value.__traceback__ is not None
