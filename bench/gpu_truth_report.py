"""bench/gpu_truth.py's output: environment, summary, table, the last line, and the per-architecture
constants (a printed suggestion, or gpu_arch.json rewritten with --write-constants)."""

from __future__ import annotations

import importlib.metadata
import json
import math
import platform
import re
import statistics
import sys
from pathlib import Path
from typing import Any

GiB, MiB = 2 ** 30, 2 ** 20
CONTEXT_TOLERANCE = (0.10, 32 * MiB)   # a context off by more than 10% and 32 MiB is rewritten
EFFICIENCY_TOLERANCE = 0.20            # an efficiency off by more than 20% (relative) is rewritten


def _version(pkg: str) -> str | None:
    try:
        return importlib.metadata.version(pkg)
    except importlib.metadata.PackageNotFoundError:
        return None


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def env_info(device_info: dict | None) -> dict[str, Any]:
    import os

    import torch

    from memfit.device import nvml_driver_version
    env = {"python": sys.version.split()[0], "torch": torch.__version__, "torch_cuda": torch.version.cuda,
           "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
           **{p: _version(p) for p in ("transformers", "peft", "bitsandbytes", "accelerate", "nvidia-ml-py")},
           "cpu_model": cpu_model(), "cpu_count": os.cpu_count(), "platform": platform.platform(),
           "allocator_env": {k: v for k, v in os.environ.items() if k.endswith("ALLOC_CONF")}}
    if device_info and device_info.get("type") == "cuda":
        from memfit.hardware import arch_of
        env.update(gpu=device_info["name"], driver=nvml_driver_version(),
                   compute_capability=device_info["capability"], arch=arch_of(tuple(device_info["capability"])))
    return env


def summary(r: dict) -> dict[str, Any]:
    errs, nvml = [], []
    for row in r.get("sweep", {}).values():
        if row.get("status") != "ok" or row.get("note"):
            continue
        for key, v in row["err_pct"].items():
            if v is None:
                continue
            (nvml if key == "nvml_used" else errs).append(abs(v))
    oom = r.get("oom_recovery", {})
    speed = next((v for v in r.get("throughput", {}).values() if v.get("status") == "ok"), {})
    qlora = r.get("qlora", {})
    rows = list(r.get("sweep", {}).values())
    return {
        "mem_median_err_pct": statistics.median(errs) if errs else math.nan,
        "mem_max_err_pct": max(errs) if errs else math.nan,
        "mem_err_figures": "peak allocated and peak reserved (CUDA) / live tensor bytes (CPU), |plan - measured| / measured",
        "mem_errors_counted": len(errs),
        "nvml_median_err_pct": statistics.median(nvml) if nvml else None,
        "oom_recovered": bool(oom.get("oom_recovered", False)),
        "losses_allclose": bool(oom.get("losses_allclose", False)),
        "auto_fit_no_oom": r.get("auto_fit", {}).get("no_oom"),
        "scaler_skipped_inf": r.get("scaler", {}).get("skipped_inf_step"),
        "qlora_trained_and_merged": qlora.get("trained_and_merged") if qlora.get("status") == "ok" else None,
        "memfit_vs_hf": speed.get("memfit_vs_hf"),
        "memfit_vs_raw": speed.get("memfit_vs_raw"),
        "sweep_ok": sum(x.get("status") == "ok" for x in rows),
        "sweep_skipped": sum(x.get("status") == "skipped" for x in rows),
        "sweep_failed": sum(x.get("status") == "error" for x in rows),
    }


def _g(n: float | None) -> str:
    return "-" if n is None else f"{n / MiB:,.0f}"


def _p(n: float | None) -> str:
    return "-" if n is None else f"{n:+.1f}%"


