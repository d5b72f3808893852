"""`memfit train`: pretrain a causal LM from scratch — tokenizer, a model sized to --target-params, token
streams — then THE run start, assembly and loop of memfit.jobs.common. What is pretraining's own: its
checks (a model shape and a checkpoint that fit), the sample generation at each evaluation, and the
final summary against an add-one unigram floor.
"""

from __future__ import annotations

import itertools
import logging
import time
from pathlib import Path

from memfit import config as C
from memfit.jobs.common import assemble_job, run_job, run_length, start_run
from memfit.jobs.preflight import run_preflight
from memfit.train.evaluate import job_loss
from memfit.train.job import TrainResult

log = logging.getLogger("memfit")
UNIGRAM_MAX_TOKENS = 20_000_000   # the unigram floor's fit: plenty for stable counts, seconds to read


def check_pretrain(cfg: C.Config, run_dir: Path) -> list[str]:
    """Pretraining's problems beyond memfit.jobs.common.common_problems: data, model shape, disk."""
    from memfit.data import check_data
    return check_data(cfg) + sizing_problems(cfg) + pretrain_disk_problems(cfg, run_dir)


def sizing_problems(cfg: C.Config) -> list[str]:
    """A --target-params/--seq-len/--vocab-size no model shape meets, found before anything is written.
    The vocabulary is the BPE's target size (a trained one is never larger) or GPT-2's; a local
    tokenizer's size is known only once loaded, so it is checked when the model is built."""
    vocab = {"bpe": cfg.data.vocab_size, "gpt2": 50257}.get(cfg.data.tokenizer)
    if vocab is None or cfg.data.seq_len < 1 or vocab < 1:
        return []
    from memfit.models import size_model
    first = None
    # a trained BPE may come out smaller than --vocab-size (down to its 257 byte-level symbols):
    # refused only when neither end of that range has a shape
    for v in ((vocab, 257) if cfg.data.tokenizer == "bpe" else (vocab,)):
        try:
            size_model(cfg.model.target_params, cfg.model.arch, v, cfg.data.seq_len)
            return []
        except ValueError as e:
            first = first or e
    return [f"--target-params {cfg.model.target_params:,} with --seq-len {cfg.data.seq_len:,}: {first}"]


def pretrain_disk_problems(cfg: C.Config, run_dir: Path) -> list[str]:
    """A disk or --disk-budget that cannot hold one checkpoint: exit 2 before anything is written (the
    size follows from --target-params; the checkpointer checks again once the model is built)."""
    from memfit.ckpt.space import capacity_problem, full_checkpoint_estimate
    from memfit.models import size_model
    vocab = {"bpe": cfg.data.vocab_size, "gpt2": 50257}.get(cfg.data.tokenizer)
    if vocab is None:     # a tokenizer directory: its vocabulary is known once it is loaded
        return []
    try:
        params = size_model(cfg.model.target_params, cfg.model.arch, vocab, cfg.data.seq_len).params
    except ValueError:
        return []         # reported by the model checks
    problem = capacity_problem(run_dir, cfg.budget.disk_budget,
                               full_checkpoint_estimate(4 * params, params, cfg.optim.optimizer))
    return [problem] if problem else []


