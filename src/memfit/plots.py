"""plots/training.png: every step's training loss with validation, the job's metric, learning rate,
throughput, memory and gradient norm; resumes, stops and OOM events marked on the time axis."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

_NOT_METRICS = {"kind", "step", "phase", "sample", "val_loss", "val_tokens", "time", "elapsed"}


def step_losses(train: list[dict[str, Any]], pending: list[float] | None = None) -> tuple[list[int], list[float]]:
    """(steps, losses) of every step: a train row's `step_losses` are the steps up to and including it
    (rows without them contribute their own loss); `pending` follows the last row."""
    steps: list[int] = []
    losses: list[float] = []
    for r in train:
        vals = r.get("step_losses") or [r["loss"]]
        steps += range(r["step"] - len(vals) + 1, r["step"] + 1)
        losses += vals
    if pending:
        last = train[-1]["step"] if train else 0
        steps += range(last + 1, last + 1 + len(pending))
        losses += pending
    return steps, losses


def plot_history(rows: list[dict[str, Any]], path: Path, pending: list[float] | None = None) -> Path | None:
    """Six panels (loss, validation metric, lr, throughput, memory, grad norm). Returns the PNG path."""
    train = [r for r in rows if r.get("kind") == "train"]
    evals = [r for r in rows if r.get("kind") == "eval"]
    if not train:
        return None
    import matplotlib
    matplotlib.use("Agg")  # no display on a server or in CI
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(2, 3, figsize=(15, 7.5), constrained_layout=True)
    steps = [r["step"] for r in train]
    loss_ax, metric_ax, lr_ax, tput_ax, mem_ax, grad_ax = ax.flat
    s, l = step_losses(train, pending)
    loss_ax.plot(s, l, label="train (every step)", lw=0.8)
    val = [r for r in evals if "val_loss" in r]     # a user's eval_fn may report other metrics only
    if val:
        loss_ax.plot([r["step"] for r in val], [r["val_loss"] for r in val], "o-", label="validation")
    loss_ax.set(title="loss", xlabel="step", ylabel="loss (nats/token, or the job's loss)")
    _metric_panel(metric_ax, evals)
    lr_ax.plot(steps, [r.get("lr", float("nan")) for r in train])
    lr_ax.set(title="learning rate", xlabel="step")
    tput_ax.plot(steps, [r.get("tokens_per_s", float("nan")) for r in train], label="input tokens/s")
    if any("loss_tokens_per_s" in r for r in train):
        tput_ax.plot(steps, [r.get("loss_tokens_per_s", float("nan")) for r in train], "--", label="loss tokens/s")
    tput_ax.set(title="throughput (non-padding tokens)", xlabel="step", ylabel="tokens/s")
    tput_ax.legend(fontsize=8)
    for key, label in (("rss_mb", "process RSS"), ("gpu_alloc_mb", "GPU allocated"),
                       ("gpu_reserved_mb", "GPU reserved")):
        if any(key in r for r in train):
            mem_ax.plot(steps, [r.get(key, float("nan")) for r in train], label=label)
    mem_ax.set(title="memory", xlabel="step", ylabel="MB")
    mem_ax.legend(fontsize=8)
    grad_ax.plot(steps, [r.get("grad_norm", float("nan")) for r in train])
    grad_ax.set(title="gradient norm (before clipping)", xlabel="step")
    _mark_events(ax.flat, rows)
    loss_ax.legend(fontsize=8)
    from memfit.runfiles import record_path
    record_path(path.parent)      # runs/x/plots: memfit's folder (--overwrite may remove it)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.stem + ".tmp.png")
    fig.savefig(tmp, dpi=80)
    plt.close(fig)
    os.replace(tmp, path)
    return path


def _metric_panel(ax, evals: list[dict[str, Any]]) -> None:
    """The job's own metrics: perplexity for LMs, accuracy / F1 for classify, a user's eval_fn values."""
    keys = sorted({k for r in evals for k, v in r.items()
                   if k not in _NOT_METRICS and not k.endswith(("_tokens", "_examples"))   # counts, not metrics
                   and isinstance(v, (int, float)) and not isinstance(v, bool)})
    if not keys and any("val_loss" in r for r in evals):
        keys = ["val_loss"]          # a job whose only metric is its loss
    for k in keys:
        pts = [(r["step"], r[k]) for r in evals if isinstance(r.get(k), (int, float))]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", label=k)
    ax.set(title="validation metric" + ("" if keys else " (no evaluation yet)"), xlabel="step")
    if "val_ppl" in keys:
        ax.set_yscale("log")
    if keys:
        ax.legend(fontsize=8)


def _mark_events(axes, rows: list[dict[str, Any]]) -> None:
    """Vertical lines on every panel: resumes (green dashed), stops (grey dotted), OOM changes (red)."""
    styles = {"resume": ("tab:green", "--", "resumed"), "stop": ("grey", ":", "stopped"),
              "oom": ("tab:red", "-", "OOM: micro-batch changed")}
    for a in axes:
        labelled: set[str] = set()
        for r in rows:
            kind = r.get("kind")
            if kind in styles and r.get("step") is not None:
                color, ls, label = styles[kind]
                a.axvline(r["step"], color=color, ls=ls, lw=1, alpha=0.7,
                          label=label if kind not in labelled else None)
                labelled.add(kind)
