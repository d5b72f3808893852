"""Every run plans first (issue 12): the compact block's numbers, and the gate on real `memfit train` runs.

The memory limit of the end-to-end runs is real: MEMFIT_TEST_LIVE_BYTES_LIMIT makes the training step run
under memtrack.ByteLimit, which raises a real torch.OutOfMemoryError the moment live tensor bytes exceed it
(the CPU analogue of the CUDA allocator refusing a block), and the plan's budget is the same limit plus
the runtime the CPU plan adds (--gpu cpu --gpu-memory)."""

import json
import os
import subprocess
import sys

import pytest

from memfit import cli
from memfit.plan import make_plan
from memfit.plan.block import plan_block, sessions_needed, steps_per_session
from memfit.plan.core import CPU_RUNTIME_BYTES, build_plan
from memfit.plan.spec import Knobs

MiB = 2 ** 20


def parse(*argv):
    return cli.config_from_args(cli.build_parser().parse_args(["plan", *argv]), "pretrain")


TINY = ["--target-params", "150k", "--vocab-size", "512", "--seq-len", "32", "--batch-size", "4",
        "--gradient-accumulation-steps", "2", "--data", "shakespeare", "--gpu", "cpu", "--precision", "fp32"]


def test_sessions_arithmetic():
    assert steps_per_session(1.0, 100.0) == 95                 # 5% of the session kept for save/eval/export
    assert sessions_needed(1000, 1.0, 100.0) == (11, 95)       # ceil(1000 / 95)
    assert sessions_needed(1000, 1.0, 100.0, start_step=950) == (1, 1000)
    assert sessions_needed(50, 1.0, 100.0) == (1, 50)
    assert sessions_needed(10, 200.0, 100.0) == (None, 0)      # not even one step per session


def test_block_sessions_and_checkpoints_on_a_real_plan():
    base = make_plan(parse(*TINY, "--max-steps", "1000", "--disk-budget", "1GB"))
    s = base.time.step_seconds
    d = base.disk
    # a session that holds exactly 410 steps after its 5% reserve; a disk that holds 3 full checkpoints
    session = s * 410.5 / 0.95
    disk = d.final_model + d.checkpoint_light + 3 * d.checkpoint_full + d.checkpoint_full // 2
    plan = make_plan(parse(*TINY, "--max-steps", "1000", "--time-limit", f"{session:.9f}",
                           "--disk-budget", str(disk)))
    assert plan.time.step_seconds == s and plan.time.total_steps == 1000
    assert plan.disk.checkpoints_fit == 3
    text = plan_block(plan)
    lines = text.splitlines()
    assert 6 <= len(lines) <= 10, text
    assert lines[0].startswith("plan (") and "FITS" in lines[0] and "headroom" in lines[0]
    assert "needs ~3 sessions of" in text and "this one reaches step 410 of 1,000, then stops resumably" in text
    assert "3 fit --disk-budget" in text
    assert "live tensor bytes" in text and "micro-batch 4 x 2 accumulation = effective 8" in text
    resumed = plan_block(plan, start_step=820)                 # the last 180 steps: one session
    assert "the job fits this session" in resumed


def test_block_on_a_gpu_profile_names_allocated_reserved_and_nvidia_smi():
    plan = make_plan(parse(*TINY[:-4], "--gpu", "t4", "--max-steps", "10", "--disk-budget", "1GB"), engine="analytic")
    text = plan_block(plan)
    assert "allocated" in text and "reserved" in text and "nvidia-smi" in text and "CUDA context" in text


# ---------------------------------------------------------------- the gate on real runs

