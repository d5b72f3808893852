"""Typed configuration: frozen dataclass groups, YAML + CLI overrides, one validation pass.

Every field's `help` metadata becomes its `--flag` help text, so the dataclasses are the single
source of truth for flag names (see DESIGN.md "Contracts": one set of flag names everywhere).
This module imports nothing heavy (no torch): `memfit --help` must stay fast.

Sizes ("20GB", "512MiB") and durations ("9h", "90m", "60s") are parsed at the boundary into
plain ints (bytes) and floats (seconds), so the rest of the code never parses strings.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Optional, get_args, get_origin, get_type_hints


class ConfigError(ValueError):
    """Every problem found in one validation pass; the CLI prints them all and exits 2."""

    def __init__(self, problems: list[str]):
        self.problems = list(problems)
        super().__init__(self.format())

    def format(self) -> str:
        lines = [f"memfit: {len(self.problems)} problem(s) with this configuration:"]
        lines += [f"  - {p}" for p in self.problems]
        return "\n".join(lines)


# ---------------------------------------------------------------- units

_BYTE_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9,
               "gb": 10**9, "t": 10**12, "tb": 10**12, "kib": 2**10, "mib": 2**20,
               "gib": 2**30, "tib": 2**40}
_TIME_UNITS = {"": 1, "s": 1, "sec": 1, "m": 60, "min": 60, "h": 3600, "hr": 3600, "d": 86400}


def parse_bytes(text: str | int | float) -> int:
    """'20GB' -> 20_000_000_000 (decimal, as disks are sold); '16GiB' -> binary."""
    if isinstance(text, (int, float)):
        return int(text)
    m = re.fullmatch(r"\s*([0-9.]+)\s*([a-zA-Z]*)\s*", str(text))
    if not m or m.group(2).lower() not in _BYTE_UNITS:
        raise ValueError(f"not a size: {text!r} (examples: 20GB, 512MiB, 16e9)")
    return int(float(m.group(1)) * _BYTE_UNITS[m.group(2).lower()])


def parse_duration(text: str | int | float) -> float:
    """'9h' -> 32400.0; '1h30m' -> 5400.0; a bare number is seconds."""
    if isinstance(text, (int, float)):
        return float(text)
    parts = re.findall(r"([0-9.]+)\s*([a-zA-Z]*)", str(text))
    if not parts or "".join(a + b for a, b in parts) != re.sub(r"\s", "", str(text)):
        raise ValueError(f"not a duration: {text!r} (examples: 9h, 90m, 1h30m, 60s)")
    total = 0.0
    for num, unit in parts:
        if unit.lower() not in _TIME_UNITS:
            raise ValueError(f"not a duration: {text!r} (unknown unit {unit!r})")
        total += float(num) * _TIME_UNITS[unit.lower()]
    return total


def parse_count(text: str | int | float) -> int:
    """'10M' -> 10_000_000, '1.5B' -> 1_500_000_000, '350k' -> 350_000."""
    if isinstance(text, (int, float)):
        return int(text)
    m = re.fullmatch(r"\s*([0-9.eE+]+)\s*([kKmMbBgG]?)\s*", str(text))
    if not m:
        raise ValueError(f"not a count: {text!r} (examples: 10M, 350k, 1.5B)")
    mult = {"": 1, "k": 10**3, "m": 10**6, "b": 10**9, "g": 10**9}[m.group(2).lower()]
    return int(float(m.group(1)) * mult)


# Field kinds for the CLI/YAML boundary: metadata["parse"] names one of these.
PARSERS = {"bytes": parse_bytes, "duration": parse_duration, "count": parse_count}


# Job kinds a field can apply to (Config.task values). Defaults may differ by `job_kind()`, which
# also tells LoRA/QLoRA fine-tuning ("lora") apart from full fine-tuning ("finetune").
TASKS = ("pretrain", "finetune", "classify", "custom")
KINDS = ("pretrain", "finetune", "lora", "classify", "custom")
KIND_NAMES = {"pretrain": "pretraining", "finetune": "full fine-tuning", "lora": "with --lora/--qlora",
              "classify": "classify", "custom": "memfit.fit"}


def opt(default: Any, help: str, parse: str | None = None, choices: tuple | None = None,
        flag: str | None = None, jobs: tuple[str, ...] = TASKS,
        per_job: dict[str, Any] | None = None) -> Any:
    """A config field with its --help text (and optional unit parser / choices / flag name).

    jobs: the Config.task values that read the field (--help and config.yaml show it only there).
    per_job: the default for each job kind (KINDS); the field's own default is then None ("the job's
    default"), filled in by with_job_defaults() once the job kind is known."""
    meta = {"help": help, "parse": parse, "choices": choices, "flag": flag, "jobs": jobs,
            "per_job": per_job}
    if isinstance(default, (list, dict, set)):
        raise TypeError("use tuples for sequence defaults (configs are frozen)")
    if per_job is not None and (default is not None or set(per_job) != set(KINDS)):
        raise TypeError("a per-job field defaults to None and names a default for every job kind")
    return field(default=default, metadata=meta)


PRE, FT, CLS = ("pretrain",), ("finetune",), ("classify",)


