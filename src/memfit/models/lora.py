"""LoRA adapters (peft) and what a LoRA checkpoint holds.

Trainable parameters are kept fp32 whatever the base's dtype: under fp16 autocast + GradScaler the
optimizer then steps fp32 weights with unscaled fp32 gradients (training fp16 parameters is the T4
"Attempting to unscale FP16 gradients" error). A resumable checkpoint's "model" part is `AdapterState`:
the adapter tensors under peft's own key names plus a fingerprint of the frozen base — never the base
itself (for a 4-bit 7B base that is the difference between ~40 MB and ~4 GB per checkpoint). The keys are
peft's own, and `checkpoint_files()` renders the part as a stock peft adapter folder's two files.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch

# Attention projections of the common families; peft's own table (q,v only) and then "all-linear" are the
# fallbacks. All four attention projections cost little more than q,v and fine-tune measurably better.
DEFAULT_TARGETS = {
    **{k: ("q_proj", "k_proj", "v_proj", "o_proj") for k in (
        "llama", "mistral", "mixtral", "qwen2", "qwen2_moe", "qwen3", "gemma", "gemma2", "gemma3_text",
        "olmo", "olmo2", "granite", "smollm3", "phi", "starcoder2", "stablelm", "opt", "cohere")},
    "phi3": ("qkv_proj", "o_proj"), "gpt2": ("c_attn", "c_proj"), "gpt_neox": ("query_key_value", "dense"),
    "falcon": ("query_key_value", "dense"), "bloom": ("query_key_value", "dense"),
    "gptj": ("q_proj", "k_proj", "v_proj", "out_proj"), "bert": ("query", "key", "value"),
    "roberta": ("query", "key", "value"), "distilbert": ("q_lin", "k_lin", "v_lin"),
}
FINGERPRINT_KEY = "memfit_base_fingerprint"


def lora_targets(given, model_type: str | None) -> tuple[str, ...] | str:
    """The modules LoRA wraps: --lora-target-modules when given, else DEFAULT_TARGETS, else peft's table,
    else "all-linear". The one rule: the run (apply_lora) and the plan (plan/spec.py) both call it, so
    the plan prices the adapters the run trains."""
    if given:
        return tuple(given)
    if model_type in DEFAULT_TARGETS:
        return DEFAULT_TARGETS[model_type]
    from peft.utils import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as PEFT_DEFAULTS
    found = PEFT_DEFAULTS.get(model_type) or ()
    return found if isinstance(found, str) else (tuple(found) or "all-linear")   # a str is a regex


def apply_lora(model: torch.nn.Module, r: int, alpha: int, dropout: float, targets: tuple[str, ...] = (),
               qlora: bool = False, gradient_checkpointing: bool = False, task_type: str = "CAUSAL_LM"):
    """Wrap `model` in a peft LoRA model; returns it with only the adapter trainable, in fp32."""
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    if qlora:
        # Casts norms/embeddings to fp32 for stability and, with checkpointing, makes the embedding output
        # require grad so the frozen 4-bit blocks still pass gradients to the adapters.
        model = prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=gradient_checkpointing,
            gradient_checkpointing_kwargs={"use_reentrant": False})
    chosen = lora_targets(targets, getattr(getattr(model, "config", None), "model_type", None))
    # GPT-2's linears are transformers' Conv1D (weights stored transposed): said up front, peft does not
    # warn "fan_in_fan_out is set to False ..." on every GPT-2 fine-tune (it would set it True itself).
    from transformers.pytorch_utils import Conv1D
    conv1d = any(isinstance(m, Conv1D) for m in model.modules())
    cfg = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, bias="none", task_type=task_type,
                     target_modules=chosen if isinstance(chosen, str) else list(chosen), fan_in_fan_out=conv1d)
    peft_model = get_peft_model(model, cfg)
    keep_trainable_fp32(peft_model)
    return peft_model


def keep_trainable_fp32(model: torch.nn.Module) -> None:
    for p in model.parameters():
        if p.requires_grad and p.dtype != torch.float32:
            p.data = p.data.float()


def trainable_summary(model: torch.nn.Module) -> str:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    peft_cfg = next(iter(getattr(model, "peft_config", {}).values()), None)
    targets = sorted(getattr(peft_cfg, "target_modules", None) or [])
    where = f" on {', '.join(targets)}" if targets else ""
    return f"{trainable:,} trainable parameters of {total:,} ({100 * trainable / max(total, 1):.2f}%){where}"


class AdapterState:
    """The registry's "model" part for a LoRA run: adapter tensors + the base's fingerprint.

    load_state_dict copies in place (the optimizer keeps pointing at the same Parameters) and refuses a
    checkpoint trained on a different base model."""

    def __init__(self, peft_model, base_fingerprint: str, base_spec: str | None = None) -> None:
        self.model, self.fingerprint, self.base_spec = peft_model, base_fingerprint, base_spec

    def state_dict(self) -> dict[str, Any]:
        from peft import get_peft_model_state_dict
        state: dict[str, Any] = dict(get_peft_model_state_dict(self.model))
        state[FINGERPRINT_KEY] = self.fingerprint
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        from peft import get_peft_model_state_dict, set_peft_model_state_dict
        got = state.get(FINGERPRINT_KEY)
        if got != self.fingerprint:
            raise ValueError(f"this LoRA checkpoint was trained on a different base model (fingerprint "
                             f"{str(got)[:12]}, this base {self.fingerprint[:12]}): resume with the same "
                             "--model")
        tensors = {k: v for k, v in state.items() if k != FINGERPRINT_KEY}
        expected = set(get_peft_model_state_dict(self.model))
        if set(tensors) != expected:
            missing, extra = sorted(expected - set(tensors)), sorted(set(tensors) - expected)
            raise ValueError(f"adapter checkpoint does not match this LoRA configuration (missing "
                             f"{missing[:3]}, unexpected {extra[:3]}): same --lora-r/--lora-target-modules?")
        with torch.no_grad():
            set_peft_model_state_dict(self.model, tensors)

    def checkpoint_files(self) -> dict[str, bytes]:
        """adapter_config.json + adapter_model.safetensors, for a checkpointer that writes a part's extra
        files into each checkpoint and best/: every one of them is then a stock peft adapter folder."""
        from peft import get_peft_model_state_dict
        from safetensors.torch import save
        cfg = next(iter(self.model.peft_config.values())).to_dict()
        cfg = {k: sorted(v) if isinstance(v, set) else v for k, v in cfg.items()}
        if self.base_spec:
            cfg["base_model_name_or_path"] = self.base_spec
        weights = {k: v.detach().contiguous() for k, v in get_peft_model_state_dict(self.model).items()}
        return {"adapter_config.json": json.dumps(cfg, indent=2, sort_keys=True, default=str).encode(),
                "adapter_model.safetensors": save(weights, metadata={"format": "pt"})}


def save_adapter(peft_model, out_dir: Path, base_spec: str, tokenizer=None,
                 extra: dict | None = None) -> Path:
    """A stock peft adapter folder (adapter_config.json + adapter_model.safetensors), written beside and
    renamed into place; `base_model_name_or_path` is `base_spec` (memfit passes load.adapter_base: a folder
    stock from_pretrained loads, the GGUF cache folder for a .gguf base)."""
    out_dir = Path(out_dir)
    from memfit.runfiles import record_path
    record_path(out_dir)      # before its .tmp-<pid> exists (a no-op outside a run directory)
    tmp = out_dir.with_name(out_dir.name + f".tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    peft_model.save_pretrained(tmp, safe_serialization=True)
    cfg_path = tmp / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["base_model_name_or_path"] = base_spec
    cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True))
    if tokenizer is not None:
        tokenizer.save_pretrained(tmp)
    if extra:
        (tmp / "memfit_adapter.json").write_text(json.dumps(extra, indent=1))
    from memfit.atomic import swap_in
    return swap_in(tmp, out_dir)