def table(r: dict) -> str:
    cuda = r["mode"] == "cuda"
    env = r.get("env", {})
    lines = [(f"gpu_truth {r['date']}  mode={r['mode']} tiny={r['tiny']}  device={env.get('gpu') or env.get('cpu_model')}"
              f"  torch={env.get('torch')} cuda={env.get('torch_cuda')} driver={env.get('driver')}"
              f"  budget={r['budget_bytes'] / GiB:.2f} GiB  elapsed={r.get('elapsed_s', 0):.0f}s")]
    head = ("run", "pred alloc", "alloc", "err", "pred resv", "resv", "err", "pred nvml", "nvml", "err") if cuda \
        else ("run", "pred tensors", "tensors", "err")
    lines.append(" | ".join(head) + "   (MiB)")
    for name, row in r.get("sweep", {}).items():
        if row.get("status") != "ok":
            lines.append(f"{name} | {row.get('status')}: {row.get('reason') or row.get('error')}")
            continue
        m, p, e = row["measured"], row["predicted"], row["err_pct"]
        cells = [name, _g(p["peak_allocated"]), _g(m.get("peak_allocated")), _p(e.get("peak_allocated")),
                 _g(p["peak_reserved"]), _g(m.get("peak_reserved")), _p(e.get("peak_reserved")),
                 _g(p["nvidia_smi"]), _g(m.get("nvml_peak_used")), _p(e.get("nvml_used"))] if cuda else \
            [name, _g(p["peak_tensor_bytes"]), _g(m["tensor_peak"]), _p(e["tensor_peak"])]
        lines.append(" | ".join(cells) + (f"  ({row['note']})" if row.get("note") else ""))
    c = r.get("context", {})
    lines.append("CUDA context: " + (f"after init {_g(c['context_after_init'])} MiB, after kernels "
                                     f"{_g(c['context_after_kernels'])} MiB, after training "
                                     f"{_g(c['context_after_training'])} MiB" if c.get("status") == "ok"
                                     else f"{c.get('status')}: {c.get('reason') or c.get('error')}"))
    o = r.get("oom_recovery", {})
    lines.append("OOM: " + (f"start {o['start_micro']} -> {o['recovered_micro']} ({len(o['oom_events'])} OOMs), "
                            f"effective batch {o['effective_batch']} kept={o['tokens_equal']}, losses allclose to a "
                            f"fresh run={o['losses_allclose']}" if o.get("status") == "ok" else _why(o)))
    a = r.get("auto_fit", {})
    lines.append("auto-fit: " + (f"chose {a['chosen']}, ran without OOM={a['no_oom']}" if a.get("status") == "ok"
                                 else _why(a)))
    s = r.get("scaler", {})
    lines.append("fp16 GradScaler: " + (f"inf step skipped={s['skipped_inf_step']} (scale {s['loss_scale']})"
                                        if s.get("status") == "ok" else _why(s)))
    q = r.get("qlora", {})
    lines.append("QLoRA: " + (f"trained and merged={q['trained_and_merged']} (losses {q['losses']})"
                              if q.get("status") == "ok" else _why(q)))
    for prec, t in r.get("throughput", {}).items():
        if t.get("status") != "ok":
            lines.append(f"tokens/s {prec}: {_why(t)}")
            continue
        parts = [f"{k} {t[k]['tokens_per_s']:,.0f} (MFU {t[k]['mfu']:.3f})" if "tokens_per_s" in t[k]
                 else f"{k} {t[k]['error']}" for k in ("memfit", "hf_trainer", "raw_loop")]
        lines.append(f"tokens/s {prec} {t['model']}: " + ", ".join(parts))
    for sug in r.get("constants", {}).get("suggestions", []):
        lines.append("constant: " + sug)
    return "\n".join(lines)


def _why(row: dict) -> str:
    return f"{row.get('status', 'not run')}: {row.get('reason') or row.get('error')}"


def last_line(s: dict) -> str:
    def f(x):
        return "nan" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.2f}"
    return (f"mem_median_err_pct={f(s['mem_median_err_pct'])} mem_max_err_pct={f(s['mem_max_err_pct'])} "
            f"oom_recovered={str(s['oom_recovered']).lower()} memfit_vs_hf={f(s['memfit_vs_hf'])}")


# ---------------------------------------------------------------- per-architecture constants

