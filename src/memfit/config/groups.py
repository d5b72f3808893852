"""The typed groups (data, model, optim, train, checkpoint, budget, oom, lora, run), the whole-job Config,
and the per-job defaults (job_kind, with_job_defaults, warmup_steps). Every field's `help` metadata is its
--flag help text: the dataclasses are the single source of truth for flag names."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field, fields
from typing import Any, Optional, get_type_hints

from .options import CLS, FT, PRE, TASKS, opt


@dataclass(frozen=True)
class DataConfig:
    data: tuple[str, ...] = opt(("shakespeare",), "Training data: .txt/.jsonl/.csv/.parquet paths, globs, "
                                "directories, an embedded corpus (shakespeare, kjv, bbc), or hf:ID. Mix "
                                "sources with weights as PATH@WEIGHT, e.g. shakespeare@3 kjv@1.",
                                jobs=PRE + FT + CLS)
    val_data: tuple[str, ...] = opt((), "Separate validation data (same syntax as --data). Default: a "
                                    "deterministic split of --data by document hash.", jobs=PRE + FT)
    val_fraction: float = opt(0.05, "Fraction of documents (by hash) held out for validation when "
                              "--val-data is not given.", jobs=PRE + FT + CLS)
    text_field: str = opt("text", "JSONL/CSV/Parquet field holding the text, or a template over "
                          "fields such as '{instruction}\\n{output}'.", jobs=PRE + FT + CLS)
    text_split: str = opt("file", "How .txt files split into documents: one per file, or one per "
                          "blank-line-separated block.", choices=("file", "paragraph"), jobs=PRE)
    tokenizer: str = opt("bpe", "'bpe' trains a byte-level BPE on the training data; 'gpt2' uses the "
                         "offline GPT-2 BPE; or a local tokenizer directory / model directory.", jobs=PRE)
    vocab_size: int = opt(8192, "Vocabulary size when training a BPE tokenizer.", jobs=PRE)
    seq_len: int = opt(256, "Tokens per training sequence (block size).", jobs=PRE)
    stride: Optional[int] = opt(None, "Step between packed blocks (default: seq-len, no overlap).", jobs=PRE)
    max_seq_len: Optional[int] = opt(None, "Truncate examples to this length (finetune: 1024 or the model's "
                                     "context if shorter; classify: 256); with packing, the packed row length.",
                                     jobs=FT + CLS)
    packing: str = opt("auto", "Fine-tuning: several examples per --max-seq-len row, each with its own "
                       "positions and no attention across examples. auto = on where the model keeps packed "
                       "examples apart (checked on a small copy of it), else off with a line saying why.",
                       parse="switch", choices=("auto", "on", "off"), jobs=FT)
    max_val_examples: Optional[int] = opt(None, "classify: score at most N validation texts (a fixed subset "
                                          "of the split, every class kept in proportion).", parse="count",
                                          jobs=CLS)
    epoch_tokens: Optional[int] = opt(None, "Tokens in one epoch of --data when you know them (e.g. 103M): "
                                      "the plan and the step count use it instead of estimating.",
                                      parse="count", jobs=PRE)
    shuffle_buffer_size: int = opt(1024, "Documents held in the streaming shuffle buffer (0 = no shuffle).",
                                   jobs=PRE)
    max_examples: Optional[int] = opt(None, "Use at most this many training documents.", parse="count",
                                       jobs=PRE + FT + CLS)
    subset_ratio: Optional[float] = opt(None, "Use this fraction (0-1] of the training documents.",
                                           jobs=PRE + FT + CLS)
    encoding: str = opt("utf-8", "Text encoding of the data files (e.g. latin-1, cp1252). A file with more "
                        "than 1% undecodable characters is refused; fewer are counted and warned about.",
                        jobs=PRE)   # read by memfit.data (pretraining); finetune/classify read UTF-8 today
    on_bad_record: str = opt("skip", "What to do with a bad JSONL/CSV record: skip it (counted) or fail.",
                             choices=("skip", "fail"), jobs=PRE + FT + CLS)
    num_workers: int = opt(0, "DataLoader worker processes for tokenization (0 = in the main process).",
                           jobs=PRE)


@dataclass(frozen=True)
class ModelConfig:
    arch: str = opt("gpt2", "Architecture for from-scratch models.", choices=("gpt2", "llama"), jobs=PRE)
    target_params: int = opt(3_000_000, "From-scratch model size (all parameters, e.g. 10M); layers, width "
                             "and heads are chosen to land within 10%.", parse="count", jobs=PRE)
    model: Optional[str] = opt(None, "Existing model: local HF folder, .gguf file, or hub id (fine-tuning).",
                                  jobs=FT + CLS)
    dropout: float = opt(0.0, "Dropout probability (0 is usual for short pretraining; costs ~23% CPU time).",
                         jobs=PRE)
    attn_implementation: str = opt("sdpa", "Attention kernel (transformers' attn_implementation, set at model "
                                   "load): sdpa (fused: no T x T matrix kept), eager (keeps each layer's "
                                   "attention probabilities: more memory, planned as such), flash_attention_2 "
                                   "(a CUDA GPU with the flash-attn package).",
                                   choices=("sdpa", "eager", "flash_attention_2"), jobs=PRE + FT + CLS)


@dataclass(frozen=True)
class OptimConfig:
    optimizer: str = opt("adamw", "Optimizer: adamw (fused/foreach), adamw8bit, paged_adamw8bit.",
                         choices=("adamw", "adamw8bit", "paged_adamw8bit"))
    # Per-job defaults, as each field uses them: pretraining nanoGPT/Chinchilla-style (high lr, wd 0.1,
    # beta2 0.95 for stability at large batch, fixed warmup); fine-tuning a pretrained model needs a
    # ~50x smaller lr (HF Trainer / BERT: 2e-5..5e-5, wd 0-0.01, beta2 0.999) and LoRA ~10x more than full
    # fine-tuning (QLoRA paper: 2e-4, warmup ratio 0.03); memfit.fit takes torch's AdamW defaults.
    # Warmup is a ratio of the run outside pretraining, so a 14-step run reaches its peak lr.
    lr: Optional[float] = opt(None, "Peak learning rate.", per_job={
        "pretrain": 1e-3, "finetune": 2e-5, "lora": 2e-4, "classify": 5e-5, "custom": 1e-3})
    weight_decay: Optional[float] = opt(None, "AdamW weight decay (not applied to biases and norms).",
                                        per_job={"pretrain": 0.1, "finetune": 0.0, "lora": 0.0,
                                                 "classify": 0.01, "custom": 0.01})
    beta1: float = opt(0.9, "Adam beta1.")
    beta2: Optional[float] = opt(None, "Adam beta2.", per_job={
        "pretrain": 0.95, "finetune": 0.999, "lora": 0.999, "classify": 0.999, "custom": 0.999})
    warmup_steps: Optional[int] = opt(None, "Linear warmup steps before the cosine decay (wins over the "
                                      "job's default --warmup-ratio).", per_job={
                                          "pretrain": 50, "finetune": None, "lora": None, "classify": None,
                                          "custom": 0})
    warmup_ratio: Optional[float] = opt(None, "Warmup as a fraction of the optimizer steps (rounded up); "
                                        "give it or --warmup-steps, not both.", per_job={
                                            "pretrain": None, "finetune": 0.1, "lora": 0.03,
                                            "classify": 0.1, "custom": None})
    min_lr_ratio: float = opt(0.1, "Cosine decays to lr * this ratio.")
    max_grad_norm: float = opt(1.0, "Clip the global gradient norm to this (0 = off).")


@dataclass(frozen=True)
class TrainConfig:
    batch_size: int = opt(16, "Micro-batch: sequences per forward/backward pass.")
    gradient_accumulation_steps: int = opt(1, "Micro-batches accumulated per optimizer step.")
    effective_batch: Optional[int] = opt(None, "Sequences per optimizer step (instead of giving "
                                         "accumulation); auto-fit and OOM recovery keep it fixed.")
    epochs: Optional[float] = opt(None, "Passes over the training data. With neither --epochs nor "
                                  "--max-steps: one epoch capped at 200 steps (the quick default job).")
    max_steps: Optional[int] = opt(None, "Stop after this many optimizer steps (with --epochs: whichever "
                                "comes first).")
    precision: str = opt("auto", "auto: fp16 on pre-Ampere GPUs, bf16 on Ampere+ or a CPU with native "
                         "bf16, else fp32.", choices=("auto", "fp32", "fp16", "bf16"))
    gradient_checkpointing: bool = opt(False, "Recompute activations in backward (less memory, ~30% slower).")
    chunked_loss: bool = opt(True, "Causal LMs: cross-entropy through the LM head in chunks of rows, never "
                             "holding the whole micro-batch's logits (same loss and gradients, far less "
                             "memory at large vocabularies).", jobs=PRE + FT + ("custom",))
    eval_every: int = opt(100, "Evaluate every N optimizer steps (0 = only at the end).")
    eval_strategy: str = opt("steps", "steps: evaluate every --eval-every steps; epoch: at the end of each "
                             "epoch (replaces --eval-every).", choices=("steps", "epoch"))
    eval_batches: int = opt(20, "Validation batches per evaluation (0 = the whole validation set).",
                            jobs=PRE + FT + CLS)
    log_every: int = opt(10, "Log metrics every N optimizer steps.")
    seed: int = opt(1337, "Random seed (python, numpy, torch, data order).")
    sample_prompt: str = opt("", "Prompt for the sample generation printed at each eval (default: "
                             "the start of a validation document).", jobs=PRE)
    sample_tokens: int = opt(40, "Tokens generated for the eval sample (0 = none).", jobs=PRE + FT)
    class_weights: str = opt("none", "classify: weight the loss per class (balanced = inverse frequency).",
                             choices=("none", "balanced"), jobs=CLS)


@dataclass(frozen=True)
class CheckpointConfig:
    save_every: Optional[int] = opt(None, "Save a checkpoint every N optimizer steps.")
    save_every_minutes: Optional[float] = opt(None, "Save a checkpoint every N minutes of training.")
    save_strategy: str = opt("steps", "steps: save every --save-every steps (or minutes); epoch: at the end of "
                             "each epoch (replaces --save-every).", choices=("steps", "epoch"))
    keep_last: int = opt(4, "Keep the K most recent checkpoints (best/ is kept separately; 0 = best/ only once "
                            "the run finishes, the newest checkpoint until then).")
    save_optimizer_state: str = opt("auto", "full: every checkpoint resumable; light: weights only; "
                                    "auto: the two newest full, older ones light.",
                                    choices=("auto", "full", "light"))
    metric_for_best: Optional[str] = opt(None, "Metric that selects best/ (val_loss, val_ppl, accuracy, f1).",
                                         per_job={"pretrain": "val_loss", "finetune": "val_loss",
                                                  "lora": "val_loss", "classify": "f1", "custom": "val_loss"})
    greater_is_better: Optional[bool] = opt(None, "Whether a larger --metric-for-best is better "
                                            "(default: true for accuracy/f1, false for losses).")
    early_stopping_patience: Optional[int] = opt(None, "Stop after N evaluations without improvement.")
    mirror_to: Optional[str] = opt(None, "Also copy each finished checkpoint here (directory or fsspec URL).")
    resume: Optional[str] = opt(None, "'auto' continues the latest good checkpoint in the run directory "
                                "(starts fresh if none); or a checkpoint PATH; or weights:PATH, a new run "
                                "from that checkpoint's weights only (fresh optimizer, schedule and data "
                                "position, step 0).")
    overwrite: bool = opt(False, "Start over in --output-dir: removes only the files memfit wrote there "
                          "(.memfit-files); refused if it holds anything else.")


@dataclass(frozen=True)
class BudgetConfig:
    gpu: Optional[str] = opt(None, "Target GPU profile for planning (t4, p100, v100-16, v100-32, a10g, l4, "
                             "a100-40, a100-80, h100, cpu): the device only (budgets: --platform).")
    platform: str = opt("none", "Notebook platform whose limits fill the budgets not given: kaggle (9h session "
                        "as --time-limit, 20GB --disk-budget, 30GB --ram), colab (12h, 78GB, 12.7GB), none.",
                        choices=("kaggle", "colab", "none"))
    gpu_memory: Optional[int] = opt(None, "GPU memory budget instead of a profile (e.g. 16GB).",
                                    parse="bytes")
    ram: Optional[int] = opt(None, "Host RAM budget (default: this machine's).", parse="bytes")
    time_limit: Optional[float] = opt(None, "Wall-clock budget counted from process start (e.g. 9h); "
                                      "memfit stops in time to save, evaluate and export.",
                                      parse="duration")
    deadline: Optional[str] = opt(None, "Clock time to stop by, e.g. 2026-11-22T18:00 or 18:00.")
    disk_budget: Optional[int] = opt(None, "Bytes the run directory may use (default: free space minus "
                                     "a margin), e.g. 20GB.", parse="bytes")
    auto_fit: bool = opt(False, "Choose micro-batch, accumulation, precision, checkpointing and "
                         "optimizer to fit the budget.")
    preflight: str = opt("auto", "Run 1-2 real steps on a synthetic batch at the planned micro-batch before "
                         "training (no data, no RNG used) and shrink the micro-batch if they exceed the "
                         "budget; auto: on for GPU, off for CPU (where the plan's trace is exact).",
                         parse="switch", choices=("auto", "on", "off"))


@dataclass(frozen=True)
class OOMConfig:
    oom_regrow: bool = opt(False, "After many clean steps, try doubling the micro-batch again.")
    empty_cache_every: Optional[int] = opt(None, "Empty the allocator cache every N steps (off: only "
                                           "helps with fragmentation from very variable shapes).")
    inject_oom_above_tokens: Optional[int] = opt(None, "Testing: raise a real torch.OutOfMemoryError "
                                                 "when a micro-batch exceeds N tokens.")


@dataclass(frozen=True)
class LoRAConfig:
    lora: bool = opt(False, "Train LoRA adapters instead of all weights.", jobs=FT)
    qlora: bool = opt(False, "Load the base in 4-bit nf4 (bitsandbytes) and train LoRA adapters.", jobs=FT)
    lora_r: int = opt(8, "LoRA rank.", jobs=FT)
    lora_alpha: int = opt(16, "LoRA alpha (scale = alpha / r).", jobs=FT)
    lora_dropout: float = opt(0.05, "LoRA dropout.", jobs=FT)
    lora_target_modules: tuple[str, ...] = opt((), "Modules to adapt (default per architecture).", jobs=FT)
    train_on_prompt: bool = opt(False, "Also take loss on prompt tokens (default: response only).", jobs=FT)


@dataclass(frozen=True)
class RunConfig:
    output_dir: Optional[str] = opt(None, "Run directory (default runs/<name>; on Kaggle use "
                                    "/kaggle/working/<name>).")
    name: Optional[str] = opt(None, "Run name (default: derived from the job and a timestamp).")
    report_to: str = opt("none", "Also log to tensorboard or wandb.", choices=("none", "tensorboard", "wandb"))
    quiet: bool = opt(False, "No progress bar (logs still go to memfit.log).")
    verbose: bool = opt(False, "Show the libraries' own output too: transformers/peft/huggingface_hub/datasets "
                        "progress bars, weight-loading reports and deprecation warnings.")


@dataclass(frozen=True)
class Config:
    """A whole job. Groups are separate so each module reads only its own part."""
    task: str = opt("pretrain", "Job kind.", choices=("pretrain", "finetune", "classify", "custom"))
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    budget: BudgetConfig = field(default_factory=BudgetConfig)
    oom: OOMConfig = field(default_factory=OOMConfig)
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    run: RunConfig = field(default_factory=RunConfig)

    # ------------------------------------------------------------ derived values
    def effective_batch(self, world_size: int = 1) -> int:
        if self.train.effective_batch:
            return self.train.effective_batch
        return self.train.batch_size * self.train.gradient_accumulation_steps * world_size

    def replace(self, **groups: dict[str, Any]) -> "Config":
        """Config.replace(train={"lr": 3e-4}) -> a new Config with those fields changed."""
        new = {}
        for name, changes in groups.items():
            cur = getattr(self, name)
            new[name] = dataclasses.replace(cur, **changes) if dataclasses.is_dataclass(cur) else changes
        return dataclasses.replace(self, **new)


GROUPS = ("data", "model", "optim", "train", "checkpoint", "budget", "oom", "lora", "run")


def job_kind(cfg: Config) -> str:
    """The task, with LoRA/QLoRA fine-tuning told apart from full fine-tuning (their defaults differ)."""
    if cfg.task == "finetune" and (cfg.lora.lora or cfg.lora.qlora):
        return "lora"
    return cfg.task


def applies(f: dataclasses.Field, task: str) -> bool:
    """Whether a job of this task reads the field (--help and config.yaml show only those)."""
    return task in f.metadata.get("jobs", TASKS)


def job_default(f: dataclasses.Field, kind: str) -> Any:
    per_job = f.metadata.get("per_job")
    return f.default if per_job is None else per_job[kind]


def with_job_defaults(cfg: Config) -> Config:
    """Fill each per-job field left unset (None) with the default of this job's kind. Idempotent; run
    once the whole config is known (a later --lora changes the kind, so not while parsing).
    Warmup: a given --warmup-steps or --warmup-ratio replaces the job's default warmup entirely."""
    kind = job_kind(cfg)
    changes: dict[str, dict[str, Any]] = {}
    for group, f in iter_fields():
        if group is None or f.metadata.get("per_job") is None or f.name in ("warmup_steps", "warmup_ratio"):
            continue
        if getattr(getattr(cfg, group), f.name) is None:
            changes.setdefault(group, {})[f.name] = job_default(f, kind)
    o = cfg.optim
    if o.warmup_steps is None and o.warmup_ratio is None:
        per = {g.name: g for g in fields(OptimConfig)}
        changes.setdefault("optim", {}).update(warmup_steps=job_default(per["warmup_steps"], kind),
                                               warmup_ratio=job_default(per["warmup_ratio"], kind))
    return cfg.replace(**changes) if changes else cfg


def warmup_steps(o: OptimConfig, total_steps: int) -> int:
    """The warmup of a run of total_steps: --warmup-steps, else ceil(--warmup-ratio * steps)."""
    import math
    if o.warmup_steps is not None:
        return o.warmup_steps
    return math.ceil((o.warmup_ratio or 0.0) * total_steps - 1e-9)

def iter_fields():
    """(group or None, Field) for every leaf option, in --help order."""
    for f in fields(Config):
        if f.name in GROUPS:
            for g in fields(type(getattr(Config(), f.name))):
                yield f.name, g
        else:
            yield None, f


def field_type(group: str | None, f: dataclasses.Field) -> Any:
    cls = Config if group is None else type(getattr(Config(), group))
    return get_type_hints(cls)[f.name]
