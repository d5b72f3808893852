"""GPU profiles the planner plans against: memory, throughput per precision, bandwidth, CUDA context.

Imports nothing heavy: `memfit plan --help` and the CLI's flag parsing read PROFILES.

Where the numbers come from
- `memory_bytes` is what `torch.cuda.get_device_properties(0).total_memory` reports (the "GiB total
  capacity" in CUDA OOM messages: T4 14.75 GiB, P100 15.89, V100-16 15.78, V100-32 31.75, A100-40
  39.39-39.50, A100-80 79.15, H100-80 79.11), not the marketing 16/32/40/80 GB.
- TFLOP/s are NVIDIA's dense (non-sparse) datasheet peaks. fp32 is plain fp32 (PyTorch leaves TF32 off
  for matmuls by default). `bf16` on a GPU without native bf16 (T4, P100, V100) is the fp32 figure:
  it runs, emulated, no faster than fp32 — auto precision picks fp16 + GradScaler there.
- `cuda_context_bytes` is memory nvidia-smi shows for the process that the caching allocator does
  not (driver, loaded kernel images, cuBLAS/cuDNN handles). Calibrated on published CUDA OOM
  messages, which since torch 2.1 say "this process has X memory in use. Of the allocated memory Y
  is allocated by PyTorch, and Z is reserved by PyTorch but unallocated": context = X - Y - Z.
    A100-40  0.49 GiB  github.com/TianheWu/CoSeR/issues/10
    A100-80  0.50 GiB  github.com/Kwai-Keye/Keye/issues/11;  0.49 GiB lianqi1008/Control-GIC/issues/6
    RTX 6000 Ada 0.42 GiB  DINGYANB/MTVCrafter/issues/21;  RTX A4000 0.20 GiB  DengKaiCQ/VGGT-Long/issues/6
    T4       0.14 GiB  FoundationVision/GenerateU/issues/10 (an inference-heavy process)
  With CUDA >= 11.7 lazy module loading the context grows with the kernels a process has touched, and
  a training step touches more (cuBLAS GEMMs, attention, fused optimizer, autocast casts) than the
  failing processes above, so the profiles round up: 0.30 GiB pre-Ampere, 0.45-0.50 Ampere/Ada,
  0.55 Hopper. Before CUDA 11.7 everything loaded eagerly: the HF "model memory anatomy" guide
  measured 1,343 MiB on a V100 with CUDA 11.2 (pytorch/pytorch#20532 reports 300-1000 MiB). The plan
  prints the context as its own line, so a user who measures theirs can compare.
- The context and the planner's efficiency factors are keyed by GPU architecture in gpu_arch.json
  (`arch_of` maps a compute capability to its key): a measurement on one architecture
  (bench/gpu_truth.py --write-constants) updates only that architecture, with its source beside it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from functools import lru_cache
from pathlib import Path

GiB = 1024 ** 3
MiB = 1024 ** 2


@dataclass(frozen=True)
class GPUProfile:
    name: str
    memory_bytes: int          # device memory as torch reports it (total_memory)
    fp32_tflops: float
    fp16_tflops: float         # tensor-core dense peak (or plain fp16 where there are none)
    bf16_tflops: float
    bf16_native: bool
    bandwidth_gbs: float       # memory bandwidth, GB/s
    cuda_context_bytes: int    # non-PyTorch memory of a training process (see module docstring)
    compute_capability: tuple[int, int] | None
    device_type: str = "cuda"  # "cuda" or "cpu"
    description: str = ""

    def tflops(self, precision: str) -> float:
        return {"fp32": self.fp32_tflops, "fp16": self.fp16_tflops, "bf16": self.bf16_tflops}[precision]

    @property
    def flash_attention(self) -> bool:
        """PyTorch's flash SDPA kernel needs sm80+ (and fp16/bf16); older GPUs use mem-efficient."""
        return self.compute_capability is not None and self.compute_capability >= (8, 0)

    @property
    def cublas_workspace_bytes(self) -> int:
        """cuBLAS + cuBLASLt workspaces, allocated through the caching allocator on first matmul.
        Defaults (torch 2.x): ':4096:2:16:8' = 8.125 MiB before Hopper, 32 MiB on sm90; Lt 1-32 MiB."""
        if self.device_type != "cuda":
            return 0
        if self.compute_capability and self.compute_capability >= (9, 0):
            return 64 * MiB
        return int(12.125 * MiB)


