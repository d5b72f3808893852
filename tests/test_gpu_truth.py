"""Issue 13: bench/gpu_truth.py, the one-command GPU truth, kept from rotting between GPU sessions: its CPU
mode (live-tensor tracker as truth, OOM injected by the byte limit) runs here on tiny models, and the
per-architecture constants it may rewrite are checked on a copy of gpu_arch.json."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "bench" / "gpu_truth.py"
LAST = re.compile(r"^mem_median_err_pct=(\S+) mem_max_err_pct=(\S+) oom_recovered=(true|false) memfit_vs_hf=(\S+)$")


@pytest.fixture(scope="module")
def truth(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_truth")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": ""}
    p = subprocess.run([sys.executable, str(SCRIPT), "--device", "cpu", "--tiny", "--out", str(out)],
                       capture_output=True, text=True, env=env, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    return json.loads((out / "gpu_truth.json").read_text()), p.stdout, out


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


@pytest.mark.slow
def test_cpu_tiny_run_has_every_figure(truth):
    r = truth[0]
    assert r["mode"] == "cpu" and r["tiny"] is True and re.match(r"\d{4}-\d\d-\d\dT", r["date"])
    for key in ("torch", "python", "cpu_model", "transformers", "bitsandbytes"):
        assert r["env"][key], key
    assert r["context"]["status"] == "skipped" and "CPU" in r["context"]["reason"]
    rows = r["sweep"]
    assert len(rows) >= 6 and all(v["status"] in ("ok", "skipped") for v in rows.values()), rows
    assert all(v["reason"] for v in rows.values() if v["status"] == "skipped")
    ok = [v for v in rows.values() if v["status"] == "ok"]
    assert len(ok) >= 5
    kinds = {v["spec"]["kind"] for v in ok}
    assert {"pretrain", "lora", "classify"} <= kinds
    for v in ok:
        m, p = v["measured"], v["predicted"]
        assert m["tensor_peak"] > 0 and p["peak_tensor_bytes"] > 0 and p["engine"] == "trace"
        assert m["steps"] == v["spec"]["steps"] >= 5 and all(_finite(x) for x in m["losses"])
        assert _finite(v["err_pct"]["tensor_peak"]) and _finite(v["err_pct_analytic"]["tensor_peak"])
        # the error is what the two figures say it is
        assert v["err_pct"]["tensor_peak"] == pytest.approx(
            100 * (p["peak_tensor_bytes"] - m["tensor_peak"]) / m["tensor_peak"])
    s = r["summary"]
    errs = [abs(v["err_pct"]["tensor_peak"]) for v in ok]
    assert s["mem_max_err_pct"] == pytest.approx(max(errs)) and s["mem_max_err_pct"] >= s["mem_median_err_pct"]
    # The trace is exact against real CPU tensors up to what it does not model (DESIGN.md): a sane bound.
    assert s["mem_median_err_pct"] < 10 and s["mem_max_err_pct"] < 30, errs


@pytest.mark.slow
def test_cpu_tiny_run_recovers_from_a_real_oom_and_matches_a_fresh_run(truth):
    r, _, _ = truth
    o = r["oom_recovery"]
    assert o["status"] == "ok" and o["limit"] == "live tensor bytes" and o["limit_bytes"] > 0
    assert len(o["oom_events"]) >= 1 and all("injected" in e["reason"] for e in o["oom_events"])
    assert o["recovered_micro"] < o["start_micro"] and o["effective_batch"] == o["start_micro"]
    assert o["tokens_equal"] and o["fresh_run_oom_events"] == 0
    assert o["losses_allclose"] is True and len(o["losses_oom_run"]) == len(o["losses_fresh_run"]) >= 5
    # the fresh run at the recovered size stays under the limit (the OOM run's peak is the refused attempt)
    assert o["measured_fresh_run"]["tensor_peak"] <= o["limit_bytes"] < o["measured_oom_run"]["tensor_peak"]
    a = r["auto_fit"]
    assert a["status"] == "ok" and a["no_oom"] is True and a["oom_events"] == []
    assert a["chosen"]["micro_batch"] >= 1 and a["measured"]["tensor_peak"] <= o["limit_bytes"]
    sc = r["scaler"]
    assert sc["status"] == "ok" and sc["skipped_inf_step"] is True
    assert sc["loss_scale"][sc["inf_step"] - 1] == sc["loss_scale"][sc["inf_step"] - 2] / 2
    q = r["qlora"]
    assert q["status"] == "ok" and q["trained_and_merged"] is True and q["targeted_weights"] > 0
    s = r["summary"]
    assert s["oom_recovered"] is True and s["losses_allclose"] is True and s["auto_fit_no_oom"] is True
    assert s["scaler_skipped_inf"] is True and s["qlora_trained_and_merged"] is True


@pytest.mark.slow
def test_cpu_tiny_run_throughput_and_last_line(truth):
    r, stdout, out = truth
    t = r["throughput"]["fp32"]
    assert t["status"] == "ok"
    for k in ("memfit", "hf_trainer", "raw_loop"):
        assert t[k]["tokens_per_s"] > 0 and 0 < t[k]["mfu"] < 1, (k, t[k])
    assert t["memfit_vs_hf"] == pytest.approx(t["memfit"]["tokens_per_s"] / t["hf_trainer"]["tokens_per_s"])
    last = stdout.strip().splitlines()[-1]
    m = LAST.match(last)
    assert m, last
    s = r["summary"]
    assert float(m.group(1)) == pytest.approx(s["mem_median_err_pct"], abs=0.006)
    assert float(m.group(2)) == pytest.approx(s["mem_max_err_pct"], abs=0.006)
    assert m.group(3) == "true" and float(m.group(4)) == pytest.approx(s["memfit_vs_hf"], abs=0.006)
    assert (out / "gpu_truth.txt").read_text().strip().splitlines()[-1] == last
    assert not (out / "gpu_truth.partial.json").exists()      # the row-by-row copy of a finished run goes
    assert r["constants"]["arch"] is None and r["constants"]["written"] is False


def _report():
    sys.path[:0] = [str(ROOT / "bench")]
    spec = importlib.util.spec_from_file_location("gpu_truth_report", ROOT / "bench" / "gpu_truth_report.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_write_constants_changes_only_the_measured_architecture(tmp_path):
    from memfit.hardware import ARCH_FILE, arch_of
    rep = _report()
    copy = tmp_path / "gpu_arch.json"
    original = ARCH_FILE.read_text()
    copy.write_text(original)
    # A made-up Hopper measurement: context 0.80 GiB after training, memfit at MFU 0.30 for width 704.
    result = {"mode": "cuda", "tiny": False, "env": {"arch": arch_of((9, 0)), "gpu": "NVIDIA H200"},
              "context": {"status": "ok", "context_after_training": int(0.80 * 2**30)},
              "throughput": {"bf16": {"status": "ok", "width": 704, "memfit": {"mfu": 0.30}}}}
    arch, new, lines = rep.constant_updates(result)
    assert arch == "hopper" and new == {"cuda_context_gib": 0.8, "efficiency": [0.45, 0.35, 0.3]}
    assert any("cuda_context_gib 0.55 -> 0.8" in ln for ln in lines)
    assert any("efficiency[2] (width 704, bf16) 0.2 -> 0.300" in ln for ln in lines)
    rep.write_constants(arch, new, "measured on NVIDIA H200, 2026-12-01, bench/results/x.json", copy)
    before, after = json.loads(original), json.loads(copy.read_text())
    assert after["hopper"]["cuda_context_gib"] == 0.8 and after["hopper"]["efficiency"] == [0.45, 0.35, 0.3] and "NVIDIA H200" in after["hopper"]["source"]
    assert {k: v for k, v in after.items() if k != "hopper"} == {k: v for k, v in before.items() if k != "hopper"}
    # every other entry's text is kept byte for byte (comments of a hand edit would survive too)
    strip = re.compile(r'^ "hopper": \{.*?\},$', re.MULTILINE | re.DOTALL)
    assert strip.sub("", copy.read_text()) == strip.sub("", original) and strip.search(original)


def test_constants_are_keyed_by_architecture():
    from memfit.device import DeviceInfo
    from memfit.hardware import PROFILES, GiB, arch_efficiency, arch_of, profile_for_device
    assert [arch_of(c) for c in ((6, 0), (7, 0), (7, 5), (8, 0), (8, 6), (8, 9), (9, 0), (12, 0))] == \
        ["pascal", "volta", "turing", "ampere", "ampere-ga10x", "ada", "hopper", "blackwell"]
    # the published profiles keep the figures they had before the table moved to gpu_arch.json
    ctx = {k: round(PROFILES[k].cuda_context_bytes / GiB, 2) for k in ("t4", "p100", "v100-16", "a10g", "l4",
                                                                          "a100-40", "h100")}
    assert ctx == {"t4": 0.3, "p100": 0.3, "v100-16": 0.35, "a10g": 0.45, "l4": 0.45, "a100-40": 0.5, "h100": 0.55}
    assert [arch_efficiency((7, 5), d) for d in (4096, 768, 256)] == [0.45, 0.35, 0.2]
    # an H200 is planned as one (Hopper's context), and an unknown card gets its architecture's context
    h200 = profile_for_device(DeviceInfo("cuda", "NVIDIA H200", 140 * GiB, True, (9, 0)))
    assert h200.name == "h200" and h200.cuda_context_bytes == PROFILES["h100"].cuda_context_bytes
    odd = profile_for_device(DeviceInfo("cuda", "NVIDIA RTX PRO 6000", 95 * GiB, True, (12, 0)))
    assert odd.cuda_context_bytes == int(0.55 * GiB) and odd.memory_bytes == 95 * GiB


def test_cuda_report_renders_and_keeps_the_measurements(tmp_path, capsys):
    """The CUDA-only half of the report (table columns, named results file, constant suggestions), fed a
    result shaped like a GPU run's: a report bug must not cost a GPU session its measurements."""
    rep = _report()
    MiB = 2 ** 20
    row = {"status": "ok", "spec": {"kind": "pretrain", "steps": 5},
           "measured": {"peak_allocated": 1000 * MiB, "peak_reserved": 1100 * MiB, "nvml_peak_used": 1700 * MiB,
                        "tensor_peak": 1000 * MiB, "losses": [1.0] * 5, "steps": 5},
           "predicted": {"peak_tensor_bytes": 990 * MiB, "peak_allocated": 1050 * MiB, "peak_reserved": 1210 * MiB,
                         "nvidia_smi": 1773 * MiB}}
    row["err_pct"] = {"peak_allocated": 5.0, "peak_reserved": 10.0, "nvml_used": 4.3}
    r = {"mode": "cuda", "tiny": False, "date": "2026-12-01T23:00:00+00:00", "budget_bytes": 15 * 2 ** 30,
         "env": {"gpu": "NVIDIA H200", "arch": "hopper", "torch": "2.11.0", "torch_cuda": "13.0", "driver": "580"},
         "context": {"status": "ok", "context_after_init": 500 * MiB, "context_after_kernels": 560 * MiB,
                     "context_after_training": 600 * MiB},
         "sweep": {"gpt2-10m bf16": row, "gpt2-124m fp16 8bit": {"status": "skipped", "reason": "no bitsandbytes"}},
         "oom_recovery": {"status": "ok", "start_micro": 16, "recovered_micro": 8, "oom_events": [{}],
                          "effective_batch": 16, "tokens_equal": True, "losses_allclose": True, "oom_recovered": True},
         "auto_fit": {"status": "ok", "chosen": {"micro_batch": 8}, "no_oom": True},
         "scaler": {"status": "ok", "skipped_inf_step": True, "loss_scale": [65536.0, 65536.0, 32768.0, 32768.0]},
         "qlora": {"status": "skipped", "reason": "no bitsandbytes"},
         "throughput": {"bf16": {"status": "ok", "model": "gpt2 124M", "width": 704, "memfit_vs_hf": 1.1,
                                 "memfit": {"tokens_per_s": 1.1e5, "mfu": 0.2},
                                 "hf_trainer": {"tokens_per_s": 1e5, "mfu": 0.18},
                                 "raw_loop": {"error": "RuntimeError: x"}}}}
    args = type("A", (), {"out": str(tmp_path), "write_constants": False})()
    assert rep.finish(args, r) == 0
    printed = capsys.readouterr().out.strip().splitlines()
    assert printed[-1] == "mem_median_err_pct=7.50 mem_max_err_pct=10.00 oom_recovered=true memfit_vs_hf=1.10"
    assert any(ln.startswith("gpt2-10m bf16 | 1,050 | 1,000 | +5.0% | 1,210 | 1,100 | +10.0%") for ln in printed)
    saved = json.loads((tmp_path / "gpu_truth-nvidia-h200-2026-12-01.json").read_text())
    assert saved["summary"]["nvml_median_err_pct"] == 4.3 and saved["constants"]["arch"] == "hopper"
    # 600 MiB after training vs Hopper's 0.55 GiB (563 MiB) and MFU 0.2 at width 704: within tolerance
    assert saved["constants"]["changes"] == {} and saved["constants"]["written"] is False
    assert "nothing to change" in saved["constants"]["suggestions"][0]
    assert (tmp_path / "gpu_truth.txt").read_text().strip().splitlines()[-1] == printed[-1]
