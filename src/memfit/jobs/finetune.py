"""`memfit finetune`: full / LoRA / QLoRA fine-tuning of a pretrained causal LM.

The same order as every job (memfit.jobs.common): start_run() checks everything first (exit 2 lists every
problem), then the run directory with config.yaml; then tokenizer, data, model, adapters; assemble_job()
builds the precision, optimizer, schedule, OOM controllers and checkpointer; run_job() runs THE loop. What differs from
pretraining is what the registry saves as "model" (the adapter only), the validation loss + held-out
samples before and after, and what is exported (a peft adapter folder, or a full HF model).
"""

from __future__ import annotations

import logging
from pathlib import Path

from memfit import config as C
from memfit.jobs.common import assemble_job, pretrained_problems, run_job, run_length, start_run
from memfit.jobs.preflight import run_preflight
from memfit.train.evaluate import job_loss
from memfit.train.finish import as_text
from memfit.train.job import TrainResult

log = logging.getLogger("memfit")


def check_finetune(cfg: C.Config, run_dir: Path) -> list[str]:
    """Problems beyond memfit.jobs.common.common_problems, found without loading a model."""
    from memfit.data.formats import expand_paths
    from memfit.data.hfrecords import is_hf_entry, table_problems
    problems = pretrained_problems(cfg)
    lo, d = cfg.lora, cfg.data
    files, why = expand_paths([s for s in d.data if not is_hf_entry(s)])
    problems += why + table_problems(d.data) + (expand_paths(d.val_data)[1] if d.val_data else [])
    if len(files) < len(d.data) and any(f.suffix != ".jsonl" for f in files):
        problems.append("--data: a Hugging Face dataset is read beside .jsonl files only")
    if lo.lora_r < 1:
        problems.append(f"--lora-r must be >= 1 (got {lo.lora_r})")
    if not 0 <= lo.lora_dropout < 1:
        problems.append(f"--lora-dropout must be in [0, 1) (got {lo.lora_dropout})")
    if lo.qlora:
        from memfit.models.optim import eight_bit_available
        why = eight_bit_available()
        if why:
            problems.append(f"--qlora needs bitsandbytes: {why}")
    if d.packing == "on" and not problems:
        model_cfg = model_config(cfg.model.model)
        if model_cfg is not None:
            from memfit.data.packing import packing_choice
            why = packing_choice(cfg, model_cfg)[1]
            if why:
                problems.append(f"--packing on: {why}; use --packing off (or auto, which pads such a model)")
    return problems


def model_config(spec: str):
    """The --model's transformers config (None when it cannot be read: the checks say why)."""
    from transformers import AutoConfig

    from memfit.models.load import local_folder, resolve_source
    try:
        return AutoConfig.from_pretrained(local_folder(resolve_source(spec)))
    except (ValueError, OSError, C.ConfigError):
        return None


def resolve_packing(cfg: C.Config) -> tuple[C.Config, str | None]:
    """--packing auto -> on or off for this --model (config.yaml records which; a resume compares it),
    with the line saying why when it is off. on/off stay as given (on is checked in check_finetune)."""
    if cfg.data.packing != "auto" or not cfg.model.model:
        return cfg, None
    model_cfg = model_config(cfg.model.model)
    if model_cfg is None:
        return cfg, None
    from memfit.data.packing import packing_choice
    pack, why = packing_choice(cfg, model_cfg)
    note = f"packing off: {why}; each example is padded instead" if why else None
    return cfg.replace(data={"packing": "on" if pack else "off"}), note


def will_resume(cfg: C.Config, run_dir: Path) -> bool:
    from memfit.ckpt.policy import list_checkpoints
    r = cfg.checkpoint.resume
    if r and r.startswith("weights:"):
        return False           # a new run from those weights: step 0
    return bool(r) and (r != "auto" or
                                            bool(list_checkpoints(run_dir / "checkpoints")))


