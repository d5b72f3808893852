"""Issue 5: surviving out-of-memory. A real torch.OutOfMemoryError is injected above a token threshold
(--inject-oom-above-tokens), so these CPU tests run exactly the path a CUDA OOM takes."""

from __future__ import annotations

import math
import os
import weakref
from pathlib import Path

import pytest
import torch

from memfit.config import Config
from memfit.data.synth import IndexedBatches
from memfit.device import DeviceInfo
from memfit.jobs.common import assemble_job
from memfit.train import oom as oom_mod
from memfit.train.loop import train
from memfit.train.oom import DoesNotFit, OOMController

CPU = DeviceInfo("cpu", "cpu", 1 << 34, True)
VOCAB = 128


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models: one intra-op thread. On 2 busy shared cores, 2 threads make a step ~30x slower."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


class Stream(IndexedBatches):
    """Effective batches of random tokens, resumable (a position): one per optimizer step.
    lengths[i] is the sequence length of step i (the last repeats); pad[i] rows keep only half."""

    def __init__(self, rows: int, lengths=(16,), seed: int = 0, padded: bool = False) -> None:
        self.rows, self.lengths, self.seed, self.padded = rows, lengths, seed, padded

    def batch(self, i: int) -> dict[str, torch.Tensor]:
        T = self.lengths[min(i, len(self.lengths) - 1)]
        g = torch.Generator().manual_seed(self.seed * 1000 + i)
        ids = torch.randint(0, VOCAB, (self.rows, T), generator=g)
        mask = torch.ones_like(ids)
        labels = ids.clone()
        if self.padded:   # the first half of the rows are half as long: their micro-batches are trimmed
            mask[: self.rows // 2, T // 2:] = 0
            labels[mask == 0] = -100
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def tiny_model(seed: int = 0):
    from memfit.models import build_causal_lm, make_shape
    torch.manual_seed(seed)
    return build_causal_lm(make_shape("gpt2", 1, 32, VOCAB, 64))


def make_job(tmp: Path | None, micro: int, eff: int, steps: int, inject: int | None = None,
             precision: str = "fp32", stream: Stream | None = None, checkpoint: dict | None = None,
             oom: dict | None = None, seed: int = 0):
    cfg = Config().replace(
        train={"batch_size": micro, "effective_batch": eff, "max_steps": steps, "precision": precision,
               "log_every": 1, "eval_every": 0, "sample_tokens": 0},
        optim={"lr": 3e-3, "warmup_steps": 1},
        oom={"inject_oom_above_tokens": inject, **(oom or {})},
        checkpoint={"keep_last": 10, **(checkpoint or {})}, run={"quiet": True})
    stream = stream or Stream(eff)
    job = assemble_job(cfg, tiny_model(seed), stream, steps, CPU, tmp, checkpoint=tmp is not None)
    job.cadence.quiet = True
    return job


def train_rows(job):
    return [r for r in job.history.rows if r["kind"] == "train"]


def oom_rows(job, what=None):
    return [r for r in job.history.rows if r["kind"] == "oom" and (what is None or r["what"] == what)]


def settled(start: int, T: int, limit: int) -> int:
    """The largest size the halving from `start` reaches with size * T <= limit."""
    m = start
    while m * T > limit:
        m //= 2
    return m


# --- the loop: shrink, keep the effective batch, same losses -------------------------------------------

@pytest.mark.parametrize("start,eff,limit", [(8, 8, 40), (6, 8, 50)])
def test_shrinks_to_the_largest_size_under_the_threshold_with_the_same_losses(tmp_path, start, eff, limit):
    # (8, 8, 40): 8x16 -> 4x16 -> 2x16 = 32 tokens fits. (6, 8, 50): 6 -> 3, an uneven split 3+3+2.
    want = settled(start, 16, limit)
    a = make_job(None, start, eff, 5, inject=limit)
    ra = train(a)
    b = make_job(None, want, eff, 5)                     # started at the settled size, no OOM
    rb = train(b)
    assert ra.status == rb.status == "finished" and ra.step == 5
    assert a.oom.micro_batch_size == want
    # Each change is in the history: step 0, old -> new, the reason.
    changes = [(e["step"], e["old_micro_batch"], e["new_micro_batch"]) for e in oom_rows(a)]
    expect, m = [], start
    while m != want:
        expect.append((0, m, m // 2))
        m //= 2
    assert changes == expect
    assert all("injected OOM" in e["reason"] and e["what"] == "train" for e in oom_rows(a))
    assert not oom_rows(b)
    la, lb = [r["loss"] for r in train_rows(a)], [r["loss"] for r in train_rows(b)]
    assert len(la) == 5 and all(r["micro_batch"] == want for r in train_rows(a))
    torch.testing.assert_close(la, lb, rtol=1e-5, atol=1e-6)
    assert [r["tokens"] for r in train_rows(a)] == [r["tokens"] for r in train_rows(b)]
    for p, q in zip(a.model.parameters(), b.model.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


def test_fp16_oom_mid_accumulation_keeps_the_grad_scaler_consistent():
    # Padded rows: micro-batch 1 of 4 rows x 8 tokens (trimmed) = 32 fits and runs its backward, then
    # micro-batch 2 (4 x 16 = 64) OOMs with half the scaled gradients accumulated: they must go.
    runs = {}
    for start, inject in ((4, 40), (2, None)):
        job = make_job(None, start, 8, 4, inject=inject, precision="fp16", stream=Stream(8, padded=True))
        calls = []
        orig = job.oom.check
        job.oom.check = lambda mb, orig=orig, calls=calls: (calls.append(mb["input_ids"].numel()), orig(mb))
        scale0 = job.scaler.get_scale()
        train(job)
        runs[start] = (job, calls, scale0)
    (a, calls, scale0), (b, _, _) = runs[4], runs[2]
    assert calls[:2] == [32, 64]                     # the OOM came mid-accumulation, after a backward
    assert a.oom.micro_batch_size == 2 and [e["new_micro_batch"] for e in oom_rows(a)] == [2]
    assert a.scaler.is_enabled() and a.scaler.get_scale() == b.scaler.get_scale()
    sa, sb = a.scaler.state_dict(), b.scaler.state_dict()
    assert sa == sb and sa["scale"] == scale0        # no step was skipped: the partial one left no trace
    assert not a.scaler._per_optimizer_states
    torch.testing.assert_close([r["loss"] for r in train_rows(a)], [r["loss"] for r in train_rows(b)])
    for p, q in zip(a.model.parameters(), b.model.parameters()):
        torch.testing.assert_close(p, q)


def test_scaler_record_of_a_failed_attempt_is_reset():
    # An attempt that got as far as unscale_() (a caller wrapping the whole step) must not make the
    # redo's unscale_() fail with "unscale_() has already been called on this optimizer".
    model = torch.nn.Linear(4, 4)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", enabled=True)
    ctl = OOMController(4, CPU)

    def step(mbs):
        scaler.scale(model(torch.ones(mbs, 4)).sum()).backward()
        scaler.unscale_(opt)
        if mbs > 2:
            raise torch.OutOfMemoryError("late OOM")
        scaler.step(opt)
        scaler.update()

    ctl.run(0, opt, model, step, scaler=scaler)
    assert ctl.micro_batch_size == 2 and scaler.get_scale() == 2.0 ** 16


def test_failed_attempt_is_freed_before_the_retry():
    # The exception's traceback pins the failed attempt's frames (its activations): they must be
    # released before the smaller attempt runs.
    ctl = OOMController(8, CPU)
    refs = []

    def attempt(mbs):
        big = torch.empty(1 << 20)
        if refs:
            assert refs[-1]() is None, "the failed attempt's tensors are still alive"
        refs.append(weakref.ref(big))
        if mbs > 4:
            raise torch.OutOfMemoryError("too big")
        return mbs

    assert ctl.run(0, None, None, attempt) == 4


def test_regrow_after_clean_steps_and_back_off_after_a_failed_regrow():
    ctl = OOMController(8, CPU, regrow=True, regrow_after=3)
    limit = {"v": 2}

    def fn(mbs):
        if mbs > limit["v"]:
            raise torch.OutOfMemoryError(f"{mbs} > {limit['v']}")
        return mbs

    sizes = [ctl.run(s, None, None, fn) for s in range(3)]
    assert sizes == [2, 2, 2]                        # 8 -> 4 -> 2 at step 0
    limit["v"] = 4                                   # memory freed up (e.g. shorter padded batches)
    sizes = [ctl.run(s, None, None, fn) for s in range(3, 9)]
    # after 2 clean runs: regrow to 4 (fits); after 2 more: 8 fails -> back to 4 and wait 4 runs
    assert sizes == [4, 4, 4, 4, 4, 4]
    kinds = [(e["change"], e["old_micro_batch"], e["new_micro_batch"]) for e in ctl.drain()]
    assert kinds == [("shrink", 8, 4), ("shrink", 4, 2), ("regrow", 2, 4), ("regrow", 4, 8), ("shrink", 8, 4)]
    assert ctl.regrow_failures == 1 and ctl.clean_steps == 3   # the next try needs 2 * 2 clean runs


# --- evaluation and generation recover separately ---------------------------------------------------------

def test_oom_in_eval_shrinks_the_eval_batch_only(tmp_path):
    from memfit.train.evaluate import evaluate_loss
    # Train blocks of 8 tokens (8 x 8 = 64 fits under 100); validation blocks of 32: 8 x 32 -> 4 -> 2.
    job = make_job(None, 8, 8, 4, inject=100, stream=Stream(8, lengths=(8,)))
    val = [Stream(8, lengths=(32,), seed=9).batch(i) for i in range(3)]
    job.hooks.evaluate = lambda: evaluate_loss(job.model, iter(val), job.precision, job.oom.micro_batch_size, 0,
                                               "cpu", oom=job.eval_oom, step=job.counters["step"])
    job.cadence.eval_every = 2
    result = train(job)
    assert result.status == "finished"
    assert job.oom.micro_batch_size == 8 and job.eval_oom.micro_batch_size == 2
    assert not oom_rows(job, "train") and all(r["micro_batch"] == 8 for r in train_rows(job))
    ev = oom_rows(job, "eval")
    assert [(e["step"], e["old_micro_batch"], e["new_micro_batch"]) for e in ev] == [(2, 8, 4), (2, 4, 2)]
    # the history lists the changes before the evaluation they belong to
    kinds = [r["kind"] for r in job.history.rows if r.get("step") == 2]
    assert kinds.index("oom") < kinds.index("eval")
    # the recovered evaluation equals one done without OOM at any size (token-weighted sums)
    plain = evaluate_loss(job.model, iter(val), job.precision, 8, 0, "cpu")
    assert math.isclose(result.metrics["val_loss"], plain["val_loss"], rel_tol=1e-5)
    assert result.metrics["val_tokens"] == plain["val_tokens"] == 3 * 8 * 31
    assert job.registry.get("eval_oom") is job.eval_oom and job.registry.get("oom") is job.oom


def test_generation_oom_shortens_the_sample():
    from memfit.train.evaluate import generate_text

    class Tok:
        eos_token_id, pad_token_id = 0, 0

        def __call__(self, text, return_tensors="pt"):
            from transformers import BatchEncoding
            ids = torch.tensor([[1 + (ord(c) % (VOCAB - 1)) for c in text]])
            return BatchEncoding({"input_ids": ids, "attention_mask": torch.ones_like(ids)})

        def decode(self, ids, skip_special_tokens=True):
            return " ".join(str(int(i)) for i in ids)

    model = tiny_model()
    ctl = OOMController(4, CPU, inject_above_tokens=20, what="eval")
    text = generate_text(model, Tok(), "hello", 40, oom=ctl, step=7)   # 5 + 40 > 20 -> 20 -> 10
    assert len(text.split()) == 10 and ctl.generate_tokens == 10
    assert [(e["step"], e["old_max_new_tokens"], e["new_max_new_tokens"]) for e in ctl.drain()] == \
        [(7, 40, 20), (7, 20, 10)]
    assert ctl.micro_batch_size == 4                 # generation does not touch the eval micro-batch
    ctl.inject_above_tokens = 5                      # not even one new token fits: no sample, no crash
    assert generate_text(model, Tok(), "hello", 40, oom=ctl) == "[no sample: out of memory]"


# --- micro-batch 1 does not fit; the checkpoint and resume ------------------------------------------------

def test_oom_at_micro_batch_1_is_a_clear_error_and_the_last_checkpoint_is_intact(tmp_path):
    from memfit.ckpt.io import verify_checkpoint
    from memfit.jobs.common import run_job
    # Steps 0-3: blocks of 16 (settles at 2 x 16 = 32 <= 40); step 4 brings blocks of 64: 64 > 40 at 1.
    stream = Stream(8, lengths=(16, 16, 16, 16, 64))
    job = make_job(tmp_path, 8, 8, 8, inject=40, stream=stream, checkpoint={"save_every": 2})
    job.oom.advice = ""          # the generic list (the CLI test below covers the planner's numbers)
    with pytest.raises(DoesNotFit) as info:
        run_job(job)
    msg = str(info.value)
    assert "micro-batch 1" in msg and "step 4" in msg and "--gradient-checkpointing" in msg
    assert "step-4" in msg and "--resume auto" in msg
    ck = tmp_path / "checkpoints"
    assert sorted(p.name for p in ck.glob("step-*")) == ["step-2", "step-4"]
    manifest, problems = verify_checkpoint(ck / "step-4")      # every file against its sha256
    assert manifest is not None and problems == []
    # and it resumes: step 4, at the micro-batch that was settled on
    job2 = make_job(tmp_path, 8, 8, 8, stream=Stream(8), checkpoint={"resume": "auto"})
    assert job2.checkpointer.resume("auto") == 4 and job2.oom.micro_batch_size == 2


def test_resume_after_a_shrink_restarts_at_the_shrunken_size(tmp_path):
    stop = {}

    a = make_job(tmp_path, 8, 8, 6, inject=40, checkpoint={"save_every": 3})
    a.hooks.on_step = lambda step, row: stop.setdefault("x", step) if step == 3 else None

    class Interrupt:              # stop resumably after step 3 (as SIGTERM would), saving a checkpoint
        signal_name = "SIGTERM"

        @property
        def requested(self):
            return "x" in stop

    a.interrupt = Interrupt()
    ra = train(a)
    assert ra.status == "stopped" and ra.step == 3 and a.oom.micro_batch_size == 2

    # The same command resumed, without the injected OOM this time: nothing re-discovers the size.
    b = make_job(tmp_path, 8, 8, 6, checkpoint={"resume": "auto"})
    rb = train(b)
    assert rb.status == "finished" and b.oom.micro_batch_size == 2
    rows = train_rows(b)
    assert [r["step"] for r in rows if r["step"] > 3] == [4, 5, 6]
    assert all(r["micro_batch"] == 2 for r in rows if r["step"] > 3)
    assert [e["step"] for e in oom_rows(b)] == [0, 0]      # only the original run's two changes

    # A resume that asks for another micro-batch gets it (the user's new choice wins).
    c = make_job(tmp_path, 4, 8, 6, checkpoint={"resume": "auto"})
    c.checkpointer.resume("auto")
    assert c.oom.micro_batch_size == 4


def test_empty_cache_every_n_steps(monkeypatch):
    import memfit.train.loop as loop_mod
    calls = []
    monkeypatch.setattr(loop_mod, "empty_cache", lambda dev: calls.append(dev))
    train(make_job(None, 4, 4, 6, oom={"empty_cache_every": 2}))
    assert len(calls) == 3
    calls.clear()
    train(make_job(None, 4, 4, 6))                    # off by default
    assert calls == []


# --- allocator settings ----------------------------------------------------------------------------------

def test_allocator_conf_set_only_when_the_user_set_neither(monkeypatch):
    env: dict[str, str] = {}
    name = oom_mod.configure_allocator(env)
    assert name == ("PYTORCH_ALLOC_CONF" if oom_mod._torch_version() >= (2, 11) else "PYTORCH_CUDA_ALLOC_CONF")
    assert env == {name: "expandable_segments:True"}
    for user in ({"PYTORCH_CUDA_ALLOC_CONF": "max_split_size_mb:128"}, {"PYTORCH_ALLOC_CONF": "backend:native"}):
        env = dict(user)
        assert oom_mod.configure_allocator(env) is None and env == user
    monkeypatch.setenv("PYTORCH_ALLOC_CONF", "expandable_segments:True")
    line, on = oom_mod.allocator_report(CPU)
    assert "PYTORCH_ALLOC_CONF=expandable_segments:True" in line and on is None


# --- the CLI end to end: shrink, resume at the shrunken size, exit 3 with the checkpoint intact -------------

def test_cli_shrink_resume_and_exit_3(tmp_path, monkeypatch, capsys):
    from memfit import cli
    from memfit.ckpt.formats import sha256_file
    from memfit.ckpt.io import verify_checkpoint
    monkeypatch.setenv("PYTORCH_ALLOC_CONF", "")      # restored after the test
    monkeypatch.delenv("PYTORCH_ALLOC_CONF")
    monkeypatch.delenv("PYTORCH_CUDA_ALLOC_CONF", raising=False)
    words = ["the", "quick", "brown", "fox", "jumps", "over", "lazy", "dog", "while", "a", "cat", "sleeps",
             "on", "warm", "mat", "and", "birds", "sing", "in", "tall", "green", "trees", "near", "river"]
    import random
    rnd = random.Random(0)
    (tmp_path / "train.txt").write_text("\n\n".join(" ".join(rnd.choices(words, k=60)) for _ in range(40)))
    (tmp_path / "val.txt").write_text("\n\n".join(" ".join(rnd.choices(words, k=60)) for _ in range(3)))
    out = tmp_path / "run"
    base = ["train", "--data", str(tmp_path / "train.txt"), "--val-data", str(tmp_path / "val.txt"),
            "--text-split", "paragraph", "--vocab-size", "300", "--target-params", "120k", "--seq-len", "16",
            "--batch-size", "8", "--effective-batch", "8", "--precision", "fp32", "--warmup-steps", "1",
            "--eval-every", "0", "--eval-batches", "1", "--log-every", "1", "--sample-tokens", "0",
            "--save-every", "2", "--output-dir", str(out), "--quiet"]
    assert cli.main(base + ["--max-steps", "2", "--inject-oom-above-tokens", "40"]) == 0
    assert os.environ.get("PYTORCH_ALLOC_CONF") == "expandable_segments:True"   # memfit set it
    rows = [__import__("json").loads(x) for x in (out / "history.jsonl").read_text().splitlines()]
    changes = [(r["what"], r["old_micro_batch"], r["new_micro_batch"]) for r in rows if r["kind"] == "oom"]
    assert changes == [("train", 8, 4), ("train", 4, 2), ("eval", 8, 4), ("eval", 4, 2)]   # each separately

    # Resumed with a lower limit: it restarts at micro-batch 2 (the first change is 2 -> 1, not 8 -> 4),
    # and as even micro-batch 1 (16 tokens) is over the limit: exit 3, the clear error, step-2 intact.
    ck = out / "checkpoints" / "step-2"
    before = {p.name: sha256_file(p) for p in ck.iterdir()}
    capsys.readouterr()
    assert cli.main(base + ["--max-steps", "4", "--resume", "auto", "--inject-oom-above-tokens", "8"]) == 3
    err = capsys.readouterr().err
    assert "does not fit" in err and "micro-batch 1" in err and "step-2" in err and "--resume auto" in err
    assert "--gradient-checkpointing" in err and "The planner predicts" in err
    assert "resumed at step 2 (micro-batch 2)" in (out / "memfit.log").read_text()
    rows = [__import__("json").loads(x) for x in (out / "history.jsonl").read_text().splitlines()]
    assert [(r["step"], r["old_micro_batch"], r["new_micro_batch"]) for r in rows
            if r["kind"] == "oom" and r["what"] == "train"][-1] == (2, 2, 1)
    assert {p.name: sha256_file(p) for p in ck.iterdir()} == before
    assert verify_checkpoint(ck)[1] == []