def run_pretrain(cfg: C.Config) -> TrainResult:
    from memfit.data import build_streams, estimate_tokens

    start = start_run(cfg, check_pretrain)
    cfg, run_dir, device = start.cfg, start.run_dir, start.device
    from memfit.data.check import encoding_warnings
    for w in encoding_warnings(cfg):     # counted by check_pretrain: a cached scan, no second read
        log.warning(w)

    from memfit.jobs.ranks import shared_tokenizer
    t0 = time.perf_counter()
    tokenizer = shared_tokenizer(cfg, run_dir / "tokenizer")   # (rank 0 writes it; others load it)
    log.info(f"tokenizer: {type(tokenizer).__name__}, vocab {len(tokenizer)} ({time.perf_counter() - t0:.1f}s)")

    model, shape_text = build_pretrain_model(cfg, len(tokenizer), tokenizer)
    log.info(f"model: {shape_text}")

    from memfit.dist.env import global_batch
    eff = global_batch(cfg)    # the global batch: every rank reads all of it
    # Estimated only when the length needs an epoch (reading the corpus costs); neither --epochs nor
    # --max-steps: the quick default job (run_length.DEFAULT_CAPS, which the plan applies too).
    cfg, total_steps = run_length(
        cfg, lambda: (cfg.data.epoch_tokens or estimate_tokens(cfg, tokenizer)) / (eff * cfg.data.seq_len))
    train_stream, val_stream = build_streams(cfg, tokenizer, eff, cfg.train.seed)

    job = assemble_job(cfg, model, train_stream, total_steps, device, run_dir, tokenizer=tokenizer)
    run_preflight(job, start.plan)     # before train() reads a batch: no data, no RNG

    def evaluate():
        return job_loss(job, iter(val_stream), cfg.train.eval_batches)

    # The eval sample continues the start of the first validation block unless a prompt is given.
    first_val = next(iter(val_stream), None)
    default_prompt = tokenizer.decode(first_val["input_ids"][0, :12]) if first_val is not None else "\n"

    def sample():
        from memfit.train.evaluate import generate_text
        prompt = cfg.train.sample_prompt or default_prompt
        return generate_text(model, tokenizer, prompt, cfg.train.sample_tokens, device.torch_device,
                             oom=job.eval_oom, step=job.counters["step"])

    def export():
        from memfit.export import export_hf
        return export_hf(model, tokenizer, run_dir / "final_model")

    def finalize() -> dict:
        """The summary: validation (at most --eval-batches, and only while time is left before the
        deadline's margin) against an add-one unigram floor."""
        from memfit.data.count import iter_split_tokens
        from memfit.train.evaluate import unigram_baseline
        stop = job.deadline.past_margin if job.deadline is not None else None
        full_val = job_loss(job, iter(val_stream), cfg.train.eval_batches, stop)
        for event in job.eval_oom.drain():     # (an OOM here shrank the eval micro-batch)
            job.history.append(event)
        val_cut = itertools.islice(iter(val_stream), full_val["val_batches"])   # the same label tokens
        base = unigram_baseline(iter_split_tokens(cfg, tokenizer, "train"), val_cut, len(tokenizer),
                                max_train_tokens=UNIGRAM_MAX_TOKENS, stop=stop)
        summary = {**full_val, **base, "steps": job.counters["step"],
                   "params": sum(p.numel() for p in model.parameters())}
        job.history.write_summary(run_dir, {"summary": summary})
        ratio = full_val["val_ppl"] / base["unigram_ppl"]
        log.info(f"validation perplexity {full_val['val_ppl']:.2f} vs add-one unigram "
                 f"{base['unigram_ppl']:.2f} (ratio {ratio:.3f}) on {full_val['val_tokens']} tokens")
        final = run_dir / "final_model"
        log.info(f"final model: {final}  (try: memfit generate --model {final} --prompt 'ROMEO:')")
        return summary

    job.hooks.evaluate, job.hooks.export, job.hooks.finalize = evaluate, export, finalize
    job.hooks.sample = sample if cfg.train.sample_tokens > 0 else None
    try:
        return run_job(job)
    finally:
        train_stream.close()  # stops tokenizer worker processes, if any


def build_pretrain_model(cfg: C.Config, vocab_size: int, tokenizer=None):
    from memfit.models import build_causal_lm, count_params, describe, size_model
    shape = size_model(cfg.model.target_params, cfg.model.arch, vocab_size, cfg.data.seq_len)
    ids = {}
    if tokenizer is not None:
        ids = dict(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                   pad_token_id=tokenizer.pad_token_id)
    model = build_causal_lm(shape, dropout=cfg.model.dropout, attn_implementation=cfg.model.attn_implementation,
                            **ids)
    n = count_params(model)
    return model, f"{describe(shape)} (built: {n:,} parameters, target {cfg.model.target_params:,})"
