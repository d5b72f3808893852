"""Auto-fit against an injected memory limit, the `memfit plan` entry point, and pre-flight.

The injection raises a real torch.OutOfMemoryError from inside the training step the moment live
tensor bytes exceed the limit (the CPU analogue of the CUDA allocator refusing a block), so "the
chosen micro-batch runs and the next larger one fails" is tested on the loop's own step code
(memfit.train.step.accumulate, build_optimizer, clipping, zero_grad)."""

import json
import math

import pytest
import torch

from memfit.config import from_dict
from memfit.memtrack import ByteLimit, LiveTensorTracker
from memfit.plan import auto_fit, make_plan, plan_main, plan_to_json, render_plan
from memfit.plan.core import CPU_RUNTIME_BYTES, build_plan
from memfit.plan.fit import DoesNotFit
from memfit.plan.spec import Knobs
from memfit.train.preflight import preflight

BASE = {"gpu": "cpu", "target_params": "120k", "vocab_size": 1024, "seq_len": 128, "effective_batch": 8,
        "batch_size": 8, "precision": "fp32", "data": ["shakespeare"], "max_steps": 10}


def _real_steps(cfg, micro_batch: int, limit: int, steps: int = 2) -> None:
    """Real CPU training with the loop's step code under an injected byte limit."""
    from memfit.models import build_causal_lm, size_model
    from memfit.models.optim import build_optimizer
    from memfit.precision import Precision
    from memfit.train.step import accumulate

    torch.manual_seed(0)
    shape = size_model(cfg.model.target_params, cfg.model.arch, cfg.data.vocab_size, cfg.data.seq_len)
    model = build_causal_lm(shape)
    model.train()
    opt = build_optimizer(model, "adamw", 1e-3, 0.1, (0.9, 0.95), "cpu")
    prec = Precision("fp32", "cpu", "test")
    scaler = prec.make_scaler()
    eff, T = cfg.effective_batch(), cfg.data.seq_len
    ids = torch.randint(0, cfg.data.vocab_size, (eff, T))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}
    params = [p for p in model.parameters()]
    # the budget covers tensors the job owns: measure what already exists apart from them
    base = LiveTensorTracker(count_existing=True)
    with base:
        pass
    own = sum(p.untyped_storage().nbytes() for p in params) + 3 * ids.untyped_storage().nbytes()
    with ByteLimit(limit + base.current_bytes - own):
        for _ in range(steps):
            accumulate(model, batch, micro_batch, prec, scaler)
            torch.nn.utils.clip_grad_norm_([p for p in params if p.grad is not None], 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)


def test_auto_fit_chosen_micro_batch_runs_and_next_fails_under_injected_limit():
    cfg = from_dict(BASE)
    p3 = build_plan(cfg, Knobs(3, 3, "fp32", False, "adamw"))
    p4 = build_plan(cfg, Knobs(4, 2, "fp32", False, "adamw"))
    tensors3, tensors4 = p3.memory.peak_tensor_bytes, p4.memory.peak_tensor_bytes
    assert tensors4 > tensors3
    limit = (tensors3 + tensors4) // 2                     # the tensor budget: between 3 and 4 rows
    budget = limit + CPU_RUNTIME_BYTES                      # what --gpu-memory names on a CPU target
    fitted, lines = auto_fit(cfg.replace(budget={"gpu_memory": budget}), margin=0.0)
    assert fitted.train.batch_size == 3, lines
    assert fitted.effective_batch() == 8
    assert any(line.startswith("gradient accumulation 3") for line in lines)
    assert any("checkpointing off" in line for line in lines)
    _real_steps(fitted, 3, limit)                            # the chosen size runs...
    with pytest.raises(torch.OutOfMemoryError):
        _real_steps(fitted, 4, limit)                        # ...and the next larger one does not


