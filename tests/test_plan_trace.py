"""The trace engine: exact against real tensors, the CUDA emulation's effect, the stand-ins' state
sizes, layer extrapolation, and the analytic engine agreeing with it. Tiny models (2 layers, 64 wide)."""

import copy

import pytest
import torch

from memfit.plan import trace as T
from memfit.plan.analytic import analytic_memory
from memfit.plan.spec import LoraSpec, StepSpec


def _cfg(arch="gpt2", L=2, d=64, V=512, seq=64):
    from memfit.models import hf_config, make_shape
    return hf_config(make_shape(arch, L, d, V, seq))


def _spec(arch="gpt2", model_config=None, **kw):
    base = dict(micro_batch=4, seq_len=64, precision="fp32", device_type="cpu")
    base.update(kw)
    return StepSpec(model_config or _cfg(arch), arch, "causal", **base)


@pytest.mark.parametrize("kw", [
    dict(arch="gpt2", precision="bf16", gradient_checkpointing=True),
    dict(arch="llama", precision="fp32", micro_steps=2),
    dict(arch="llama", precision="bf16", lora=LoraSpec(4, 8, 0.1, ("q_proj", "v_proj"))),
])
def test_fake_trace_equals_real_tensors(kw):
    """The same traced step on fake and on real tensors counts the same bytes, phase by phase."""
    spec = _spec(**kw)
    fake = T._trace_once(spec, spec.n_layers, count_flops=False)
    torch.manual_seed(0)
    real = T._trace_once(spec, spec.n_layers, count_flops=False, real=True)
    assert fake.phase_peaks == real.phase_peaks
    assert fake.grad_bytes == real.grad_bytes and fake.state_bytes == real.state_bytes


@pytest.mark.parametrize("chunked", [True, False])
def test_trace_matches_independent_measurement_with_peft(chunked):
    """Against a hand-written real training step with real peft LoRA, counted by LiveTensorTracker;
    the loss is the loop's (chunked, models/chunked_ce.py) or the plain one (--no-chunked-loss)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from memfit.memtrack import LiveTensorTracker
    from memfit.models.loss import lm_loss

    cfg = _cfg("llama")
    spec = _spec("llama", model_config=cfg, precision="bf16", lora=LoraSpec(4, 8, 0.05, ("q_proj", "v_proj")),
                 chunked_loss=chunked)
    predicted = T.trace_plan(spec, count_flops=False).peak_bytes
    torch.manual_seed(0)
    model = get_peft_model(AutoModelForCausalLM.from_config(copy.deepcopy(cfg)),
                           LoraConfig(r=4, lora_alpha=8, lora_dropout=0.05, target_modules=["q_proj", "v_proj"]))
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-3, fused=True)
    ids = torch.randint(0, 512, (4, 64))
    with LiveTensorTracker() as tr:
        base = tr.current_bytes
        tr.reset_peak()
        for _ in range(3):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss, _ = lm_loss(chunked)(model, {"input_ids": ids, "attention_mask": torch.ones_like(ids),
                                                   "labels": ids})
            (loss.float() / ids[:, 1:].numel()).backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
        measured = tr.peak_bytes - base + sum(p.untyped_storage().nbytes() for p in model.parameters())
    # `base` held the weights (counted by both) and ids; the peak above it is compared
    assert abs(predicted - measured) / measured < 0.01


def test_cuda_emulation_fp32_gelu_and_dropout_mask():
    """CUDA autocast runs gelu_new's pow in fp32 (+6 bytes per MLP element); CUDA dropout keeps a
    1-byte mask where CPU keeps one in the input's dtype."""
    spec = _spec("gpt2", precision="bf16")
    cpu = T.trace_plan(spec, count_flops=False)
    cuda = T.trace_plan(spec.replace(device_type="cuda"), count_flops=False)
    ff, tok = 256, spec.tokens
    assert cuda.layer_activation_bytes - cpu.layer_activation_bytes == 6 * ff * tok
    drop_cfg = _cfg("gpt2")
    drop_cfg.resid_pdrop = drop_cfg.embd_pdrop = 0.1
    dspec = _spec("gpt2", model_config=drop_cfg)
    dcpu = T.trace_plan(dspec, count_flops=False)
    dcuda = T.trace_plan(dspec.replace(device_type="cuda"), count_flops=False)
    assert dcuda.layer_activation_bytes < dcpu.layer_activation_bytes


def test_eight_bit_stand_in_state_equals_bitsandbytes():
    import bitsandbytes as bnb
    from transformers import AutoModelForCausalLM
    spec = _spec("gpt2", optimizer="adamw8bit")
    traced = T.trace_plan(spec, count_flops=False).state_bytes
    model = AutoModelForCausalLM.from_config(_cfg("gpt2"))
    opt = bnb.optim.AdamW8bit(model.parameters(), lr=1e-3)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    real = sum(v.untyped_storage().nbytes() for s in opt.state.values() for v in s.values() if torch.is_tensor(v))
    # bnb shares its two 256-entry quantisation maps across parameters; count them once
    real -= sum(v.untyped_storage().nbytes() for s in list(opt.state.values())[1:] for k, v in s.items()
                if k.startswith("qmap") and torch.is_tensor(v))
    assert traced == real


def test_layer_extrapolation_matches_full_trace(monkeypatch):
    spec = _spec("llama", model_config=_cfg("llama", L=6), precision="bf16")
    full = T._trace_once(spec, 6, count_flops=False)
    monkeypatch.setattr(T, "FULL_TRACE_MAX_LAYERS", 2)
    ext = T.trace_plan(spec, count_flops=False)
    assert ext.layers_traced == (2, 3)
    assert abs(ext.peak_bytes - full.peak_bytes) / full.peak_bytes < 0.005
    assert ext.total_params == full.total_params


def test_qlora_trace_on_cuda_target():
    lo = LoraSpec(4, 8, 0.05, ("q_proj", "v_proj"), qlora=True)
    spec = _spec("llama", precision="fp16", device_type="cuda", lora=lo, gradient_checkpointing=True)
    tr = T.trace_plan(spec)
    an = analytic_memory(spec)
    assert tr.trainable_params == an.trainable_params
    assert abs(tr.param_bytes - an.weights) / an.weights < 0.01
    assert tr.cuda_reserved_peak >= tr.cuda_allocated_peak >= tr.peak_bytes
    assert tr.flops_per_micro_step > 0


@pytest.mark.parametrize("kw", [
    dict(arch="gpt2", precision="bf16"),
    dict(arch="gpt2", precision="fp32", gradient_checkpointing=True),
    dict(arch="llama", precision="fp32", optimizer="adamw8bit"),
])
def test_analytic_engine_agrees_with_trace(kw):
    spec = _spec(**kw)
    tr = T.trace_plan(spec, count_flops=False)
    an = analytic_memory(spec)
    assert abs(an.peak_bytes - tr.peak_bytes) / tr.peak_bytes < 0.10
    assert abs(an.weights - tr.param_bytes) < 1024   # the trace also counts buffers (RoPE inv_freq)
    assert an.gradients == tr.grad_bytes
