"""The plan prices the LoRA adapters the run trains: the modules the plan's model wraps are exactly the
modules the fine-tuning job's peft model wraps (same folder, same flags), for memfit's own table (llama,
gpt2), peft's table (gpt_bigcode, which memfit's table does not list) and --lora-target-modules."""

import pytest
import torch
from transformers import AutoModelForCausalLM, GPT2Config, GPTBigCodeConfig, LlamaConfig

from memfit.config import from_dict
from memfit.models.load import load_causal_lm, resolve_source
from memfit.models.lora import apply_lora
from memfit.plan.standins import LoraLinear
from memfit.plan.tracemodel import build_model
from memfit.plan.spec import knobs_from_config, resolve_model, resolve_target, step_spec

TINY = {
    "llama": lambda: LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64),
    "gpt2": lambda: GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=4, n_positions=64),
    "gpt_bigcode": lambda: GPTBigCodeConfig(vocab_size=64, n_embd=32, n_layer=2, n_head=4, n_positions=64),
}


def _folder(tmp_path, kind):
    folder = tmp_path / kind
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(TINY[kind]()).save_pretrained(folder)
    return folder


def _cfg(folder, targets=None):
    d = {"task": "finetune", "model": str(folder), "lora": True, "gpu": "cpu", "max_seq_len": 32,
         "batch_size": 2, "precision": "fp32", "data": ["shakespeare"]}
    if targets:
        d["lora_target_modules"] = targets
    return from_dict(d)


def _planned(cfg) -> set[str]:
    """The modules the plan's model (the trace's build_model, real tensors) wraps with its LoRA stand-in."""
    target = resolve_target(cfg)
    info = resolve_model(cfg)
    spec = step_spec(cfg, info, target, knobs_from_config(cfg, target.profile))
    model = build_model(spec, info.config.num_hidden_layers)
    return {name for name, m in model.named_modules() if isinstance(m, LoraLinear)}


def _run(cfg) -> set[str]:
    """The modules the fine-tuning job's peft model wraps (jobs/finetune.py: load_causal_lm, apply_lora)."""
    from peft.tuners.lora import LoraLayer
    lo = cfg.lora
    model = load_causal_lm(resolve_source(cfg.model.model), qlora=False, compute_dtype=torch.float32,
                           device=torch.device("cpu"))
    model = apply_lora(model, lo.lora_r, lo.lora_alpha, lo.lora_dropout, lo.lora_target_modules,
                       qlora=False, gradient_checkpointing=cfg.train.gradient_checkpointing)
    prefix = "base_model.model."
    return {name[len(prefix):] for name, m in model.named_modules() if isinstance(m, LoraLayer)}


@pytest.mark.parametrize("kind", ["llama", "gpt2", "gpt_bigcode"])
def test_plan_and_run_wrap_the_same_modules_by_default(tmp_path, kind):
    cfg = _cfg(_folder(tmp_path, kind))
    planned, run = _planned(cfg), _run(cfg)
    assert run, "the run wraps something"
    assert planned == run
    if kind == "llama":   # all four attention projections in every layer (not peft's q,v)
        assert {n.rsplit(".", 1)[1] for n in run} == {"q_proj", "k_proj", "v_proj", "o_proj"}
        assert len(run) == 4 * 2


def test_plan_and_run_wrap_the_same_given_modules(tmp_path):
    cfg = _cfg(_folder(tmp_path, "llama"), targets=["v_proj", "down_proj"])
    planned, run = _planned(cfg), _run(cfg)
    assert planned == run and {n.rsplit(".", 1)[1] for n in run} == {"v_proj", "down_proj"}
