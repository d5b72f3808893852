"""Checkpointer: atomic layout, manifest verification and fallback, exact resume, keep-K + light, best/,
early stopping, disk budget, weights_only loading, shards, explicit/read-only resume."""

from __future__ import annotations

import json
import os
import random
import stat
from pathlib import Path

import numpy as np
import pytest
import safetensors.torch
import torch
from torch import nn

from memfit.ckpt.checkpointer import Checkpointer
from memfit.ckpt.formats import CheckpointError, sha256_file
from memfit.ckpt.io import dir_bytes
from memfit.ckpt.state import RNGState, StateRegistry, ValueState
from memfit.config import Config


class Tiny(nn.Module):
    """Embedding tied to the output head (like GPT-2), so aliasing is exercised too."""

    def __init__(self, vocab: int = 32, width: int = 16) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, width)
        self.mlp = nn.Sequential(nn.Linear(width, 2 * width), nn.GELU(), nn.Linear(2 * width, width))
        self.head = nn.Linear(width, vocab, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, x):
        return self.head(self.mlp(self.emb(x)))


class Rig:
    """A model + AdamW + schedule + RNG + counters + a 'data' part holding numpy state, registered."""

    def __init__(self, run_dir: Path, seed: int = 0, budget: dict | None = None, clock=None, **ckpt) -> None:
        torch.manual_seed(seed)
        self.model = Tiny()
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=1e-2)
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, lambda s: 1.0 / (1 + s))
        self.loop = ValueState(step=0, tokens=0)
        self.data = ValueState(pos=0, order=np.arange(5, dtype=np.int64), seed=np.int64(7))
        self.reg = StateRegistry()
        for name, part in (("model", self.model), ("optimizer", self.opt), ("scheduler", self.sched),
                           ("rng", RNGState()), ("loop", self.loop), ("data", self.data)):
            self.reg.register(name, part)
        self.cfg = Config().replace(checkpoint=ckpt, budget=budget or {})
        self.logs: list[str] = []
        self.ck = Checkpointer(run_dir, self.cfg, self.reg, self.model, log=self.logs.append,
                               **({"clock": clock} if clock else {}))

    def step(self) -> None:
        x = torch.randint(0, 32, (4, 8))
        noise = random.random() + float(np.random.rand())     # python + numpy RNG feed the loss
        loss = self.model(x).float().pow(2).mean() * (1 + noise)
        loss.backward()
        self.opt.step()
        self.sched.step()
        self.opt.zero_grad(set_to_none=True)
        self.loop["step"] += 1
        self.loop["tokens"] += x.numel()
        self.data["pos"] += 1

    def text(self) -> str:
        return "\n".join(self.logs)


def weights(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_atomic_layout_manifest_and_weights_only(tmp_path):
    r = Rig(tmp_path)
    r.step()
    path = r.ck.save(1)
    ck = tmp_path / "checkpoints"
    assert path == ck / "step-1"
    assert sorted(p.name for p in ck.iterdir()) == ["latest", "step-1"]      # no temporary leftovers
    assert (ck / "latest").read_text().strip() == "step-1"
    assert sorted(p.name for p in path.iterdir()) == ["manifest.json", "model.safetensors", "state.pt"]
    m = json.loads((path / "manifest.json").read_text())
    assert m["step"] == 1 and m["kind"] == "full"
    for name, info in m["files"].items():
        assert (info["bytes"], info["sha256"]) == sha256_file(path / name)
    # plain torch, no memfit code: loads with weights_only=True, numpy state encoded safely
    raw = torch.load(path / "state.pt", weights_only=True)
    assert set(raw) == {"optimizer", "scheduler", "rng", "loop", "data", "checkpointer"}
    # stock safetensors reads the weights; the tied head is stored once
    st = safetensors.torch.load_file(path / "model.safetensors")
    assert "head.weight" not in st and torch.equal(st["emb.weight"], r.model.emb.weight)
    assert r.ck.last_save_bytes == m["total_bytes"] and r.ck.last_save_seconds > 0


def test_resume_is_exact(tmp_path):
    a = Rig(tmp_path / "a")
    for _ in range(3):
        a.step()
    a.ck.save(3)
    for _ in range(3):
        a.step()
    expected = weights(a.model)
    expected_draws = (random.random(), float(np.random.rand()), torch.rand(1).item())

    b = Rig(tmp_path / "a", seed=123)           # different init: everything must come from the checkpoint
    assert b.ck.resume("auto") == 3
    assert b.loop["step"] == 3 and b.data["pos"] == 3 and b.data["seed"] == np.int64(7)
    assert isinstance(b.data["order"], np.ndarray) and b.data["order"].tolist() == [0, 1, 2, 3, 4]
    assert b.model.head.weight is b.model.emb.weight                 # tying survives loading
    for _ in range(3):
        b.step()
    got = weights(b.model)
    assert all(torch.equal(got[k], expected[k]) for k in expected)
    assert (random.random(), float(np.random.rand()), torch.rand(1).item()) == expected_draws
    assert b.sched.get_last_lr() == a.sched.get_last_lr()


@pytest.mark.parametrize("damage,needle", [
    ("truncate", "state.pt is"),
    ("flip", "model.safetensors is corrupt (sha256"),
    ("no-manifest", "manifest.json is missing"),
])
def test_damaged_newest_falls_back_with_a_message(tmp_path, damage, needle):
    r = Rig(tmp_path, keep_last=5)
    for s in (1, 2, 3):
        r.step()
        r.ck.save(s)
    newest = tmp_path / "checkpoints" / "step-3"
    if damage == "truncate":
        p = newest / "state.pt"
        p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])
    elif damage == "flip":
        p = newest / "model.safetensors"
        data = bytearray(p.read_bytes())
        data[len(data) - 10] ^= 0x01
        p.write_bytes(bytes(data))
    else:
        (newest / "manifest.json").unlink()
    b = Rig(tmp_path, seed=9, keep_last=5)
    assert b.ck.resume("auto") == 2
    assert b.loop["step"] == 2
    assert needle in b.text() and "step-3" in b.text() and "falling back" in b.text()
    if damage == "truncate":
        assert "truncated" in b.text()
    # the bad one is set aside (not resumable), then deleted by the next good save
    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert "step-3" not in names and any(n.startswith("corrupt-step-3") for n in names)
    b.step()
    b.ck.save(3)
    assert not any(p.name.startswith("corrupt-") for p in (tmp_path / "checkpoints").iterdir())


