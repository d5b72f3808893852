"""Build a from-scratch Hugging Face causal LM from a ``ModelShape`` (no download, ever).

The models are stock transformers classes (``GPT2LMHeadModel``, ``LlamaForCausalLM``) so an
exported ``final_model/`` loads with ``AutoModelForCausalLM.from_pretrained``. torch and
transformers are imported inside the functions: ``memfit --help`` must not pay for them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .sizing import ModelShape

if TYPE_CHECKING:
    import torch
    from transformers import PretrainedConfig, PreTrainedModel


def hf_config(shape: ModelShape, dropout: float = 0.0, bos_token_id: int | None = None,
              eos_token_id: int | None = None, pad_token_id: int | None = None,
              attn_implementation: str = "sdpa", **overrides: Any) -> PretrainedConfig:
    """The transformers config for ``shape`` (the planner uses it without building weights).

    Token ids default to None rather than the library defaults (GPT-2's 50256, Llama's 1/2), which
    would point outside a small trained vocabulary; the caller sets them from its tokenizer.
    ``attn_implementation``: transformers' attention kernel (memfit.models.attention; --attn-implementation).
    ``overrides`` go to the config constructor unchanged (e.g. ``use_cache=False``).
    """
    common: dict[str, Any] = {
        "vocab_size": shape.vocab_size,
        "tie_word_embeddings": shape.tie_embeddings,
        "bos_token_id": bos_token_id,
        "eos_token_id": eos_token_id,
        "pad_token_id": pad_token_id,
        # SDPA by default: the fused attention kernels (flash / memory-efficient on GPU); "eager" keeps
        # the [B, H, T, T] attention probabilities for backward (the planner prices them when asked for).
        "attn_implementation": attn_implementation,
    }
    if shape.arch == "gpt2":
        from transformers import GPT2Config

        cfg = GPT2Config(
            n_positions=shape.max_position,
            n_embd=shape.n_embd,
            n_layer=shape.n_layer,
            n_head=shape.n_head,
            n_inner=shape.intermediate_size,
            resid_pdrop=dropout,
            embd_pdrop=dropout,
            attn_pdrop=dropout,
            **common,
            **overrides,
        )
    elif shape.arch == "llama":
        from transformers import LlamaConfig

        cfg = LlamaConfig(
            hidden_size=shape.n_embd,
            intermediate_size=shape.intermediate_size,
            num_hidden_layers=shape.n_layer,
            num_attention_heads=shape.n_head,
            num_key_value_heads=shape.n_kv_head,
            head_dim=shape.head_dim,
            max_position_embeddings=shape.max_position,
            attention_dropout=dropout,
            **common,
            **overrides,
        )
    else:  # ModelShape validates arch; kept for type checkers and hand-made shapes
        raise ValueError(f"unknown arch {shape.arch!r}")
    # Some versions keep the constructor kwarg only as a private field; make sure the choice sticks.
    cfg._attn_implementation = attn_implementation
    return cfg


def build_causal_lm(shape: ModelShape, dtype: torch.dtype | None = None, dropout: float = 0.0,
                    bos_token_id: int | None = None, eos_token_id: int | None = None,
                    pad_token_id: int | None = None, attn_implementation: str = "sdpa",
                    **overrides: Any) -> PreTrainedModel:
    """A freshly initialised GPT-2 or Llama causal LM with ``shape``, parameters in ``dtype``.

    The weights are created directly in ``dtype`` (default float32) rather than cast afterwards:
    under ``FakeTensorMode`` (the planner) ``model.to(bfloat16)`` fails, and a cast would briefly
    hold two copies. Works under ``torch.device("meta")`` to count or plan without allocating.
    Uses the global torch RNG for initialisation, like any ``nn.Module``: seed before calling.
    """
    import torch
    from transformers import GPT2LMHeadModel, LlamaForCausalLM

    dtype = torch.float32 if dtype is None else dtype
    config = hf_config(shape, dropout=dropout, bos_token_id=bos_token_id, eos_token_id=eos_token_id,
                       pad_token_id=pad_token_id, attn_implementation=attn_implementation, **overrides)
    cls = GPT2LMHeadModel if shape.arch == "gpt2" else LlamaForCausalLM
    # _from_config is transformers' own "build from config" entry point (AutoModel.from_config
    # calls it); it creates the weights under the requested default dtype and records it on the
    # config. Set the default dtype ourselves too, so older transformers (torch_dtype=) behave alike.
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        model = cls._from_config(config, **_dtype_kwarg(dtype))
    finally:
        torch.set_default_dtype(previous)
    return model


def _dtype_kwarg(dtype: torch.dtype) -> dict[str, Any]:
    # transformers renamed torch_dtype= to dtype= in 4.56 and warns on the old name.
    import transformers

    major, minor = (int(x) for x in transformers.__version__.split(".")[:2])
    return {"dtype": dtype} if (major, minor) >= (4, 56) else {"torch_dtype": dtype}


def count_params(model: torch.nn.Module, trainable_only: bool = False) -> int:
    """Total parameters, tied weights counted once (``parameters()`` de-duplicates them)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)
