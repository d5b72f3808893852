"""Builder: transformers models from a ModelShape, exact parameter counts, dtype, forward shape."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch

from memfit.models.build import build_causal_lm, count_params, hf_config
from memfit.models.sizing import make_shape, size_model

M = 1_000_000
# Real weights up to 30M (fast to initialise); meta device above, which counts without allocating.
CASES = [(8192, t) for t in (1 * M, 3 * M, 10 * M, 30 * M, 124 * M, 350 * M, 1_000 * M)] + [
    (50257, t) for t in (10 * M, 30 * M, 124 * M, 1_000 * M)
]


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
@pytest.mark.parametrize(("vocab", "target"), CASES)
def test_built_model_has_the_sized_parameter_count(arch: str, vocab: int, target: int) -> None:
    shape = size_model(target, arch, vocab, seq_len=256)
    if target <= 30 * M:
        model = build_causal_lm(shape)
        assert next(model.parameters()).device.type == "cpu"
    else:
        with torch.device("meta"):
            model = build_causal_lm(shape)
    n = count_params(model)
    assert n == shape.params == sum(p.numel() for p in model.parameters())
    assert abs(n / target - 1) <= 0.10


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
@pytest.mark.parametrize("tie", [True, False])
def test_tying_is_honoured(arch: str, tie: bool) -> None:
    shape = make_shape(arch, 2, 64, 512, 32, tie_embeddings=tie)
    model = build_causal_lm(shape)
    same = model.get_output_embeddings().weight is model.get_input_embeddings().weight
    assert same == tie
    assert count_params(model) == shape.params


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_bf16_build_and_forward_logits_shape(arch: str) -> None:
    torch.manual_seed(0)
    shape = make_shape(arch, 2, 64, 512, 32)
    model = build_causal_lm(shape, dtype=torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert torch.get_default_dtype() == torch.float32  # the builder restores the global default
    ids = torch.randint(0, 512, (3, 16))
    logits = model(input_ids=ids).logits
    assert logits.shape == (3, 16, 512)
    assert torch.isfinite(logits.float()).all()


def test_config_fields() -> None:
    g = hf_config(make_shape("gpt2", 2, 64, 512, 32), dropout=0.1, eos_token_id=3, pad_token_id=0)
    assert (g.resid_pdrop, g.embd_pdrop, g.attn_pdrop) == (0.1, 0.1, 0.1)
    assert (g.n_positions, g.n_embd, g.n_layer, g.n_head, g.vocab_size) == (32, 64, 2, 2, 512)
    assert (g.bos_token_id, g.eos_token_id, g.pad_token_id) == (None, 3, 0)  # never GPT-2's 50256
    assert g._attn_implementation == "sdpa"
    llama_shape = size_model(1_000 * M, "llama", 8192, 512)
    ll = hf_config(llama_shape, dropout=0.2)
    assert ll.attention_dropout == 0.2 and ll.max_position_embeddings == 512
    assert ll.num_key_value_heads == llama_shape.n_kv_head < ll.num_attention_heads
    assert ll.intermediate_size == llama_shape.intermediate_size and ll._attn_implementation == "sdpa"


def test_dropout_reaches_the_model() -> None:
    model = build_causal_lm(make_shape("gpt2", 1, 64, 512, 32), dropout=0.25)
    rates = {m.p for m in model.modules() if isinstance(m, torch.nn.Dropout)}
    assert rates == {0.25}


def test_build_under_fake_tensor_mode_in_bf16() -> None:
    # The planner traces under FakeTensorMode, where model.to(bf16) fails; building in the dtype works.
    from torch._subclasses.fake_tensor import FakeTensorMode

    shape = make_shape("llama", 2, 64, 512, 32)
    with FakeTensorMode():
        model = build_causal_lm(shape, dtype=torch.bfloat16)
        assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
        assert count_params(model) == shape.params


def test_count_params_trainable_only() -> None:
    model = build_causal_lm(make_shape("gpt2", 1, 64, 512, 32))
    model.get_input_embeddings().weight.requires_grad_(False)
    assert count_params(model, trainable_only=True) == count_params(model) - 512 * 64