ARCH_FILE = Path(__file__).with_name("gpu_arch.json")


def arch_of(capability: tuple[int, int] | None) -> str:
    """The gpu_arch.json key of a CUDA compute capability (sm80 and sm86 differ: A100 vs A10G/RTX 30)."""
    if capability is None:
        return "ampere"
    major, minor = capability
    if major <= 6:
        return "pascal"
    if major == 7:
        return "turing" if minor >= 5 else "volta"
    if major == 8:
        return {0: "ampere", 9: "ada"}.get(minor, "ampere-ga10x")
    return "hopper" if major == 9 else "blackwell"


@lru_cache(maxsize=1)
def arch_constants() -> dict[str, dict]:
    """gpu_arch.json: per architecture cuda_context_gib, efficiency [d>=2048, d>=768, smaller], source."""
    data = json.loads(ARCH_FILE.read_text())
    return {k: v for k, v in data.items() if not k.startswith("_")}


def arch_context_bytes(capability: tuple[int, int] | None) -> int:
    return int(arch_constants()[arch_of(capability)]["cuda_context_gib"] * GiB)


def arch_efficiency(capability: tuple[int, int] | None, d: int) -> float:
    """Achieved / peak tensor-core FLOP/s of a training step of width d on this architecture."""
    wide, mid, narrow = arch_constants()[arch_of(capability)]["efficiency"]
    return wide if d >= 2048 else mid if d >= 768 else narrow


def _gpu(name, mem_gib, fp32, fp16, bf16, native, bw, cc, desc):
    return GPUProfile(name, int(mem_gib * GiB), fp32, fp16, bf16, native, bw, arch_context_bytes(cc), cc,
                      "cuda", desc)


PROFILES: dict[str, GPUProfile] = {p.name: p for p in [
    _gpu("t4", 14.75, 8.1, 65.0, 8.1, False, 320, (7, 5), "NVIDIA T4 16GB (Kaggle/Colab free)"),
    _gpu("p100", 15.89, 9.3, 18.7, 9.3, False, 732, (6, 0), "NVIDIA P100 16GB (Kaggle)"),
    _gpu("v100-16", 15.78, 15.7, 125.0, 15.7, False, 900, (7, 0), "NVIDIA V100 16GB"),
    _gpu("v100-32", 31.75, 15.7, 125.0, 15.7, False, 900, (7, 0), "NVIDIA V100 32GB"),
    _gpu("a10g", 22.07, 31.2, 70.0, 70.0, True, 600, (8, 6), "NVIDIA A10G 24GB (AWS g5)"),
    _gpu("l4", 22.03, 30.3, 121.0, 121.0, True, 300, (8, 9), "NVIDIA L4 24GB (Colab/GCP)"),
    _gpu("a100-40", 39.39, 19.5, 312.0, 312.0, True, 1555, (8, 0), "NVIDIA A100 40GB"),
    _gpu("a100-80", 79.15, 19.5, 312.0, 312.0, True, 2039, (8, 0), "NVIDIA A100 80GB"),
    _gpu("h100", 79.11, 67.0, 989.0, 989.0, True, 3350, (9, 0), "NVIDIA H100 80GB SXM"),
    # H200 SXM: the H100's datasheet rates, 141 GB HBM3e at 4.8 TB/s (memory replaced by the device's).
    _gpu("h200", 139.8, 67.0, 989.0, 989.0, True, 4800, (9, 0), "NVIDIA H200 141GB SXM"),
    # CPU: throughput measured on this project's 2-core build machine (DESIGN.md "Facts measured"):
    # fp32 matmul ~315 GFLOP/s, bf16 (AMX) ~2,050 GFLOP/s. Memory is replaced by the host's RAM.
    GPUProfile("cpu", 16 * GiB, 0.315, 0.315, 2.05, True, 20.0, 0, None, "cpu", "this machine's CPU"),
]}


@dataclass(frozen=True)
class Platform:
    """A notebook platform's limits. `--gpu` names the device; `--platform` these budgets."""
    name: str
    session_seconds: float | None   # wall clock of one session (fills --time-limit when no limit is given)
    disk_bytes: int | None          # the writable working directory (fills --disk-budget)
    ram_bytes: int | None           # host RAM (fills --ram)
    description: str


