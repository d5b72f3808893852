"""QLoRA: a tiny Llama (built from config, SmolLM2's tokenizer) loads in 4-bit nf4 with double quantization,
its LoRA parameters are fp32, and `memfit finetune --qlora` trains under fp16 + GradScaler (the T4 set-up)."""

import json

import pytest
import torch
from safetensors.torch import load_file

from memfit import config as C


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from transformers import LlamaConfig, LlamaForCausalLM

    from memfit.models.load import load_tokenizer, resolve_source
    tmp = tmp_path_factory.mktemp("qlora")
    tok = load_tokenizer(resolve_source("smollm2"))
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      tie_word_embeddings=True, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                      pad_token_id=tok.pad_token_id)
    LlamaForCausalLM(cfg).save_pretrained(tmp / "tiny")
    tok.save_pretrained(tmp / "tiny")
    data = tmp / "t.jsonl"
    rows = [{"prompt": f"Q{i}:", "completion": f" A{i}"} for i in range(12)]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return tmp


def test_4bit_load_and_fp32_adapters(tiny):
    import bitsandbytes as bnb

    from memfit.models.load import load_causal_lm, resolve_source
    from memfit.models.lora import apply_lora
    model = load_causal_lm(resolve_source(str(tiny / "tiny")), qlora=True, compute_dtype=torch.float16)
    q = model.model.layers[0].self_attn.q_proj
    assert isinstance(q, bnb.nn.Linear4bit) and q.weight.quant_type == "nf4"
    assert q.weight.quant_state.nested                      # double quantization of the scales
    peft_model = apply_lora(model, 8, 16, 0.0, qlora=True)
    trainable = {n: p for n, p in peft_model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n and p.dtype == torch.float32 for n, p in trainable.items())


def test_qlora_trains_under_fp16_gradscaler_with_8bit_adamw(tiny):
    from memfit.jobs.finetune import run_causal_lm
    cfg = C.Config(task="finetune").replace(
        model={"model": str(tiny / "tiny")}, data={"data": (str(tiny / "t.jsonl"),), "val_fraction": 0.25,
                                                   "max_seq_len": 32},
        lora={"qlora": True},
        train={"batch_size": 4, "max_steps": 2, "eval_every": 0, "sample_tokens": 4, "precision": "fp16",
               "gradient_checkpointing": True},
        optim={"lr": 1e-2, "warmup_steps": 0, "optimizer": "adamw8bit"},
        run={"output_dir": str(tiny / "run"), "quiet": True})
    result = run_causal_lm(cfg)
    assert result.status == "finished" and result.step == 2
    assert result.metrics["val_loss_after"] < result.metrics["val_loss_before"]
    adapter = load_file(tiny / "run" / "final_model" / "adapter_model.safetensors")
    assert all(v.dtype == torch.float32 for v in adapter.values())
    # lora_B starts at zero: non-zero means the step updated it
    assert any(".lora_B." in k and v.abs().sum() > 0 for k, v in adapter.items())
    ck = tiny / "run" / "checkpoints" / "step-2" / "model.safetensors"
    assert ck.stat().st_size < 200_000                      # adapters + fingerprint, not the 4-bit base

    # A QLoRA adapter merges into the full-precision base; the result loads with stock transformers.
    from transformers import AutoModelForCausalLM

    from memfit.jobs.merge import merge_adapter
    out = merge_adapter(str(tiny / "tiny"), tiny / "run" / "final_model", tiny / "merged", dtype="bf16")
    assert AutoModelForCausalLM.from_pretrained(out).dtype == torch.bfloat16


def test_adapter_state_checks_the_base_and_renders_a_peft_folder(tmp_path):
    from peft import PeftModel
    from transformers import LlamaConfig, LlamaForCausalLM

    from memfit.models.lora import AdapterState, apply_lora
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1)
    torch.manual_seed(0)
    peft_model = apply_lora(LlamaForCausalLM(cfg), 4, 8, 0.0)
    with torch.no_grad():
        for n, p in peft_model.named_parameters():
            if "lora_B" in n:
                p.normal_()
    state = AdapterState(peft_model, "a" * 64).state_dict()
    assert state["memfit_base_fingerprint"] == "a" * 64
    with pytest.raises(ValueError, match="different base model"):
        AdapterState(peft_model, "b" * 64).load_state_dict(state)
    AdapterState(peft_model, "a" * 64).load_state_dict(state)

    for name, data in AdapterState(peft_model, "a" * 64, "base-dir").checkpoint_files().items():
        (tmp_path / name).write_bytes(data)
    torch.manual_seed(0)
    loaded = PeftModel.from_pretrained(LlamaForCausalLM(cfg), str(tmp_path))   # stock peft
    ids = torch.randint(0, 64, (1, 8))
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids).logits, peft_model(input_ids=ids).logits)


def test_full_finetune_exports_a_stock_model(tiny):
    from transformers import AutoModelForCausalLM

    from memfit.jobs.finetune import run_causal_lm
    cfg = C.Config(task="finetune").replace(
        model={"model": str(tiny / "tiny")},
        data={"data": (str(tiny / "t.jsonl"),), "val_fraction": 0.25, "max_seq_len": 32},
        train={"batch_size": 4, "max_steps": 2, "eval_every": 0, "sample_tokens": 0, "precision": "fp32"},
        optim={"lr": 1e-3, "warmup_steps": 0}, run={"output_dir": str(tiny / "full"), "quiet": True})
    result = run_causal_lm(cfg)
    assert result.status == "finished"
    model = AutoModelForCausalLM.from_pretrained(tiny / "full" / "final_model")
    before = AutoModelForCausalLM.from_pretrained(tiny / "tiny")
    layer, old = model.model.layers[0], before.model.layers[0]
    assert not torch.equal(layer.mlp.up_proj.weight, old.mlp.up_proj.weight)
