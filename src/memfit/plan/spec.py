"""From a Config to the concrete things the planner evaluates: the target device, the model's
architecture (a transformers config), and one training configuration (StepSpec).

Nothing here allocates tensors. transformers is imported only to read or make a config.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from memfit.config import Config
from memfit.hardware import GPUProfile, cpu_profile, get_profile


class PlanInputError(ValueError):
    """The model or budget could not be resolved (bad path, unknown GPU...): exit 2."""


@dataclass(frozen=True)
class LoraSpec:
    r: int = 8
    alpha: int = 16
    dropout: float = 0.05
    targets: tuple[str, ...] = ()
    qlora: bool = False
    double_quant: bool = True       # QLoRA recipe default (bnb_4bit_use_double_quant=True)
    kbit_upcast: bool = True        # peft prepare_model_for_kbit_training: non-4-bit params -> fp32
    bnb_saves_input: bool = False   # bitsandbytes < 0.45: MatMul4Bit kept each layer's input for backward


@dataclass(frozen=True, eq=False)
class StepSpec:
    """One training configuration: what the trace runs and the formulas price."""
    model_config: Any                  # transformers PretrainedConfig (read-only here)
    arch: str                          # gpt2 | llama | bert (family the formulas know)
    kind: str                          # causal | classify
    micro_batch: int
    seq_len: int
    micro_steps: int = 1               # accumulation: micro-batches per optimizer step
    precision: str = "fp32"            # fp32 | bf16 | fp16 (autocast dtype; params stay fp32)
    device_type: str = "cpu"           # target device: cpu | cuda
    gradient_checkpointing: bool = False
    optimizer: str = "adamw"           # adamw | adamw8bit | paged_adamw8bit
    lora: LoraSpec | None = None
    padded: bool = False               # batches carry padding (fine-tuning): a 4-D mask is built
    num_labels: int = 2
    max_grad_norm: float = 1.0
    frozen_dtype: str = "fp32"         # dtype of frozen base weights (LoRA/QLoRA)
    flash_attention: bool = True       # CUDA target: flash (sm80+) or mem-efficient SDPA kernel
    zero_grad_to_none: bool = True     # memfit: zero_grad(set_to_none=True); False keeps grads allocated
    packed: bool = False               # fine-tuning with --packing: full rows of seq_len, position_ids restart
    chunked_loss: bool = True          # causal LMs: models/chunked_ce.py (no whole-batch logits)

    def replace(self, **kw) -> StepSpec:
        return dataclasses.replace(self, **kw)

    @property
    def n_layers(self) -> int:
        return int(self.model_config.num_hidden_layers)

    @property
    def tokens(self) -> int:
        return self.micro_batch * self.seq_len


# ---------------------------------------------------------------- target device

@dataclass(frozen=True)
class Target:
    profile: GPUProfile
    memory_bytes: int        # the budget the plan is checked against
    ram_bytes: int           # host RAM budget
    source: str              # how it was chosen, for the report


def resolve_target(cfg: Config) -> Target:
    b = cfg.budget
    ram = b.ram
    if ram is None:
        try:
            import psutil
            ram = int(psutil.virtual_memory().total)
        except Exception:
            ram = 16 * 2**30
    if b.gpu:
        try:
            prof = get_profile(b.gpu)
        except KeyError as e:
            raise PlanInputError(str(e.args[0])) from None
        if prof.device_type == "cpu":
            prof = cpu_profile(b.gpu_memory or ram)
            return Target(prof, prof.memory_bytes, ram, "--gpu cpu")
        mem = b.gpu_memory or prof.memory_bytes
        return Target(prof, mem, ram, f"--gpu {prof.name}" + (" with --gpu-memory" if b.gpu_memory else ""))
    if b.gpu_memory:
        # A bare memory budget: a generic recent GPU (bf16, flash attention) of that size.
        prof = dataclasses.replace(get_profile("a10g"), name="gpu", memory_bytes=b.gpu_memory,
                                   description=f"a GPU with {b.gpu_memory / 2**30:.1f} GiB")
        return Target(prof, b.gpu_memory, ram, "--gpu-memory")
    try:
        from memfit.device import detect
        from memfit.hardware import profile_for_device
        dev = detect()
        prof = profile_for_device(dev)
        if dev.type == "cpu":
            prof = cpu_profile(ram, dev.bf16_native)
        return Target(prof, prof.memory_bytes, ram, f"this machine ({dev.name})")
    except Exception:
        prof = cpu_profile(ram)
        return Target(prof, prof.memory_bytes, ram, "this machine (cpu)")


def resolve_precision(requested: str, prof: GPUProfile) -> str:
    """Same policy as memfit.precision: fp16 + scaler before Ampere, bf16 where native."""
    if requested != "auto":
        return requested
    if prof.device_type == "cuda":
        return "bf16" if prof.bf16_native else "fp16"
    return "bf16" if prof.bf16_native else "fp32"


# ---------------------------------------------------------------- the model

@dataclass(frozen=True, eq=False)
class ModelInfo:
    config: Any          # transformers config
    arch: str            # gpt2 | llama | bert
    kind: str            # causal | classify
    source: str          # human description
    num_labels: int = 2


def _arch_of(model_type: str) -> str:
    mt = model_type.lower()
    if mt in ("gpt2",):
        return "gpt2"
    if mt in ("bert", "roberta", "distilbert", "xlm-roberta", "electra"):
        return "bert"
    return "llama"  # llama, mistral, qwen2, smollm... share the Llama block layout


def _load_config(spec: str):
    from transformers import AutoConfig

    from memfit.models.load import OFFLINE_MODELS, _package_dir  # the one alias table: the run's
    if spec in OFFLINE_MODELS:
        pkg, leaf = OFFLINE_MODELS[spec]
        root = _package_dir(pkg)
        if root is None:
            raise PlanInputError(f"--model {spec}: offline package {pkg} is not installed")
        spec = str(root / leaf)
    p = Path(spec)
    try:
        if p.suffix == ".gguf" and p.exists():
            return AutoConfig.from_pretrained(str(p.parent), gguf_file=p.name)
        if p.is_file() and p.name.endswith(".json"):
            data = json.loads(p.read_text())
            mt = data.get("model_type")
            if not mt:
                raise PlanInputError(f"{p}: config.json has no model_type")
            from transformers import CONFIG_MAPPING
            return CONFIG_MAPPING[mt].from_dict(data)
        if p.is_dir():
            return AutoConfig.from_pretrained(str(p))
        if p.exists():
            raise PlanInputError(f"--model {spec}: expected a model folder, config.json or .gguf file")
        # A hub id: config only; works with a network or a warm cache.
        return AutoConfig.from_pretrained(spec)
    except PlanInputError:
        raise
    except Exception as e:  # noqa: BLE001 - any loader failure is a bad input for the plan
        raise PlanInputError(f"--model {spec}: could not read its config ({type(e).__name__}: "
                             f"{str(e).splitlines()[0][:200]})") from None


def vocab_size_for(cfg: Config) -> int:
    tok = cfg.data.tokenizer
    if tok == "bpe":
        return cfg.data.vocab_size
    if tok == "gpt2":
        return 50257
    p = Path(tok)
    for name in ("tokenizer.json",):
        if (p / name).exists():
            try:
                data = json.loads((p / name).read_text())
                vocab = data.get("model", {}).get("vocab", {})
                return len(vocab) + len(data.get("added_tokens", []))
            except Exception:
                pass
    return cfg.data.vocab_size


def resolve_model(cfg: Config) -> ModelInfo:
    """The architecture the job trains, as a transformers config (no weights)."""
    kind = "classify" if cfg.task == "classify" else "causal"
    num_labels = 5 if cfg.data.data == ("bbc",) else 2
    if cfg.model.model:
        hf = _load_config(cfg.model.model)
        arch = _arch_of(getattr(hf, "model_type", "llama"))
        if arch == "bert":   # encoders are planned as sequence classifiers whatever the task
            kind = "classify"
        hf._attn_implementation = cfg.model.attn_implementation
        return ModelInfo(hf, arch, kind, f"{cfg.model.model} ({hf.model_type}, config only)", num_labels)
    vocab = vocab_size_for(cfg)
    if kind == "classify":
        hf = _bert_config(cfg.model.target_params, vocab, cfg.data.seq_len)
        hf._attn_implementation = cfg.model.attn_implementation
        return ModelInfo(hf, "bert", kind, f"from scratch: bert, {hf.num_hidden_layers} layers, "
                         f"{hf.hidden_size} wide", num_labels)
    from memfit.models import describe, hf_config, size_model
    try:
        shape = size_model(cfg.model.target_params, cfg.model.arch, vocab, cfg.data.seq_len)
    except ValueError as e:
        raise PlanInputError(str(e)) from None
    hf = hf_config(shape, dropout=cfg.model.dropout, attn_implementation=cfg.model.attn_implementation)
    # Fine-tuning needs a --model; without one the plan prices a base of this shape (never "from scratch").
    how = "from scratch: " if cfg.task == "pretrain" else "no --model: a base of this shape, "
    return ModelInfo(hf, shape.arch, kind, how + describe(shape), num_labels)


def _bert_config(target: int, vocab: int, seq_len: int):
    """A BERT encoder near `target` params (classification from scratch): width 64k, 4d FFN."""
    from transformers import BertConfig
    best = None
    for d in range(64, 2049, 64):
        for L in range(1, 49):
            p = vocab * d + max(seq_len, 512) * d + 2 * d + 2 * d + L * (12 * d * d + 13 * d) + d * d + d
            if best is None or abs(p - target) < abs(best[0] - target):
                best = (p, d, L)
    _, d, L = best
    heads = max(1, d // 64)
    cfg = BertConfig(vocab_size=vocab, hidden_size=d, num_hidden_layers=L, num_attention_heads=heads,
                     intermediate_size=4 * d, max_position_embeddings=max(seq_len, 512))
    cfg._attn_implementation = "sdpa"
    return cfg


def model_dropout(info_or_config: Any) -> float:
    """The model's dropout probability (GPT-2, BERT and Llama field names); 0 when off."""
    c = getattr(info_or_config, "config", info_or_config)
    for name in ("resid_pdrop", "hidden_dropout_prob", "attention_dropout"):
        v = getattr(c, name, None)
        if v:
            return float(v)
    return 0.0


