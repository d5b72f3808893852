"""Pre-flight: 1-2 real training steps on the real device, at the planned micro-batch, before a run.

It measures the real peak (CUDA: max_memory_allocated/reserved and NVML through memfit.device;
CPU: live tensor bytes, memfit.memtrack), compares it with the plan, and, if the planned micro-batch
runs out of memory or exceeds the budget, halves it until it fits — so the run starts at a size that
works instead of discovering it at step 1.

It leaves no trace on the run: the batch is synthetic (token ids from a private generator: no data is
read), every RNG it could touch (python, numpy, torch CPU/CUDA — dropout draws from torch's) is saved
and restored, the optimizer is a throwaway of the same kind stepped with lr=0 and weight_decay=0
(its state is allocated exactly as the real one will be; the weights do not move), and gradients are
freed. A resumed run passes the checkpointed micro-batch as `micro_batch`: it wins over the plan.
"""

from __future__ import annotations

import gc
import math
import time
from collections.abc import Callable
from typing import Any

GiB = 2 ** 30


def _throwaway_optimizer(model, name: str, device_type: str):
    import torch
    params = [p for p in model.parameters() if p.requires_grad]
    if name == "adamw":
        try:
            return torch.optim.AdamW(params, lr=0.0, weight_decay=0.0, fused=True)
        except (RuntimeError, TypeError):
            return torch.optim.AdamW(params, lr=0.0, weight_decay=0.0, foreach=True)
    import bitsandbytes as bnb
    cls = bnb.optim.PagedAdamW8bit if (name == "paged_adamw8bit" and device_type == "cuda") else bnb.optim.AdamW8bit
    return cls(params, lr=0.0, weight_decay=0.0)


def _synthetic_batch(rows: int, seq_len: int, vocab: int, classify: bool, num_labels: int):
    import torch
    g = torch.Generator().manual_seed(1234)   # private: the global RNG is not consumed
    ids = torch.randint(0, max(2, vocab), (rows, seq_len), generator=g)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    batch["labels"] = torch.randint(0, num_labels, (rows,), generator=g) if classify else ids.clone()
    return batch


def _default_loss(classify: bool, chunked: bool = True) -> Callable:
    from memfit.models.loss import classification_loss, lm_loss
    return classification_loss() if classify else lm_loss(chunked)


def _run_steps(model, batch, micro_batch: int, steps: int, precision, opt_name: str, device,
               loss_fn, max_grad_norm: float) -> tuple[dict[str, int], float]:
    """Real steps; returns the measured peaks and seconds of the last step."""
    import torch

    from memfit.device import memory_stats, reset_peak, synchronize
    from memfit.memtrack import LiveTensorTracker
    from memfit.train.step import accumulate

    dev = device.torch_device
    scaler = precision.make_scaler()
    opt = _throwaway_optimizer(model, opt_name, device.type)
    tracker = LiveTensorTracker(count_existing=True) if device.type == "cpu" else None
    reset_peak(device)
    secs = 0.0
    own = 0
    try:
        if tracker is not None:
            tracker.__enter__()
            # the job's own tensors at the start (weights, buffers, the batch); everything else the
            # process holds is subtracted from the peak
            seen = set()
            for t in [*model.parameters(), *model.buffers(), *batch.values()]:
                st = t.untyped_storage()
                if id(st) not in seen:
                    seen.add(id(st))
                    own += st.nbytes()
            start = tracker.current_bytes
        for _ in range(steps):
            t0 = time.perf_counter()
            accumulate(model, batch, micro_batch, precision, scaler, loss_fn, dev)
            scaler.unscale_(opt)
            torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.grad is not None],
                                           max_grad_norm if max_grad_norm > 0 else math.inf)
            scaler.step(opt)
            scaler.update()
            opt.zero_grad(set_to_none=True)
            synchronize(device)
            secs = time.perf_counter() - t0
    finally:
        if tracker is not None:
            tracker.__exit__(None, None, None)
        opt.zero_grad(set_to_none=True)
        del opt
        gc.collect()
    if tracker is not None:
        peak = tracker.peak_bytes - start + own
        return {"peak_allocated": peak, "peak_reserved": peak}, secs
    st = memory_stats(device)
    out = {"peak_allocated": st.get("max_allocated", 0), "peak_reserved": st.get("max_reserved", 0)}
    if "nvml_used" in st:
        out["nvml_used"] = st["nvml_used"]
    return out, secs


