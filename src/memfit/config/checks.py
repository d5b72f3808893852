"""validate(cfg): the checks that need no file system or torch (ranges, flag combinations), all at once."""

from __future__ import annotations

from .groups import Config


def validate(cfg: Config) -> list[str]:
    """Problems that need no file system or torch: ranges and flag combinations. Returns them all;
    the caller adds environment checks (data exists, output dir) and raises ConfigError once."""
    p: list[str] = []
    t, d, o, c, b = cfg.train, cfg.data, cfg.optim, cfg.checkpoint, cfg.budget
    if t.batch_size < 1:
        p.append(f"--batch-size must be >= 1 (got {t.batch_size})")
    if t.gradient_accumulation_steps < 1:
        p.append(f"--gradient-accumulation-steps must be >= 1 (got {t.gradient_accumulation_steps})")
    if t.effective_batch is not None and t.effective_batch < 1:
        p.append(f"--effective-batch must be >= 1 (got {t.effective_batch})")
    if t.effective_batch is not None and t.gradient_accumulation_steps != 1:
        p.append("give either --effective-batch or --gradient-accumulation-steps, not both")
    if t.max_steps is not None and t.max_steps < 1:
        p.append(f"--max-steps must be >= 1 (got {t.max_steps})")
    if t.epochs is not None and t.epochs <= 0:
        p.append(f"--epochs must be > 0 (got {t.epochs})")
    if d.seq_len < 2:
        p.append(f"--seq-len must be >= 2 (got {d.seq_len})")
    if d.stride is not None and not (1 <= d.stride):
        p.append(f"--stride must be >= 1 (got {d.stride})")
    if not 0 < d.val_fraction < 1:
        p.append(f"--val-fraction must be in (0, 1) (got {d.val_fraction})")
    if d.subset_ratio is not None and not 0 < d.subset_ratio <= 1:
        p.append(f"--subset-ratio must be in (0, 1] (got {d.subset_ratio})")
    if d.max_val_examples is not None and d.max_val_examples < 1:
        p.append(f"--max-val-examples must be >= 1 (got {d.max_val_examples})")
    if d.epoch_tokens is not None and d.epoch_tokens < 1:
        p.append(f"--epoch-tokens must be >= 1 (got {d.epoch_tokens})")
    if d.max_examples is not None and d.max_examples < 1:
        p.append(f"--max-examples must be >= 1 (got {d.max_examples})")
    if d.vocab_size < 256 + 1:
        p.append(f"--vocab-size must be > 256 for a byte-level BPE (got {d.vocab_size})")
    if not d.data:
        p.append("--data is empty: name a file, glob, directory or corpus (shakespeare, kjv, bbc)")
    if d.num_workers < 0:
        p.append(f"--num-workers must be >= 0 (got {d.num_workers})")
    if cfg.model.target_params < 10_000:
        p.append(f"--target-params must be >= 10k (got {cfg.model.target_params})")
    if not 0 <= cfg.model.dropout < 1:
        p.append(f"--dropout must be in [0, 1) (got {cfg.model.dropout})")
    if o.lr is not None and o.lr <= 0:
        p.append(f"--lr must be > 0 (got {o.lr})")
    if o.warmup_steps is not None and o.warmup_steps < 0:
        p.append(f"--warmup-steps must be >= 0 (got {o.warmup_steps})")
    if o.warmup_ratio is not None and not 0 <= o.warmup_ratio < 1:
        p.append(f"--warmup-ratio must be in [0, 1) (got {o.warmup_ratio})")
    if o.warmup_steps is not None and o.warmup_ratio is not None:
        p.append("give --warmup-steps or --warmup-ratio, not both")
    if c.keep_last < 0:
        p.append(f"--keep-last must be >= 0 (got {c.keep_last}; 0 keeps best/ only once the run finishes)")
    if c.save_every is not None and c.save_every < 1:
        p.append(f"--save-every must be >= 1 (got {c.save_every})")
    if t.eval_every < 0:
        p.append(f"--eval-every must be >= 0 (got {t.eval_every})")
    if b.time_limit is not None and b.deadline is not None:
        p.append("give --time-limit or --deadline, not both")
    if b.time_limit is not None and b.time_limit <= 0:
        p.append(f"--time-limit must be positive (got {b.time_limit}s)")
    if cfg.lora.qlora and cfg.task == "pretrain":
        p.append("--qlora needs an existing model (memfit finetune --model ...)")
    return p