def test_keep_k_auto_makes_older_light(tmp_path):
    r = Rig(tmp_path, keep_last=3)
    for s in range(1, 6):
        r.step()
        r.ck.save(s)
    ck = tmp_path / "checkpoints"
    assert sorted(p.name for p in ck.iterdir() if p.name.startswith("step-")) == ["step-3", "step-4", "step-5"]
    kinds = {s: json.loads((ck / f"step-{s}" / "manifest.json").read_text())["kind"] for s in (3, 4, 5)}
    assert kinds == {3: "light", 4: "full", 5: "full"}
    assert not (ck / "step-3" / "state.pt").exists()
    light = json.loads((ck / "step-3" / "manifest.json").read_text())
    assert "state.pt" not in light["files"] and light["total_bytes"] < \
        json.loads((ck / "step-5" / "manifest.json").read_text())["total_bytes"] / 2


def test_full_and_light_modes(tmp_path):
    r = Rig(tmp_path / "full", keep_last=3, save_optimizer_state="full")
    for s in range(1, 5):
        r.ck.save(s)
    assert all((tmp_path / "full" / "checkpoints" / f"step-{s}" / "state.pt").exists() for s in (2, 3, 4))

    r = Rig(tmp_path / "light", keep_last=2, save_optimizer_state="light")
    r.step()
    r.ck.save(1)
    assert not (tmp_path / "light" / "checkpoints" / "step-1" / "state.pt").exists()
    r.ck.save(2, kind="full")     # an explicit full save (e.g. an emergency save) is still possible
    assert (tmp_path / "light" / "checkpoints" / "step-2" / "state.pt").exists()
    b = Rig(tmp_path / "light2", seed=5, save_optimizer_state="light")
    assert b.ck.resume(str(tmp_path / "light" / "checkpoints" / "step-1")) == 1
    assert torch.equal(b.model.emb.weight, r.model.emb.weight)
    assert "weights only" in b.text() and "optimizer" in b.ck.resume_missing


def test_same_step_saved_once(tmp_path):
    r = Rig(tmp_path)
    p1 = r.ck.save(4)
    mtime = (p1 / "manifest.json").stat().st_mtime_ns
    assert r.ck.save(4) == p1 and (p1 / "manifest.json").stat().st_mtime_ns == mtime
    assert not r.ck.should_save(4)


def test_should_save_every_n_steps(tmp_path):
    r = Rig(tmp_path, save_every=3)
    assert [s for s in range(1, 10) if r.ck.should_save(s)] == [3, 6, 9]
    # time-based: an injected clock, so a loaded machine (a slow save) cannot change the answer
    now = [0.0]
    r2 = Rig(tmp_path / "m", save_every_minutes=1.0, clock=lambda: now[0])
    now[0] = 59.9
    assert not r2.ck.should_save(1)
    now[0] = 60.0
    assert r2.ck.should_save(1)
    r2.ck.save(1)
    now[0] = 119.9
    assert not r2.ck.should_save(2)        # the clock restarts at each save
    now[0] = 120.0
    assert r2.ck.should_save(2)