RUN = ["--target-params", "500k", "--vocab-size", "1024", "--seq-len", "256", "--batch-size", "8",
       "--precision", "fp32", "--max-steps", "3", "--eval-batches", "1", "--sample-tokens", "0",
       "--gpu", "cpu", "--disk-budget", "2GB", "--quiet"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    from test_train_e2e import small_corpus
    return small_corpus(tmp_path_factory.mktemp("gate") / "data")


@pytest.fixture(scope="module")
def limit(corpus):
    """A live-bytes limit between the plan's peak at micro-batch 4 and at 8 (8 cannot run, 4 can)."""
    cfg = parse(*RUN, "--data", str(corpus))
    p4 = build_plan(cfg, Knobs(4, 2, "fp32", False, "adamw")).memory.peak_tensor_bytes
    p8 = build_plan(cfg, Knobs(8, 1, "fp32", False, "adamw")).memory.peak_tensor_bytes
    assert p8 - p4 > 20 * MiB
    return (p4 + p8) // 2


def memfit(*argv, env_extra=None):
    env = {**os.environ, **(env_extra or {})}
    return subprocess.run([sys.executable, "-m", "memfit.cli", *argv], capture_output=True, text=True, env=env)


def oom_events(run):
    return [r for r in json.loads((run / "training_history.json").read_text())["events"] if r["kind"] == "oom"]


def plan_json_of(*argv):
    out = memfit("plan", *argv, "--json")
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


@pytest.mark.slow
def test_auto_fit_trains_without_oom_where_the_given_micro_batch_hits_one(tmp_path, corpus, limit):
    budget = str(limit + CPU_RUNTIME_BYTES)
    env = {"MEMFIT_TEST_LIVE_BYTES_LIMIT": str(limit)}
    flags = [*RUN, "--data", str(corpus), "--gpu-memory", budget]

    auto = tmp_path / "auto"
    r = memfit("train", *flags, "--auto-fit", "--output-dir", str(auto), env_extra=env)
    assert r.returncode == 0, r.stderr
    saved = (auto / "config.yaml").read_text()
    import yaml
    cfg = yaml.safe_load(saved)
    mb = cfg["train"]["batch_size"]
    assert 1 <= mb < 8 and cfg["train"]["precision"] == "fp32"
    plan = json.loads((auto / "plan.json").read_text())
    assert plan["micro_batch"] == mb and plan["effective_batch"] == 8 and plan["fits"]
    assert any(x.startswith(f"micro-batch {mb}:") for x in plan["auto_fit"])
    assert oom_events(auto) == []
    # plan.json is what `memfit plan --json` says for the same flags
    assert plan == plan_json_of(*flags, "--auto-fit", "--output-dir", str(auto))
    # a resume keeps the checkpointed choices (the flags still say --batch-size 8): no re-fit, no OOM
    r = memfit("train", *[f if f != "3" else "5" for f in flags], "--auto-fit", "--resume", "auto",
               "--output-dir", str(auto), env_extra=env)
    assert r.returncode == 0, r.stderr
    assert yaml.safe_load((auto / "config.yaml").read_text())["train"]["batch_size"] == mb
    assert json.loads((auto / "training_history.json").read_text())["summary"]["step"] == 5
    assert oom_events(auto) == []

    plain = tmp_path / "plain"
    r = memfit("train", *[f for f in flags if f != "--quiet"], "--output-dir", str(plain), env_extra=env)
    assert r.returncode == 0, r.stderr
    assert "DOES NOT FIT" in r.stdout and "--auto-fit" in r.stdout and f"--batch-size {mb}" in r.stdout
    events = oom_events(plain)
    assert events and events[0]["old_micro_batch"] == 8 and events[0]["what"] == "train"
    plan = json.loads((plain / "plan.json").read_text())
    assert not plan["fits"] and plan["micro_batch"] == 8 and plan["fits_with"]["flags"].startswith(f"--batch-size {mb}")
    assert plan == plan_json_of(*flags, "--output-dir", str(plain))


def test_nothing_fits_exits_3_before_the_model_and_writes_nothing(tmp_path, corpus):
    run = tmp_path / "nofit"
    r = memfit("train", *RUN, "--data", str(corpus), "--gpu-memory", "700MB", "--auto-fit",
               "--output-dir", str(run))
    assert r.returncode == 3, r.stderr
    assert not run.exists()                                     # no config.yaml, no plan.json, nothing
    assert "smallest is" in r.stderr and "over budget" in r.stderr and "What would help" in r.stderr
    assert "DOES NOT FIT" in r.stdout                          # the block, even under --quiet
    assert "model:" not in r.stdout + r.stderr
