"""What a trace trains: the job's model (LoRA/QLoRA applied with the stand-ins, frozen parts frozen,
checkpointing on), its optimizer, its loss (memfit.models.loss, the loop's own) and a synthetic batch
of the planned shape. torch and transformers are imported when a trace runs.
"""

from __future__ import annotations

import copy

from memfit.plan.spec import StepSpec

_DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def dtype_of(name):
    import torch
    return getattr(torch, _DTYPES[name])


def _with_layers(config, n_layers: int):
    c = copy.deepcopy(config)
    c.num_hidden_layers = n_layers
    if hasattr(c, "use_cache"):
        c.use_cache = False
    if getattr(c, "_attn_implementation", None) != "eager":   # eager only when asked for explicitly
        c._attn_implementation = "sdpa"
    return c


def blocks(model, n_layers: int):
    from torch import nn
    best = None
    for _, m in model.named_modules():
        if isinstance(m, nn.ModuleList) and len(m) == n_layers:
            best = m
            break
    return list(best) if best is not None else []


def _linear_dims(m):
    """(in_features, out_features, has_bias) of nn.Linear or transformers' Conv1D, else None."""
    from torch import nn
    if isinstance(m, nn.Linear):
        return m.in_features, m.out_features, m.bias is not None
    if type(m).__name__ == "Conv1D":
        return m.weight.shape[0], m.weight.shape[1], m.bias is not None
    return None


def build_model(spec: StepSpec, n_layers: int):
    """The model the job trains, with fake (or real) tensors: LoRA/QLoRA applied, frozen parts
    frozen, checkpointing on. Real tensors here would be real weights: callers use fake mode."""
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    from memfit.plan.standins import FourBitLinear, LoraLinear
    config = _with_layers(spec.model_config, n_layers)
    lo = spec.lora
    if spec.kind == "classify":
        config.num_labels = spec.num_labels
        if getattr(config, "pad_token_id", None) is None:
            config.pad_token_id = 0
        cls = AutoModelForSequenceClassification
    else:
        cls = AutoModelForCausalLM
    build_dtype = "fp32"
    if lo is not None and not (lo.qlora and lo.kbit_upcast):
        build_dtype = spec.frozen_dtype
    prev = torch.get_default_dtype()
    torch.set_default_dtype(dtype_of(build_dtype))
    try:
        model = cls.from_config(config, dtype=dtype_of(build_dtype))
    finally:
        torch.set_default_dtype(prev)
    model.train()

    if lo is not None:
        for p in model.parameters():
            p.requires_grad_(False)
        compute = dtype_of(spec.precision if spec.precision != "fp32" else spec.frozen_dtype)
        head_names = {"lm_head", "classifier", "score", "pooler"}
        targets = set(lo.targets)
        all_linear = "all-linear" in targets
        for parent_name, parent in list(model.named_modules()):
            for child_name, child in list(parent.named_children()):
                dims = _linear_dims(child)
                if dims is None or child_name in head_names:
                    continue
                full = f"{parent_name}.{child_name}" if parent_name else child_name
                if "classifier" in full or "lm_head" in full:
                    continue
                in_f, out_f, bias = dims
                base = child
                if lo.qlora:
                    bias_dtype = child.bias.dtype if bias else torch.float32
                    base = FourBitLinear(in_f, out_f, bias, compute, bias_dtype, lo.double_quant, lo.bnb_saves_input)
                if all_linear or child_name in targets:
                    wrapped = LoraLinear(base, in_f, out_f, lo.r, lo.alpha, lo.dropout, lo.qlora,
                                         spec.device_type == "cuda" and spec.precision != "fp32")
                    setattr(parent, child_name, wrapped)
                elif base is not child:
                    setattr(parent, child_name, base)
        # peft SEQ_CLS trains the classification head too (modules_to_save)
        for name, p in model.named_parameters():
            if "lora_" in name or (spec.kind == "classify" and ("classifier" in name or "score" in name)):
                p.requires_grad_(True)
    if spec.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model


def make_optimizer(model, spec: StepSpec):
    """The loop's optimizer (memfit.models.optim.build_optimizer) or the 8-bit stand-in."""
    if spec.optimizer == "adamw":
        from memfit.models.optim import build_optimizer
        return build_optimizer(model, "adamw", 1e-3, 0.0, (0.9, 0.95), spec.device_type)
    from memfit.plan.standins import Adam8bitStandIn
    params = [p for p in model.parameters() if p.requires_grad]
    return Adam8bitStandIn(params, paged=spec.optimizer == "paged_adamw8bit" and spec.device_type == "cuda")


def loss_fn_for(spec: StepSpec):
    """The loop's loss for the job (memfit.models.loss): the trace runs the same math as the run."""
    from memfit.models.loss import classification_loss, lm_loss
    return lm_loss(spec.chunked_loss) if spec.kind == "causal" else classification_loss()


def synthetic_batch(spec: StepSpec, vocab_size: int, device="cpu"):
    """A micro-batch of the planned shape. Packed pretraining batches have no padding, so the
    model gets no mask (a real all-ones mask is detected and dropped by transformers; a fake one
    cannot be inspected and would build a 4-D mask the real run never has)."""
    import torch
    B, T = spec.micro_batch, spec.seq_len
    ids = torch.randint(0, vocab_size, (B, T), device=device)
    batch = {"input_ids": ids}
    if spec.padded:
        batch["attention_mask"] = torch.ones((B, T), dtype=torch.long, device=device)
    batch["labels"] = torch.randint(0, spec.num_labels, (B,), device=device) if spec.kind == "classify" \
        else ids.clone()
    return batch