def test_best_survives_rotation_and_early_stopping(tmp_path):
    r = Rig(tmp_path, keep_last=2, early_stopping_patience=2)
    losses = [3.0, 2.0, 2.5, 1.5, 1.6, 1.7]
    improved = []
    for s, loss in enumerate(losses, 1):
        r.step()
        improved.append(r.ck.update_best(s, {"val_loss": loss, "val_ppl": float(np.exp(loss))}))
        r.ck.save(s)                      # as in the loop: evaluate, then checkpoint
    assert improved == [True, True, False, True, False, False]
    assert r.ck.should_stop_early()
    best = tmp_path / "best"
    info = json.loads((best / "metrics.json").read_text())
    assert info["step"] == 4 and info["value"] == 1.5 and info["metric"] == "val_loss"
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir() if p.name.startswith("step")) == \
        ["step-5", "step-6"]
    assert "state.pt" not in os.listdir(best)
    # best counters are resumable state
    b = Rig(tmp_path, seed=3, keep_last=2, early_stopping_patience=2)
    assert b.ck.resume("auto") == 6
    assert b.ck.tracker.value == 1.5 and b.ck.should_stop_early()
    # accuracy-like metrics: greater is better by default
    acc = Rig(tmp_path / "acc", metric_for_best="accuracy")
    assert acc.ck.update_best(1, {"accuracy": 0.5}) and acc.ck.update_best(2, {"accuracy": 0.6})
    assert not acc.ck.update_best(3, {"accuracy": 0.55})


def test_disk_budget_fitting_two_checkpoints_is_never_exceeded(tmp_path):
    probe = Rig(tmp_path / "probe")
    probe.step()                                  # optimizer state exists from the first step on
    probe.ck.save(1)
    full = dir_bytes(tmp_path / "probe" / "checkpoints" / "step-1")
    probe.ck.update_best(1, {"val_loss": 1.0})
    best = dir_bytes(tmp_path / "probe" / "best")
    budget = 2 * full + best + full // 4          # two checkpoints and best/, never three

    r = Rig(tmp_path / "run", keep_last=4, budget={"disk_budget": budget})
    run = tmp_path / "run"
    saved = []
    for s in range(1, 11):
        r.step()
        saved.append(r.ck.save(s))
        assert dir_bytes(run) <= budget
        if s % 2 == 0:
            r.ck.update_best(s, {"val_loss": 10.0 - s})
            assert dir_bytes(run) <= budget
    assert all(p is not None for p in saved)              # it kept going, pruning old members
    assert r.ck.room.peak_bytes <= budget                      # including the bytes of saves in progress
    assert json.loads((run / "best" / "metrics.json").read_text())["step"] == 10
    steps = sorted(p.name for p in (run / "checkpoints").iterdir() if p.name.startswith("step"))
    assert "step-10" in steps and len(steps) <= 2
    assert "disk budget" in r.text()