def preflight(model, cfg, device, *, plan=None, micro_batch: int | None = None, steps: int = 2,
              loss_fn: Callable | None = None, vocab_size: int | None = None, budget_bytes: int | None = None,
              shrink: bool = True) -> dict[str, Any]:
    """Run `steps` real steps at the planned micro-batch on a synthetic batch; measure; shrink if needed.

    Returns {"micro_batch", "ok", "shrunk", "measured_peak_bytes", "measured_reserved_bytes",
    "predicted_peak_bytes", "error_pct", "seconds_per_step", "tokens_per_second", "lines"}.
    `model` must already be on `device` with its precision/checkpointing/LoRA applied, exactly as the
    loop will train it. No data is read and no RNG state changes.
    """

    from memfit.ckpt.state import RNGState
    from memfit.device import empty_cache, is_oom
    from memfit.precision import resolve_precision

    classify = cfg.task == "classify"
    precision, _ = resolve_precision(cfg.train.precision, device)
    mb = micro_batch or (plan.knobs.micro_batch if plan is not None else cfg.train.batch_size)
    seq = plan.spec.seq_len if plan is not None else cfg.data.seq_len
    if vocab_size is None:
        vocab_size = int(getattr(getattr(model, "config", None), "vocab_size", 0) or cfg.data.vocab_size)
    num_labels = int(getattr(getattr(model, "config", None), "num_labels", 2) or 2)
    loss_fn = loss_fn or _default_loss(classify, cfg.train.chunked_loss)
    if budget_bytes is None:
        budget_bytes = plan.memory.budget if plan is not None else None
    predicted = None
    if plan is not None:
        predicted = plan.memory.peak_allocated if device.type == "cuda" else plan.memory.peak_tensor_bytes

    rng = RNGState()
    saved = rng.state_dict()
    was_training = model.training
    model.train()
    lines: list[str] = []
    shrunk = False
    measured: dict[str, int] = {}
    secs = 0.0
    ok = False
    try:
        while mb >= 1:
            # one micro-batch twice (accumulation 2) when the real run accumulates: the second
            # micro-step runs with the first one's gradients alive, as in training
            accum = 2 if (plan is not None and plan.knobs.accumulation > 1) else 1
            batch = _synthetic_batch(mb * accum, seq, vocab_size, classify, num_labels)
            try:
                measured, secs = _run_steps(model, batch, mb, steps, precision, cfg.optim.optimizer, device,
                                            loss_fn, cfg.optim.max_grad_norm)
            except Exception as e:
                if not is_oom(e):
                    raise
                model.zero_grad(set_to_none=True)
                del e
                gc.collect()
                empty_cache(device)
                if not shrink or mb == 1:
                    lines.append(f"pre-flight: out of memory at micro-batch {mb}")
                    break
                lines.append(f"pre-flight: out of memory at micro-batch {mb}; trying {mb // 2}")
                mb //= 2
                shrunk = True
                continue
            used = measured.get("nvml_used") or measured["peak_reserved"]
            if budget_bytes is not None and device.type == "cuda" and used > budget_bytes and shrink and mb > 1:
                lines.append(f"pre-flight: micro-batch {mb} uses {used / GiB:.2f} GiB > budget "
                             f"{budget_bytes / GiB:.2f} GiB; trying {mb // 2}")
                mb //= 2
                shrunk = True
                continue
            ok = True
            break
    finally:
        model.zero_grad(set_to_none=True)
        model.train(was_training)
        rng.load_state_dict(saved)
        gc.collect()
        empty_cache(device)
    peak = measured.get("peak_allocated", 0)
    err = (100.0 * (predicted - peak) / peak) if (predicted and peak and not shrunk) else None
    tps = (mb * seq / secs) if (ok and secs > 0) else None
    if ok:
        msg = f"pre-flight: micro-batch {mb} ran {steps} steps, peak {peak / GiB:.2f} GiB"
        if device.type == "cuda":
            msg += f" allocated, {measured.get('peak_reserved', 0) / GiB:.2f} GiB reserved"
        if err is not None:
            msg += f"; the plan said {predicted / GiB:.2f} GiB ({err:+.1f}%)"
        if tps:
            msg += f"; {tps:,.0f} tokens/s measured"
        lines.append(msg)
    return {"micro_batch": mb if ok else 0, "ok": ok, "shrunk": shrunk, "measured_peak_bytes": peak,
            "measured_reserved_bytes": measured.get("peak_reserved", 0), "predicted_peak_bytes": predicted,
            "error_pct": err, "seconds_per_step": secs if ok else None, "tokens_per_second": tps, "lines": lines}
