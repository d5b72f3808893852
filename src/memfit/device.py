"""The device layer: everything GPU-specific sits behind these functions, each with a CPU answer.

Nothing else in memfit calls torch.cuda memory APIs or NVML directly, so every code path runs
(and is tested) on a CPU machine.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import psutil
import torch


class DoesNotFit(RuntimeError):
    """Not even micro-batch 1 fits (the OOM controller at run time, the planner's auto-fit before): the CLI
    prints it and exits 3. Here, low, because train/, plan/, jobs/ and the CLI all raise or catch it."""


@dataclass(frozen=True)
class DeviceInfo:
    type: str            # "cuda" or "cpu"
    name: str
    total_memory: int    # bytes: GPU memory, or host RAM on CPU
    bf16_native: bool    # bf16 matmuls in hardware (Ampere+; CPU with AMX / AVX512-BF16)
    capability: tuple[int, int] | None = None

    @property
    def torch_device(self) -> torch.device:
        return torch.device("cuda" if self.type == "cuda" else "cpu")


def cpu_has_native_bf16() -> bool:
    """AMX or AVX512-BF16, read from /proc/cpuinfo. (oneDNN's own check says yes on any AVX512 CPU,
    where bf16 is emulated and measured 2.5x *slower* than fp32 for a linear layer — so not used.)"""
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return False
    return "amx_bf16" in flags or "avx512_bf16" in flags


def detect(prefer: str | None = None) -> DeviceInfo:
    if prefer != "cpu" and torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        cap = (props.major, props.minor)
        return DeviceInfo("cuda", props.name, props.total_memory, cap >= (8, 0), cap)
    return DeviceInfo("cpu", "cpu", psutil.virtual_memory().total, cpu_has_native_bf16())


def memory_stats(device: DeviceInfo) -> dict[str, int]:
    """Bytes: process RSS and available RAM always; allocated/reserved/peaks on a GPU."""
    vm = psutil.virtual_memory()
    stats = {"rss": psutil.Process(os.getpid()).memory_info().rss, "ram_available": vm.available}
    if device.type == "cuda":
        stats.update(allocated=torch.cuda.memory_allocated(), reserved=torch.cuda.memory_reserved(),
                     max_allocated=torch.cuda.max_memory_allocated(),
                     max_reserved=torch.cuda.max_memory_reserved())
        used = nvml_used_bytes()
        if used is not None:
            stats["nvml_used"] = used
    return stats


def _nvml_handle(index: int | None):
    import pynvml  # optional (nvidia-ml-py)
    pynvml.nvmlInit()
    # index None asks torch which device is current, which initialises CUDA; pass an index to read
    # NVML before CUDA starts (the context-size measurement). NVML indices ignore CUDA_VISIBLE_DEVICES.
    return pynvml, pynvml.nvmlDeviceGetHandleByIndex(torch.cuda.current_device() if index is None else index)


def nvml_used_bytes(index: int | None = None) -> int | None:
    """What nvidia-smi shows for the device (includes the CUDA context); None without NVML."""
    try:
        nv, h = _nvml_handle(index)
        return int(nv.nvmlDeviceGetMemoryInfo(h).used)
    except Exception:
        return None


def nvml_process_used_bytes(pid: int | None = None, index: int | None = None) -> int | None:
    """This process's memory on the device as NVML lists it; None where NVML cannot see processes
    (containers with their own pid namespace, gVisor) or without NVML."""
    pid = os.getpid() if pid is None else pid
    try:
        nv, h = _nvml_handle(index)
        for proc in nv.nvmlDeviceGetComputeRunningProcesses(h):
            if proc.pid == pid and proc.usedGpuMemory is not None:
                return int(proc.usedGpuMemory)
    except Exception:
        return None
    return None


def nvml_driver_version() -> str | None:
    try:
        import pynvml
        pynvml.nvmlInit()
        v = pynvml.nvmlSystemGetDriverVersion()
        return v.decode() if isinstance(v, bytes) else str(v)
    except Exception:
        return None


def reset_peak(device: DeviceInfo) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()


def empty_cache(device: DeviceInfo) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()


def synchronize(device: DeviceInfo) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def is_oom(exc: BaseException) -> bool:
    """torch.OutOfMemoryError (CUDA, or injected in tests) or a CPU allocator failure."""
    if isinstance(exc, torch.OutOfMemoryError):
        return True
    return isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower()


def gpu_memory_info() -> tuple[int, int] | None:
    """(free, total) bytes of CUDA device 0 as the driver sees it (other processes included); None
    without a usable GPU."""
    if not torch.cuda.is_available():
        return None
    free, total = torch.cuda.mem_get_info(0)
    return int(free), int(total)


def nvml_cuda_driver_version() -> str | None:
    """The newest CUDA version the installed driver supports ('12.4'); None without NVML."""
    try:
        import pynvml
        pynvml.nvmlInit()
        v = int(pynvml.nvmlSystemGetCudaDriverVersion())
        return f"{v // 1000}.{(v % 1000) // 10}"
    except Exception:
        return None


def nvidia_driver_present() -> bool:
    """An NVIDIA kernel driver is loaded (a GPU box), whether or not this torch can use it."""
    return os.path.exists("/proc/driver/nvidia/version") or os.path.exists("/dev/nvidia0")


def use_cuda_device(index: int) -> None:
    """Make cuda:`index` this process's device (one GPU per torchrun worker: LOCAL_RANK)."""
    torch.cuda.set_device(index)