def test_checkpoint_that_cannot_fit_is_skipped_and_last_good_kept(tmp_path):
    probe = Rig(tmp_path / "probe")
    probe.step()                                  # optimizer state exists from the first step on
    probe.ck.save(1)
    full = dir_bytes(tmp_path / "probe" / "checkpoints")
    r = Rig(tmp_path / "run", budget={"disk_budget": full + full // 2})
    r.step()
    assert r.ck.save(1) is not None
    r.step()
    assert r.ck.save(2) is None
    assert "needs ~" in r.text() and "keeping step-1" in r.text()
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == ["latest", "step-1"]
    assert dir_bytes(tmp_path / "run") <= full + full // 2


def test_prediction_underestimate_is_caught_while_writing(tmp_path):
    r = Rig(tmp_path, budget={"disk_budget": 10 ** 9})
    r.ck.save(1)
    r.ck.room.disk_budget = dir_bytes(tmp_path) + 5000          # far less than a checkpoint
    r.ck.room.predict = lambda *a: 1                           # pretend it fits
    assert r.ck.save(2) is None
    assert "past its disk budget" in r.text()
    assert not any(p.name.startswith(".tmp") for p in (tmp_path / "checkpoints").iterdir())


def test_sharded_model_files(tmp_path):
    r = Rig(tmp_path)
    r.ck.max_shard_bytes = 1500
    r.step()
    path = r.ck.save(1)
    shards = sorted(p.name for p in path.iterdir() if p.name.endswith(".safetensors"))
    assert len(shards) > 1 and (path / "model.safetensors.index.json").exists()
    b = Rig(tmp_path, seed=4)
    assert b.ck.resume("auto") == 1
    assert all(torch.equal(x, y) for x, y in zip(b.model.state_dict().values(), r.model.state_dict().values()))


def test_resume_from_read_only_path_into_a_new_run(tmp_path):
    src = Rig(tmp_path / "src")
    src.step()
    src.ck.save(1)
    src.step()
    src.ck.save(2)
    ro = tmp_path / "src" / "checkpoints"
    before = {p: p.stat().st_mtime_ns for p in ro.rglob("*")}
    for p in [ro, *ro.rglob("*")]:
        p.chmod(p.stat().st_mode & ~(stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH))
    try:
        b = Rig(tmp_path / "new", seed=8)
        assert b.ck.resume(str(tmp_path / "src")) == 2            # a run dir: newest good
        c = Rig(tmp_path / "new2", seed=8)
        assert c.ck.resume(str(ro / "step-1")) == 1               # one checkpoint
        c.step()
        assert c.ck.save(2) == tmp_path / "new2" / "checkpoints" / "step-2"
        with pytest.raises(CheckpointError, match="no such file"):
            c.ck.resume(str(tmp_path / "nowhere"))
        assert {p: p.stat().st_mtime_ns for p in ro.rglob("*")} == before     # untouched (even as root)
    finally:
        for p in [ro, *ro.rglob("*")]:
            p.chmod(p.stat().st_mode | stat.S_IWUSR)


def test_explicit_corrupt_checkpoint_is_an_error(tmp_path):
    r = Rig(tmp_path)
    path = r.ck.save(1)
    (path / "state.pt").write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="state.pt is 7 bytes"):
        Rig(tmp_path / "b").ck.resume(str(path))


def test_auto_with_nothing_starts_fresh_and_none_sets_existing_aside(tmp_path):
    r = Rig(tmp_path)
    assert r.ck.resume("auto") is None and "starting fresh" in r.text()
    r.ck.save(5)
    r2 = Rig(tmp_path)
    assert r2.ck.resume(None) is None
    names = [p.name for p in (tmp_path / "checkpoints").iterdir()]
    assert "step-5" not in names and any(n.startswith("abandoned-step-5") for n in names)
    assert Rig(tmp_path).ck.resume("auto") is None


def test_resume_older_path_sets_newer_future_aside(tmp_path):
    r = Rig(tmp_path, keep_last=5)
    for s in (1, 2, 3):
        r.ck.save(s)
    b = Rig(tmp_path, keep_last=5)
    assert b.ck.resume(str(tmp_path / "checkpoints" / "step-1")) == 1
    assert Rig(tmp_path, keep_last=5).ck.resume("auto") == 1       # 2 and 3 are no longer candidates


def test_stale_temporary_dirs_are_removed_on_start(tmp_path):
    r = Rig(tmp_path)
    r.ck.save(1)
    stale = tmp_path / "checkpoints" / ".tmp-step-2-99999"
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"x" * 10)
    b = Rig(tmp_path)
    assert not stale.exists() and "unfinished save" in b.text()
    assert b.ck.resume("auto") == 1


def test_generic_model_part_with_extras(tmp_path):
    class Adapter:
        def __init__(self):
            self.w = torch.zeros(3)

        def state_dict(self):
            return {"lora.w": self.w, "base_hash": "abc123"}

        def load_state_dict(self, d):
            assert d["base_hash"] == "abc123"
            self.w = d["lora.w"].clone()

    reg = StateRegistry()
    part = Adapter()
    part.w += 2
    reg.register("model", part)
    ck = Checkpointer(tmp_path, Config(), reg, nn.Linear(1, 1), log=lambda s: None)
    ck.save(1)
    part2 = Adapter()
    reg2 = StateRegistry()
    reg2.register("model", part2)
    assert Checkpointer(tmp_path, Config(), reg2, nn.Linear(1, 1), log=lambda s: None).resume("auto") == 1
    assert part2.w.tolist() == [2.0, 2.0, 2.0]


def test_unsaveable_state_is_refused_by_name(tmp_path):
    r = Rig(tmp_path)
    r.loop["callback"] = object()
    with pytest.raises(TypeError, match=r"state\.loop\.callback"):
        r.ck.save(1)
    assert not any(p.name.startswith(".tmp") for p in (tmp_path / "checkpoints").iterdir())
