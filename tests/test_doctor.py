"""`memfit doctor` (issue 17): real facts of this machine in --json, a real small filesystem for the
low-disk warning, Kaggle/Colab detection from the variables their kernels set."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

from run_helpers import tmpfs

from memfit.jobs import doctor

ROOT = Path(__file__).resolve().parents[1]
PLATFORM_VARS = [k for keys in doctor.PLATFORM_ENV.values() for k in keys]


def run_doctor(*args: str, env_extra: dict | None = None, cwd: Path | None = None):
    env = {k: v for k, v in os.environ.items() if k not in PLATFORM_VARS}
    env["PYTHONPATH"] = str(ROOT / "src") + os.pathsep + env.get("PYTHONPATH", "")
    env.update(env_extra or {})
    return subprocess.run([sys.executable, "-m", "memfit.cli", "doctor", *args], capture_output=True,
                          text=True, env=env, cwd=cwd)


def meminfo_total() -> int:
    for line in open("/proc/meminfo"):
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no MemTotal in /proc/meminfo")


def test_json_has_every_field_with_this_machines_values(tmp_path):
    import torch

    from memfit.device import detect
    from memfit.precision import resolve_precision
    r = run_doctor("--json", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    f = json.loads(r.stdout)
    assert f["host_memory"]["total"] == meminfo_total()
    assert 0 < f["host_memory"]["available"] <= f["host_memory"]["total"]
    st = os.statvfs(tmp_path)
    assert f["disk"]["measured_at"] == str(tmp_path)          # runs/ does not exist yet: its parent
    assert f["disk"]["total"] == st.f_blocks * st.f_frsize
    assert abs(f["disk"]["free"] - st.f_bavail * st.f_frsize) < 64 * 2 ** 20
    dev = detect()
    assert f["device"]["type"] == dev.type and f["device"]["name"] == dev.name
    assert f["device"]["cpu_count"] == os.cpu_count()
    assert (f["gpu_memory"] is None) == (dev.type == "cpu")
    auto, _ = resolve_precision("auto", dev)
    assert (f["precision"]["auto"], f["precision"]["auto_reason"]) == (auto.name, auto.reason)
    assert f["precision"]["supported"]["fp32"]["native"] is True
    if dev.type == "cpu":   # fp16 has no CPU matmul units: the resolver warns, doctor says emulated
        assert f["precision"]["supported"]["fp16"]["native"] is False
    assert f["torch"]["version"] == torch.__version__ and f["torch"]["cuda_build"] == torch.version.cuda
    assert f["libraries"]["torch"] is not None and f["libraries"]["transformers"] is not None
    for name, (pip_name, module, _) in __import__("memfit.data.corpora", fromlist=["CORPORA"]).CORPORA.items():
        assert f["offline"]["corpora"][name] == (importlib.util.find_spec(module) is not None)
    assert set(f["offline"]["models"]) == {"smollm2", "minilm"}
    assert f["platform"]["name"] == "none" and f["platform"]["session_seconds"] is None
    assert isinstance(f["warnings"], list)
    assert not (tmp_path / "runs").exists()          # doctor writes nothing


def test_text_report_names_the_auto_precision_and_the_disk(tmp_path):
    r = run_doctor("--dir", str(tmp_path / "x" / "runs"))
    assert r.returncode == 0, r.stderr
    assert "precision    auto -> " in r.stdout and f"at {tmp_path}" in r.stdout
    assert "host memory" in r.stdout and "torch        " in r.stdout and "offline corpora" in r.stdout


def test_low_disk_warning_on_a_real_small_filesystem(tmp_path):
    with tmpfs(tmp_path / "small", "size=5m") as small:
        r = run_doctor("--json", "--dir", str(small / "runs"))
        assert r.returncode == 0, r.stderr
        f = json.loads(r.stdout)
        assert f["disk"]["measured_at"] == str(small) and f["disk"]["total"] == 5 * 2 ** 20
        assert any(w.startswith("low disk:") and str(small) in w for w in f["warnings"]), f["warnings"]
        text = run_doctor("--dir", str(small)).stdout
        assert "low disk:" in text
    big = run_doctor("--json", "--dir", str(tmp_path))    # the disk under the tests has room
    assert not any(w.startswith("low disk:") for w in json.loads(big.stdout)["warnings"])


def test_kaggle_and_colab_detected_from_their_environment_variables(tmp_path):
    r = run_doctor("--json", env_extra={"KAGGLE_KERNEL_RUN_TYPE": "Interactive"}, cwd=tmp_path)
    f = json.loads(r.stdout)
    assert f["platform"]["name"] == "kaggle"
    assert f["platform"]["session_seconds"] == 9 * 3600 and f["platform"]["disk_bytes"] == 20 * 10 ** 9
    assert f["platform"]["ram_bytes"] == 30 * 10 ** 9
    # no /kaggle/working here: the disk is measured where runs/ would go
    assert f["disk"]["path"] == "runs" and f["disk"]["measured_at"] == str(tmp_path)
    if f["device"]["type"] == "cpu":
        assert any("no GPU in this session" in w for w in f["warnings"])
    text = run_doctor(env_extra={"KAGGLE_KERNEL_RUN_TYPE": "Batch"}).stdout
    assert "pass --platform kaggle" in text and "9 h session" in text
    assert doctor.detect_platform({"COLAB_RELEASE_TAG": "release-colab_20260101"}) == "colab"
    assert doctor.detect_platform({"HOME": "/root"}) == "none"


def test_a_dir_under_a_file_is_exit_2(tmp_path):
    (tmp_path / "f").write_text("x")
    r = run_doctor("--dir", str(tmp_path / "f" / "runs"))
    assert r.returncode == 2 and "is a file, not a directory" in r.stderr and "Traceback" not in r.stderr


def _facts(**changes):
    f = doctor.collect()
    for path, value in changes.items():
        group, key = path.split(".")
        f[group][key] = value
    return f


def test_gpu_box_warnings_from_the_facts():
    # A T4 (sm75): the resolver itself says bf16 is not native there; doctor turns that into a warning.
    from memfit.device import DeviceInfo
    t4 = DeviceInfo("cuda", "Tesla T4", 15 * 2 ** 30, False, (7, 5))
    f = _facts(**{"device.type": "cuda", "device.name": "Tesla T4"})
    f["precision"] = doctor.precision_facts(t4)
    assert f["precision"]["auto"] == "fp16" and f["precision"]["gradscaler"] is True
    assert any(w.startswith("bf16 is emulated on Tesla T4") for w in doctor.warnings_for(f))
    cpu_torch = _facts(**{"device.type": "cpu", "torch.driver_present": True, "torch.cuda_build": None})
    assert any("is a CPU build" in w for w in doctor.warnings_for(cpu_torch))
    mismatch = _facts(**{"device.type": "cpu", "torch.driver_present": True, "torch.cuda_build": "12.8",
                         "torch.driver_cuda": "12.2", "torch.driver_version": "535.104"})
    w = [x for x in doctor.warnings_for(mismatch) if "built for CUDA 12.8" in x]
    assert w and "supports CUDA 12.2 at most" in w[0]
    ok = _facts(**{"device.type": "cpu", "torch.driver_present": False})
    assert not any("torch" in x for x in doctor.warnings_for(ok))


def test_low_disk_warning_under_an_injected_small_disk(tmp_path):
    """The same warning without root: collect() measures through an injected disk_usage (here a 5 MiB disk with
    3 MiB free, then a 100 GB one), and the text report carries it."""
    import shutil

    def small(path):
        return shutil._ntuple_diskusage(5 * 2 ** 20, 2 * 2 ** 20, 3 * 2 ** 20)

    f = doctor.collect(str(tmp_path / "runs"), env={}, disk_usage=small)
    assert (f["disk"]["total"], f["disk"]["free"], f["disk"]["measured_at"]) == (5 * 2 ** 20, 3 * 2 ** 20,
                                                                                 str(tmp_path))
    low = [w for w in f["warnings"] if w.startswith("low disk:")]
    assert len(low) == 1 and str(tmp_path) in low[0] and "--keep-last 1" in low[0], f["warnings"]
    assert "low disk:" in doctor.format_text(f)
    roomy = doctor.collect(str(tmp_path / "runs"), env={},
                           disk_usage=lambda p: shutil._ntuple_diskusage(200 * 10 ** 9, 100 * 10 ** 9, 10 ** 11))
    assert not any(w.startswith("low disk:") for w in roomy["warnings"])