# ---------------------------------------------------------------- a StepSpec from a Config

@dataclass(frozen=True)
class Knobs:
    """The knobs auto-fit chooses; everything else comes from the config."""
    micro_batch: int
    accumulation: int
    precision: str
    gradient_checkpointing: bool
    optimizer: str


def world_size() -> int:
    """The processes of the torchrun job this plan is for (1 outside torchrun): every rank trains its
    share of the global batch on its own device, so the knobs below are per device."""
    from memfit.dist.env import current
    return current().world_size


def effective_batch(cfg: Config) -> int:
    """The global effective batch, as the jobs read it (dist.env.global_batch)."""
    return cfg.effective_batch(world_size())


def knobs_from_config(cfg: Config, prof: GPUProfile) -> Knobs:
    rows = -(-effective_batch(cfg) // world_size())      # this device's rows of each step
    mb = min(cfg.train.batch_size, rows)
    acc = -(-rows // mb)
    return Knobs(mb, acc, resolve_precision(cfg.train.precision, prof), cfg.train.gradient_checkpointing,
                 cfg.optim.optimizer)


def step_spec(cfg: Config, info: ModelInfo, target: Target, knobs: Knobs) -> StepSpec:
    lo = cfg.lora
    lora = None
    if lo.lora or lo.qlora:
        lora = LoraSpec(lo.lora_r, lo.lora_alpha, lo.lora_dropout, lora_targets(cfg, info), lo.qlora)
    prof = target.profile
    # memfit.models.load loads the base in fp32 (autocast does the low-precision math); QLoRA's
    # non-4-bit parameters stay fp32 too. The trace and formulas also support a half-precision base.
    frozen = "fp32"
    packed = planned_packing(cfg, info)
    seq = finetune_seq_len(cfg, info.config, packed) if cfg.task != "pretrain" else cfg.data.seq_len
    return StepSpec(
        model_config=info.config, arch=info.arch, kind=info.kind, micro_batch=knobs.micro_batch,
        seq_len=int(seq), micro_steps=knobs.accumulation, precision=knobs.precision,
        device_type=prof.device_type, gradient_checkpointing=knobs.gradient_checkpointing,
        optimizer=knobs.optimizer, lora=lora, padded=cfg.task in ("finetune", "classify"),
        num_labels=info.num_labels, max_grad_norm=cfg.optim.max_grad_norm, frozen_dtype=frozen,
        flash_attention=prof.flash_attention, packed=packed, chunked_loss=cfg.train.chunked_loss)


def planned_packing(cfg: Config, info: ModelInfo) -> bool:
    """Does this fine-tuning run pack? The run's own rule (data.packing.packing_choice), so the plan
    prices the rows the run trains on."""
    if info.kind != "causal":
        return False
    from memfit.data.packing import packing_choice
    return packing_choice(cfg, info.config)[0]


def finetune_seq_len(cfg: Config, model_config: Any, packed: bool) -> int:
    """The row length the plan prices: a packed run's rows are the run's row length (data.examples.
    row_length, full rows); padded rows at most --max-seq-len (or --seq-len when it is not given)."""
    if packed:
        from memfit.data.examples import row_length
        return row_length(cfg, model_config)
    return cfg.data.max_seq_len or cfg.data.seq_len


def lora_targets(cfg: Config, info: ModelInfo) -> tuple[str, ...]:
    """What the run wraps (memfit.models.lora.lora_targets: the one table, the one rule)."""
    from memfit.models.lora import lora_targets as run_targets
    chosen = run_targets(cfg.lora.lora_target_modules, getattr(info.config, "model_type", info.arch))
    return (chosen,) if isinstance(chosen, str) else tuple(chosen)


def cpu_count() -> int:
    return os.cpu_count() or 1


__all__ = [
    "Knobs",
    "LoraSpec",
    "ModelInfo",
    "PlanInputError",
    "StepSpec",
    "Target",
    "knobs_from_config",
    "world_size",
    "resolve_model",
    "resolve_precision",
    "resolve_target",
    "step_spec",
]