# Kaggle: the users' guides (user-guides/002: "Session Time 9 hours maximum, RAM 30GB, Storage 20GB working
# directory"; 000: "Kaggle: 20 GB") and DESIGN.md. Colab free: sessions end after at most 12 h; a T4
# runtime reports 12.7 GB RAM and ~78 GB free disk.
PLATFORMS: dict[str, Platform] = {p.name: p for p in [
    Platform("kaggle", 9 * 3600.0, 20 * 10**9, 30 * 10**9,
             "Kaggle notebook: 9 h session, 20 GB /kaggle/working, 30 GB RAM"),
    Platform("colab", 12 * 3600.0, 78 * 10**9, int(12.7 * 10**9),
             "Colab free: 12 h session, ~78 GB disk, 12.7 GB RAM"),
    Platform("none", None, None, None, "no platform limits: this machine's RAM and free disk, no session"),
]}


def with_platform(cfg):
    """The config with --platform's session, disk and RAM filling the budgets the user left unset (a
    given --time-limit/--deadline, --disk-budget or --ram wins). The plan and the runs both use it."""
    p = PLATFORMS[cfg.budget.platform]
    b = cfg.budget
    changes = {}
    if p.session_seconds is not None and b.time_limit is None and b.deadline is None:
        changes["time_limit"] = p.session_seconds
    if p.disk_bytes is not None and b.disk_budget is None:
        changes["disk_budget"] = p.disk_bytes
    if p.ram_bytes is not None and b.ram is None:
        changes["ram"] = p.ram_bytes
    return cfg.replace(budget=changes) if changes else cfg


def get_profile(name: str) -> GPUProfile:
    key = name.strip().lower().replace("_", "-")
    aliases = {"v100": "v100-16", "a100": "a100-40", "h100-80": "h100", "tesla-t4": "t4"}
    key = aliases.get(key, key)
    if key not in PROFILES:
        raise KeyError(f"unknown GPU profile {name!r}; known: {', '.join(PROFILES)}")
    return PROFILES[key]


def cpu_profile(ram_bytes: int | None = None, bf16_native: bool | None = None) -> GPUProfile:
    """The cpu profile with this machine's RAM (or the given budget) and bf16 capability."""
    import os

    base = PROFILES["cpu"]
    if ram_bytes is None:
        try:
            import psutil
            ram_bytes = int(psutil.virtual_memory().total)
        except Exception:
            ram_bytes = base.memory_bytes
    cores = os.cpu_count() or 2
    scale = max(1.0, cores / 2)  # the measured figures are for 2 cores
    native = True if bf16_native is None else bf16_native
    return replace(base, memory_bytes=int(ram_bytes), fp32_tflops=base.fp32_tflops * scale,
                   fp16_tflops=base.fp16_tflops * scale,
                   bf16_tflops=(base.bf16_tflops if native else base.fp32_tflops / 2) * scale,
                   bf16_native=native)


def profile_for_device(device) -> GPUProfile:
    """Closest profile for a detected memfit.device.DeviceInfo (used by pre-flight and plain runs)."""
    if device.type != "cuda":
        return cpu_profile(device.total_memory, device.bf16_native)
    name = device.name.lower()
    for key, needle in [("h200", "h200"), ("h100", "h100"), ("a100-80", "a100-sxm4-80"), ("a100-80", "a100 80"),
                        ("a100-80", "a100-80"), ("a100-40", "a100"), ("l4", " l4"), ("a10g", "a10g"),
                        ("t4", "t4"), ("p100", "p100"), ("v100-32", "v100-sxm2-32"), ("v100-32", "v100-32"),
                        ("v100-16", "v100")]:
        if needle in name:
            return replace(PROFILES[key], memory_bytes=device.total_memory)
    # Unknown GPU: memory from the device, throughput from the generation, context from its architecture.
    base = PROFILES["a10g"] if device.bf16_native else PROFILES["t4"]
    return replace(base, name=device.name, memory_bytes=device.total_memory,
                   compute_capability=device.capability, description=device.name,
                   cuda_context_bytes=arch_context_bytes(device.capability))
