"""What would help when even micro-batch 1 runs out of memory: the knobs not yet in use, each with the
planner's predicted peak. jobs/ hands this to the OOM controller as its `advice` (train/ never imports
the planner)."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from memfit.device import DeviceInfo

log = logging.getLogger("memfit")


def planner_advice(cfg, device: DeviceInfo | None = None) -> str:
    """The knobs not yet in use, each with the planner's predicted peak at micro-batch 1 (when the
    planner can say; the generic list otherwise). Only called when nothing fits, so cost is no concern."""
    import dataclasses
    gib = 2 ** 30
    finetune = cfg.task in ("finetune", "classify")
    seq = cfg.data.seq_len
    if finetune:
        seq = cfg.data.max_seq_len or cfg.data.seq_len
        try:      # a packed run's rows are the run's row length (plan.spec: the one rule)
            from memfit.plan.spec import finetune_seq_len, planned_packing, resolve_model
            info = resolve_model(cfg)
            seq = finetune_seq_len(cfg, info.config, planned_packing(cfg, info))
        except Exception as e:  # noqa: BLE001 - the planner is optional here
            log.debug(f"planner: no row length: {e!r}")
    options: list[tuple[str, dict]] = []      # (flag text, changes to the config groups)
    if not cfg.train.gradient_checkpointing:
        options.append(("--gradient-checkpointing", {"train": {"gradient_checkpointing": True}}))
    if cfg.optim.optimizer == "adamw":
        options.append(("--optimizer adamw8bit", {"optim": {"optimizer": "adamw8bit"}}))
    if seq and seq > 16:
        key = "max_seq_len" if finetune else "seq_len"
        options.append((f"--{key.replace('_', '-')} {seq // 2}", {"data": {key: seq // 2}}))
    if cfg.task == "finetune" and not cfg.lora.lora and not cfg.lora.qlora:
        options.append(("--lora", {"lora": {"lora": True}}))
    if cfg.task == "finetune" and not cfg.lora.qlora:
        options.append(("--qlora", {"lora": {"qlora": True}}))
    if cfg.task == "pretrain":
        half = cfg.model.target_params // 2
        shown = f"{half / 1e6:.3g}M" if half >= 10**6 else f"{half / 1e3:.3g}k"
        options.append((f"--target-params {shown}", {"model": {"target_params": half}}))
    if not options:
        return "Nothing in memfit's list is left to try: a smaller model or a larger device."

    def size(b: float) -> str:
        return f"{b / gib:.2f} GiB" if b >= gib / 2 else f"{b / 2**20:.0f} MiB"

    peaks: dict[str, int] = {}
    try:
        from memfit.plan.analytic import analytic_memory
        from memfit.plan.spec import knobs_from_config, resolve_model, resolve_target, step_spec

        def peak(c) -> int:
            target = resolve_target(c)
            knobs = dataclasses.replace(knobs_from_config(c, target.profile), micro_batch=1, accumulation=1)
            return analytic_memory(step_spec(c, resolve_model(c), target, knobs)).peak_bytes

        peaks["now"] = peak(cfg)
        for flag, changes in options:
            try:
                peaks[flag] = peak(cfg.replace(**changes))
            except Exception as e:  # noqa: BLE001 - e.g. a size the planner cannot shape
                log.debug(f"planner: no number for {flag}: {e!r}")
    except Exception as e:  # noqa: BLE001 - the planner is optional here
        log.debug(f"planner advice unavailable: {e!r}")
    if "now" not in peaks:
        return "What would help: " + ", ".join(f for f, _ in options) + " (or a larger device)."
    dev = f" on {size(device.total_memory)} ({device.name})" if device is not None else ""
    parts = [f"{f} (~{size(peaks[f])})" if f in peaks else f for f, _ in options]
    return (f"The planner predicts ~{size(peaks['now'])} of tensors at micro-batch 1{dev}, before the "
            f"CUDA context and allocator overhead. What would help, with the predicted peak: "
            + ", ".join(parts) + ".")
