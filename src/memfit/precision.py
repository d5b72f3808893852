"""Precision as a policy object: which autocast dtype, whether a GradScaler runs, what to warn about.

Master weights always stay fp32 (autocast casts per op), so under fp16 the optimizer steps fp32
parameters with unscaled fp32 gradients — the "Attempting to unscale FP16 gradients" trap of
training fp16 *parameters* cannot happen.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from memfit.device import DeviceInfo

_DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class Precision:
    name: str              # fp32 | bf16 | fp16
    device_type: str       # cpu | cuda
    reason: str            # one line: why this precision (printed at start)

    @property
    def autocast_dtype(self) -> torch.dtype | None:
        return _DTYPES[self.name]

    @property
    def uses_scaler(self) -> bool:
        # bf16 has fp32's exponent range: gradients do not underflow, no scaler needed.
        return self.name == "fp16"

    def autocast(self):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device_type, dtype=self.autocast_dtype)

    def make_scaler(self) -> torch.amp.GradScaler:
        # A disabled scaler is a no-op with the same API and state_dict, so the loop has one path.
        return torch.amp.GradScaler(self.device_type, enabled=self.uses_scaler)


def resolve_precision(requested: str, device: DeviceInfo) -> tuple[Precision, list[str]]:
    """Pick the precision for `requested` on `device`; returns (policy, warnings)."""
    warnings: list[str] = []
    dt = device.type
    if requested == "auto":
        if dt == "cuda":
            if device.bf16_native:
                return Precision("bf16", dt, f"auto: {device.name} has native bf16"), warnings
            return Precision("fp16", dt, f"auto: {device.name} lacks native bf16 -> fp16 + GradScaler"), warnings
        if device.bf16_native:
            return Precision("bf16", dt, "auto: this CPU has native bf16 (AMX/AVX512-BF16)"), warnings
        return Precision("fp32", dt, "auto: this CPU has no native bf16"), warnings
    if requested == "bf16" and not device.bf16_native:
        where = f"{device.name} (compute capability {device.capability})" if dt == "cuda" else "this CPU"
        warnings.append(f"bf16 is not native on {where}: it runs emulated and slowly"
                        + ("; use --precision fp16 (with GradScaler) instead" if dt == "cuda" else
                           "; use --precision fp32 instead"))
    if requested == "fp16" and dt == "cpu":
        # CPUs have no fp16 matmul units (AMX-FP16 aside): autocast converts every op (measured 9x
        # slower than fp32 on this machine kind: python bench/precision_cpu.py), and a GradScaler runs too.
        warnings.append("fp16 on a CPU is emulated and slow (several times slower than fp32, with loss "
                        "scaling); use --precision fp32, or bf16 where the CPU has native bf16")
    return Precision(requested, dt, f"requested --precision {requested}"), warnings