def test_auto_fit_prefers_checkpointing_then_8bit_then_gives_up():
    cfg = from_dict(BASE)
    p1 = build_plan(cfg, Knobs(1, 8, "fp32", False, "adamw"))
    p1_gc = build_plan(cfg, Knobs(1, 8, "fp32", True, "adamw"))
    assert p1_gc.memory.nvidia_smi < p1.memory.nvidia_smi
    tight = cfg.replace(budget={"gpu_memory": (p1.memory.nvidia_smi + p1_gc.memory.nvidia_smi) // 2})
    fitted, lines = auto_fit(tight, margin=0.0)
    assert fitted.train.gradient_checkpointing and fitted.optim.optimizer == "adamw"
    assert any("checkpointing on" in line for line in lines)
    with pytest.raises(DoesNotFit) as e:
        auto_fit(cfg.replace(budget={"gpu_memory": CPU_RUNTIME_BYTES + 1000}), margin=0.0)
    assert "does not fit" in e.value.lines[-1]
    assert plan_main(cfg.replace(budget={"gpu_memory": CPU_RUNTIME_BYTES + 1000}), fit=True, as_json=True) == 3


def test_plan_json_and_table(capsys):
    cfg = from_dict({**BASE, "gpu": "t4", "batch_size": 4, "effective_batch": None, "gradient_accumulation_steps": 2,
                     "disk_budget": "1GB", "time_limit": "1h"})
    assert plan_main(cfg, fit=False, as_json=True) == 0
    out = json.loads(capsys.readouterr().out)
    for key in ("peak_allocated_bytes", "peak_reserved_bytes", "device_total_bytes", "cuda_context_bytes",
                "step_seconds", "checkpoint_bytes_full", "fits"):
        assert key in out
    assert out["fits"] and out["precision"] == "fp32" and out["gradient_accumulation_steps"] == 2
    assert out["peak_reserved_bytes"] >= out["peak_allocated_bytes"] > out["peak_tensor_bytes"]
    assert out["nvidia_smi_bytes"] == out["peak_reserved_bytes"] + out["cuda_context_bytes"]
    assert out["checkpoint_bytes_full"] > out["checkpoint_bytes_light"] > 0 and out["fits_session"]
    rng = torch.get_rng_state()
    plan = make_plan(cfg)
    assert torch.equal(rng, torch.get_rng_state())       # planning consumes no RNG
    assert plan.trace is not None and plan.memory.peak_tensor_bytes == out["peak_tensor_bytes"]
    plan = make_plan(cfg, engine="analytic")
    text = render_plan(plan)
    assert "nvidia-smi" in text and "FITS" in text and "checkpoint" in text
    assert plan_to_json(plan)["engine"] == "analytic"


def test_preflight_consumes_no_rng_and_leaves_weights_alone():
    from memfit.device import detect
    from memfit.models import build_causal_lm, size_model
    cfg = from_dict({**BASE, "batch_size": 2, "effective_batch": 4})
    plan = build_plan(cfg, Knobs(2, 2, "fp32", False, "adamw"))
    torch.manual_seed(7)
    shape = size_model(cfg.model.target_params, "gpt2", cfg.data.vocab_size, cfg.data.seq_len)
    model = build_causal_lm(shape)
    before = [p.detach().clone() for p in model.parameters()]
    rng = torch.get_rng_state()
    res = preflight(model, cfg, detect("cpu"), plan=plan)
    assert res["ok"] and res["micro_batch"] == 2 and not res["shrunk"]
    assert torch.equal(rng, torch.get_rng_state())
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert all(p.grad is None for p in model.parameters())
    # the plan's exact tensor peak vs the measured one (the effective batch rows are the difference)
    assert abs(res["error_pct"]) < 3, res
    assert math.isfinite(res["tokens_per_second"])


def test_memory_monitor_on_cpu():
    from memfit.device import detect
    from memfit.plan.monitor import MemoryMonitor
    mon = MemoryMonitor(detect("cpu"))
    s = mon.sample()
    assert s["rss"] > 0 and s["ram_available"] > 0
    assert mon.summary()["rss"] >= s["rss"] and "rss" in mon.line()