def run_causal_lm(cfg: C.Config) -> TrainResult:
    import torch

    from memfit.data.batches import PaddedBatches
    from memfit.data.examples import build_lm_data, row_length
    from memfit.models.load import (
        adapter_base,
        base_fingerprint,
        load_causal_lm,
        load_tokenizer,
        local_folder,
        resolve_source,
    )
    from memfit.precision import resolve_precision

    cfg, packing_note = resolve_packing(cfg)     # before the plan: it prices packed or padded rows
    start = start_run(cfg, check_finetune)
    cfg, run_dir, device = start.cfg, start.run_dir, start.device
    if packing_note:
        log.info(packing_note)
    lo = cfg.lora
    src = resolve_source(cfg.model.model)
    tokenizer = load_tokenizer(src)
    from transformers import AutoConfig
    max_len = row_length(cfg, AutoConfig.from_pretrained(local_folder(src)))
    from memfit.data.formats import expand_paths
    from memfit.data.hfrecords import ArrowTable, is_hf_entry
    from memfit.data.sftstream import ExampleStream, streamable
    hf = [ArrowTable(s) for s in cfg.data.data if is_hf_entry(s)]   # datasets: always streamed by row index
    files = expand_paths([s for s in cfg.data.data if not is_hf_entry(s)])[0]
    stream = ExampleStream(hf + files, cfg, tokenizer, max_len) if hf or streamable(files) else None
    if stream is None:
        data = build_lm_data(cfg, tokenizer, max_len)       # before the model: bad data fails in seconds
    else:                  # too large to hold: read as it trains (data/sftstream.py); validation read now
        from memfit.data.examples import LMData
        data = LMData([], stream.validation(expand_paths(cfg.data.val_data)[0]), [])
        if not data.val:
            raise C.ConfigError(["no validation examples in the stream: give --val-data or a larger --val-fraction"])
    log.info(f"data: {data.describe() if stream is None else f'streamed from {len(stream.files)} source(s)'} "
             f"(max {max_len} tokens per example)")

    precision, _ = resolve_precision(cfg.train.precision, device)
    model = load_causal_lm(src, qlora=lo.qlora, compute_dtype=precision.autocast_dtype or torch.float32,
                           device=device.torch_device, attn_implementation=cfg.model.attn_implementation)
    n_params = sum(p.numel() for p in model.parameters())
    log.info(f"model: {src} ({type(model).__name__}, {n_params:,} parameters"
             f"{', 4-bit nf4 + double quantization' if lo.qlora else ''})")

    model_state = None
    if lo.lora or lo.qlora:
        from memfit.models.lora import AdapterState, apply_lora, trainable_summary
        model = apply_lora(model, lo.lora_r, lo.lora_alpha, lo.lora_dropout, lo.lora_target_modules,
                           qlora=lo.qlora, gradient_checkpointing=cfg.train.gradient_checkpointing)
        model_state = AdapterState(model, base_fingerprint(src), adapter_base(src))
        log.info(f"LoRA r={lo.lora_r} alpha={lo.lora_alpha}: {trainable_summary(model)}")
    else:
        log.info("full fine-tuning: every weight trains (add --lora or --qlora to train adapters only)")

    from memfit.dist.env import global_batch
    eff = global_batch(cfg)      # micro x accumulation x ranks
    pad = tokenizer.pad_token_id
    per_epoch = None
    if stream is not None:
        from memfit.data.sftstream import StreamedBatches
        train_batches = StreamedBatches(stream, eff, pad, max_len if cfg.data.packing == "on" else None)
        per_epoch = lambda: stream_epoch_steps(cfg, max_len, eff)  # noqa: E731 - only when the rule needs it
    elif cfg.data.packing == "on":
        from memfit.data.packing import PackedBatches
        train_batches = PackedBatches(data.train, eff, pad, max_len, cfg.train.seed)
        layout = train_batches.epoch_batches(0)
        rows = sum(r for _, r in layout)
        log.info(f"packing: {len(data.train):,} examples in {rows:,} rows of {max_len} tokens per epoch "
                 f"(~{len(data.train) / max(1, len(layout)):.1f} examples per step of {eff} rows); "
                 f"{len(layout):,} steps per epoch")
    else:
        train_batches = PaddedBatches(data.train, eff, pad, cfg.train.seed)
    cfg, total_steps = run_length(cfg, per_epoch or len(train_batches))
    job = assemble_job(cfg, model, train_batches, total_steps, device, run_dir, model_state=model_state,
                       tokenizer=tokenizer)
    run_preflight(job, start.plan)     # before train() reads a batch: no data, no RNG
    dev = device.torch_device

    def evaluate() -> dict[str, float]:
        val = PaddedBatches(data.val, eff, pad, shuffle=False, loop=False)
        return job_loss(job, iter(val), cfg.train.eval_batches)

    def sample() -> str:
        return "\n".join(f"[{i}] {complete(model, tokenizer, p, cfg.train.sample_tokens, dev, specials)}"
                         for i, (p, _, specials) in enumerate(data.prompts))

    def export() -> Path:
        out = run_dir / "final_model"
        if model_state is not None:
            from memfit.models.lora import save_adapter
            merge = f"memfit merge --adapter {out} --out merged --dtype fp16"
            extra = {"base": src.spec, "base_fingerprint": model_state.fingerprint, "merge": merge}
            save_adapter(model, out, adapter_base(src), tokenizer, extra=extra)
            return out
        from memfit.export import export_hf
        return export_hf(model, tokenizer, out)

    job.hooks.evaluate, job.hooks.export = evaluate, export
    job.hooks.sample = sample if cfg.train.sample_tokens > 0 and data.prompts else None

    before = None
    main = job.world.is_main      # (N ranks: rank 0 alone evaluates and writes the summary)
    if main and not will_resume(cfg, run_dir):
        job.model.to(dev)
        before = evaluate()
        for event in job.eval_oom.drain():     # (an OOM here shrank the eval micro-batch)
            job.history.append(event)
        row = {"kind": "eval", "step": 0, "phase": "before", **before}
        if job.hooks.sample is not None:
            row["sample"] = sample()
        job.history.append(row)
        log.info(f"before training: val_loss={before['val_loss']:.4f} val_ppl={before['val_ppl']:.2f}"
                 + (f"\n  sample: {as_text(row['sample'])}" if "sample" in row else ""))
        for p, ref, _ in data.prompts:     # text, as the samples are (finish.as_text), not Python reprs
            log.info(f"  held-out prompt: {as_text(p[-200:], 19)}\n  reference: {as_text(ref[:200], 13)}")

    result = run_job(job)
    if main and result.status not in ("stopped", "not_saved") and result.metrics:
        if before is None:
            before = next((r for r in job.history.rows if r.get("phase") == "before"), None)
        summary = {"val_loss_after": result.metrics.get("val_loss"),
                   "val_ppl_after": result.metrics.get("val_ppl"), "steps": result.step}
        if before:
            summary.update(val_loss_before=before["val_loss"], val_ppl_before=before["val_ppl"])
            log.info(f"validation loss {before['val_loss']:.4f} -> {result.metrics['val_loss']:.4f} "
                     f"(perplexity {before['val_ppl']:.2f} -> {result.metrics['val_ppl']:.2f})")
        job.history.write_summary(run_dir, {"summary": summary})
        result.metrics.update({k: v for k, v in summary.items() if v is not None})
        if model_state is not None:
            log.info(f"adapter: {result.final_model}  (merge: memfit merge --adapter "
                     f"{result.final_model} --out {run_dir / 'merged'} --dtype fp16)")
    return result


def stream_epoch_steps(cfg: C.Config, max_len: int, eff: int) -> float | None:
    """Steps in one epoch of a streamed --data, as the plan estimates it (a sample, scaled)."""
    from memfit.plan.epoch import packed_epoch, training_examples
    if cfg.data.packing == "on":
        layout = packed_epoch(cfg, max_len, eff)
        return layout.steps if layout else None
    n = training_examples(cfg)
    return n / eff if n else None


def complete(model, tokenizer, prompt: str, max_new_tokens: int, device,
             add_special_tokens: bool = True) -> str:
    """Greedy completion of a held-out prompt, stopping at EOS. No repetition penalty (answers often
    repeat the prompt's words and numbers), and greedy decoding draws no random numbers, so sampling
    never perturbs the training RNG."""
    was_training = model.training
    model.eval()
    try:
        from memfit.train.evaluate import generate_in_context
        ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=add_special_tokens)["input_ids"]
        out, _ = generate_in_context(model, ids.to(device), max_new_tokens, do_sample=False,
                                     pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
        return tokenizer.decode(out[0], skip_special_tokens=True)
    finally:
        model.train(was_training)