# ---------------------------------------------------------------- groups

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
    max_seq_len: Optional[int] = opt(None, "Padding mode (fine-tuning): truncate examples to this length.",
                                     jobs=FT + CLS)
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
    eval_every: int = opt(100, "Evaluate every N optimizer steps (0 = only at the end).")
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
    preflight: bool = opt(True, "Run 1-2 real steps on a synthetic batch before training to check memory.")


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


def flag_name(f: dataclasses.Field) -> str:
    return f.metadata.get("flag") or "--" + f.name.replace("_", "-")


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


def coerce(group: str | None, f: dataclasses.Field, value: Any) -> Any:
    """Turn a YAML/CLI value into the field's type (units parsed). Raises ValueError."""
    if value is None:
        return None
    parse = f.metadata.get("parse")
    if parse:
        return PARSERS[parse](value)
    tp = field_type(group, f)
    if get_origin(tp) is Optional or (get_origin(tp) is not None and type(None) in get_args(tp)):
        tp = next(a for a in get_args(tp) if a is not type(None))
    if get_origin(tp) is tuple:
        if isinstance(value, str):
            value = [v for v in re.split(r"[,\s]+", value) if v]
        return tuple(str(v) for v in value)
    if tp is bool:
        if isinstance(value, str):
            if value.lower() in ("1", "true", "yes", "on"):
                return True
            if value.lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError(f"not a boolean: {value!r}")
        return bool(value)
    if tp is int:
        if isinstance(value, float) and not value.is_integer():
            raise ValueError(f"not an integer: {value!r}")
        return int(float(value)) if isinstance(value, str) else int(value)
    if tp is float:
        return float(value)
    return str(value)


def from_dict(raw: dict[str, Any], base: Config | None = None,
              problems_out: list[str] | None = None) -> Config:
    """Build a Config from nested ({'train': {'lr': ..}}) or flat ({'lr': ..}) keys, collecting errors.

    With `problems_out`, bad values are reported there and left at their defaults, so the caller
    can go on checking the rest and list every problem at once."""
    base = base or Config()
    problems: list[str] = []
    by_name = {f.name: (g, f) for g, f in iter_fields()}
    changes: dict[str, dict[str, Any]] = {}
    top: dict[str, Any] = {}

    def put(group, f, value, where):
        try:
            v = coerce(group, f, value)
        except ValueError as e:
            problems.append(f"{where}: {e}")
            return
        choices = f.metadata.get("choices")
        if choices and v is not None and v not in choices:
            problems.append(f"{where}: {v!r} is not one of {', '.join(choices)}")
            return
        if group is None:
            top[f.name] = v
        else:
            changes.setdefault(group, {})[f.name] = v

    for key, value in (raw or {}).items():
        key = key.replace("-", "_")
        if key in GROUPS and isinstance(value, dict):
            group_fields = {g.name: g for g in fields(type(getattr(base, key)))}
            for k2, v2 in value.items():
                k2 = k2.replace("-", "_")
                if k2 not in group_fields:
                    problems.append(f"unknown option {key}.{k2}")
                    continue
                put(key, group_fields[k2], v2, f"{key}.{k2}")
        elif "." in key and key.split(".", 1)[0] in GROUPS:
            g, k2 = key.split(".", 1)
            group_fields = {x.name: x for x in fields(type(getattr(base, g)))}
            if k2 not in group_fields:
                problems.append(f"unknown option {key}")
                continue
            put(g, group_fields[k2], value, key)
        elif key in by_name:
            put(*by_name[key], value, key)
        else:
            problems.append(f"unknown option {key!r}")
    if problems and problems_out is None:
        raise ConfigError(problems)
    if problems_out is not None:
        problems_out.extend(problems)
    cfg = dataclasses.replace(base, **top)
    return cfg.replace(**changes)


def to_dict(cfg: Config, applicable_only: bool = True) -> dict[str, Any]:
    """Nested plain dict (tuples as lists) for config.yaml: by default only the fields this job reads
    (a classify run records no tokenizer or arch it never used)."""
    def plain(v):
        if isinstance(v, tuple):
            return list(v)
        return v
    out: dict[str, Any] = {}
    for f in fields(cfg):
        v = getattr(cfg, f.name)
        if not dataclasses.is_dataclass(v):
            out[f.name] = plain(v)
            continue
        kept = {g.name: plain(getattr(v, g.name)) for g in fields(v)
                if not applicable_only or applies(g, cfg.task)}
        if kept:
            out[f.name] = kept
    return out


def load_yaml(path: str | Path, base: Config | None = None) -> Config:
    import yaml
    text = Path(path).read_text()
    try:
        raw = yaml.safe_load(text) or {}
    except yaml.YAMLError as e:     # one line: where and what (the YAML library's own traceback helps no one)
        mark = getattr(e, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        raise ConfigError([f"{path}: not valid YAML{at}: {getattr(e, 'problem', None) or e}"]) from None
    if not isinstance(raw, dict):
        raise ConfigError([f"{path}: expected a mapping of options, got {type(raw).__name__}"])
    return from_dict(raw, base)


def save_yaml(cfg: Config, path: str | Path) -> None:
    import yaml
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))


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