def constant_updates(r: dict) -> tuple[str | None, dict[str, Any], list[str]]:
    """(architecture, the new values for it, one line per constant the measurement contradicts)."""
    env = r.get("env", {})
    if r["mode"] != "cuda" or r.get("tiny"):
        return None, {}, ["no GPU architecture measured (CPU or --tiny run): no constant to change"]
    from memfit.hardware import arch_constants
    arch = env["arch"]
    cur = arch_constants()[arch]
    new: dict[str, Any] = {}
    lines = []
    c = r.get("context", {})
    if c.get("status") == "ok":
        meas = c["context_after_training"]
        old = cur["cuda_context_gib"] * GiB
        if abs(meas - old) > max(CONTEXT_TOLERANCE[0] * old, CONTEXT_TOLERANCE[1]):
            new["cuda_context_gib"] = round(meas / GiB, 3)
            lines.append(f"gpu_arch.json {arch}.cuda_context_gib {cur['cuda_context_gib']} -> "
                         f"{new['cuda_context_gib']} (measured {meas / MiB:.0f} MiB after a training step)")
    eff = list(cur["efficiency"])
    for prec, t in r.get("throughput", {}).items():
        mfu = t.get("memfit", {}).get("mfu") if t.get("status") == "ok" else None
        if mfu is None or prec == "fp32":
            continue
        d = t.get("width") or 0
        i = 0 if d >= 2048 else 1 if d >= 768 else 2
        if abs(mfu - eff[i]) > EFFICIENCY_TOLERANCE * eff[i]:
            lines.append(f"gpu_arch.json {arch}.efficiency[{i}] (width {d}, {prec}) {eff[i]} -> {mfu:.3f} "
                         "(memfit's measured MFU)")
            eff[i] = round(mfu, 3)
            new["efficiency"] = eff
    if not lines:
        lines.append(f"{arch}: the measured context and efficiency agree with gpu_arch.json; nothing to change")
    return arch, new, lines


def write_constants(arch: str, new: dict[str, Any], source: str, path: Path | None = None) -> Path:
    """Rewrite only `arch`'s entry of gpu_arch.json (the other architectures' text is kept as is)."""
    from memfit.hardware import ARCH_FILE
    path = path or ARCH_FILE
    text = path.read_text()
    data = json.loads(text)
    entry = {**data[arch], **new, "source": source}
    pat = re.compile(r'^ "' + re.escape(arch) + r'": \{.*?\}(,?)$', re.MULTILINE | re.DOTALL)
    m = pat.search(text)
    if m is None:
        raise ValueError(f"{path}: no entry for {arch!r}")
    line = f' "{arch}": ' + json.dumps(entry) + m.group(1)
    text = text[:m.start()] + line + text[m.end():]
    assert json.loads(text)[arch] == entry
    path.write_text(text)
    return path


def finish(args, r: dict) -> int:
    """Summary, constants, gpu_truth.json/.txt, the table and the last line. With --from-json, r is a
    gpu_truth.json brought back from a GPU machine: the summary is recomputed and the files written in
    --out (default bench/results, where the measurements are kept). The JSON is written whatever fails
    after the measurements (device time is too dear to lose them to a report bug)."""
    import traceback
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    slug = re.sub(r"[^a-z0-9]+", "-", (r.get("env", {}).get("gpu") or "cpu").lower()).strip("-")
    name = f"gpu_truth-{slug}-{r['date'][:10]}.json"
    tab, last = "", ""
    try:
        r["summary"] = summary(r)
        arch, new, lines = constant_updates(r)
        r["constants"] = {"arch": arch, "changes": new, "suggestions": lines, "written": False,
                          "results_file": f"bench/results/{name}"}
        if args.write_constants and arch and new:
            source = f"measured on {r['env']['gpu']}, {r['date'][:10]}, bench/results/{name} (bench/gpu_truth.py)"
            r["constants"]["written"] = str(write_constants(arch, new, source))
        tab, last = table(r), last_line(r["summary"])
    except Exception:  # noqa: BLE001
        r["report_error"] = traceback.format_exc()[-3000:]
        print(r["report_error"], file=sys.stderr)
    text = json.dumps(r, indent=1, default=str)
    if r["mode"] == "cuda":
        (out / name).write_text(text)
    if not getattr(args, "from_json", None):   # --from-json files only the named copy in bench/results
        (out / "gpu_truth.json").write_text(text)
        (out / "gpu_truth.txt").write_text(tab + "\n" + last + "\n")
        (out / "gpu_truth.partial.json").unlink(missing_ok=True)     # complete: the row-by-row copy goes
    print(tab)
    print(last)
    return 1 if "report_error" in r or "fatal" in r else 0
