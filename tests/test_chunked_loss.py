"""The chunked cross-entropy (models/chunked_ce.py) is the plain loss, with less memory: the same loss
and gradients (hidden, weight, bias; fp32 and bf16 autocast; -100 ignored), through tied embeddings,
peft LoRA and gradient checkpointing; a real training step equal to the plain one; a lower measured
peak at a large vocabulary; the switch reaches the loop and the plan. Tiny real models, < 5 s each."""

import copy

import pytest
import torch
import torch.nn.functional as F

from memfit.models.chunked_ce import linear_cross_entropy
from memfit.models.heads import chunkable_head
from memfit.models.loss import causal_lm_loss, lm_loss, plain_causal_lm_loss


def _close(a, b, rel):
    """allclose scaled to the tensor's magnitude (bf16 rounds at 2^-8 of the largest entries)."""
    tol = rel * max(float(b.abs().max()), 1e-12)
    assert torch.allclose(a.float(), b.float(), rtol=0, atol=tol), float((a.float() - b.float()).abs().max())


@pytest.mark.parametrize("dtype", [None, torch.bfloat16])
def test_function_equals_plain_loss_and_gradients(dtype):
    """Many chunks (5 rows each, a ragged last one), a bias, ignored rows: loss and all three grads."""
    torch.manual_seed(0)
    N, H, V = 23, 16, 97
    h0, w0, b0 = torch.randn(N, H), torch.randn(V, H) * 0.3, torch.randn(V)
    y = torch.randint(0, V, (N,))
    y[[0, 7, 22]] = -100
    out = []
    for chunked in (False, True):
        h, w, b = (t.clone().requires_grad_(True) for t in (h0, w0, b0))
        with torch.autocast("cpu", dtype=dtype or torch.bfloat16, enabled=dtype is not None):
            if chunked:
                loss = linear_cross_entropy(h, w, b, y, chunk=5)
            else:
                loss = F.cross_entropy(F.linear(h, w, b).float(), y, reduction="sum", ignore_index=-100)
        (loss * 0.37).backward()   # a scale like the loop's 1/token count
        out.append((loss.detach(), h.grad, w.grad, b.grad))
    rel = 1e-5 if dtype is None else 1.6e-2
    assert out[1][0].dtype == torch.float32
    assert torch.allclose(out[1][0], out[0][0], rtol=1e-5 if dtype is None else 1e-3)
    for got, want in zip(out[1][1:], out[0][1:]):
        _close(got, want, rel)
    assert out[1][1][[0, 7, 22]].abs().max() == 0   # ignored rows get no gradient


def _tiny(arch, vocab=256, **over):
    from transformers import AutoModelForCausalLM

    from memfit.models import hf_config, make_shape
    cfg = hf_config(make_shape(arch, 2, 64, vocab, 32), **over)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(cfg)


def _batch(vocab=256, B=3, T=32):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, vocab, (B, T), generator=g)
    labels = ids.clone()
    labels[0, :9] = -100          # a prompt that is not trained on
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}


def _grads(model, batch, loss_fn, dtype=None):
    model.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=dtype or torch.bfloat16, enabled=dtype is not None):
        s, n = loss_fn(model, batch)
    (s.float() / n).backward()
    return float(s), int(n), {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}


def _same_as_plain(model, dtype=None, rel=1e-5):
    b = _batch(model.config.vocab_size)
    assert chunkable_head(model) is not None
    s0, n0, g0 = _grads(model, b, plain_causal_lm_loss, dtype)
    s1, n1, g1 = _grads(model, b, causal_lm_loss, dtype)
    assert n0 == n1 == 3 * 31 - 8
    assert s1 == pytest.approx(s0, rel=1e-5 if dtype is None else 1e-3)
    assert g0.keys() == g1.keys() and g0
    for k in g0:
        _close(g1[k], g0[k], rel)
    return g0


@pytest.mark.parametrize("dtype", [None, torch.bfloat16])
def test_tied_gpt2_gradients_equal_plain(dtype):
    model = _tiny("gpt2")
    assert model.lm_head.weight is model.transformer.wte.weight   # tied: one grad from both uses
    g = _same_as_plain(model, dtype, 1e-5 if dtype is None else 2e-2)
    assert "transformer.wte.weight" in g


def test_llama_with_gradient_checkpointing_equals_plain():
    model = _tiny("llama")
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    _same_as_plain(model)


@pytest.mark.parametrize("dtype", [None, torch.bfloat16])
def test_peft_lora_gradients_equal_plain(dtype):
    from peft import LoraConfig, get_peft_model
    model = get_peft_model(_tiny("llama"), LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0,
                                                      target_modules=["q_proj", "v_proj"]))
    # LoRA's B starts at zero (A's grad would be 0): make it non-zero so both grads are compared
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.02)
    g = _same_as_plain(model, dtype, 1e-5 if dtype is None else 2e-2)
    assert g and all("lora_" in k for k in g)


def test_training_step_equals_plain_step():
    """memfit's accumulate (2 micro-batches, token-count division) + clip + fused AdamW, both losses."""
    from memfit.models.optim import build_optimizer
    from memfit.precision import resolve_precision
    from memfit.train.step import accumulate
    from memfit.device import detect
    base = _tiny("llama")
    prec, _ = resolve_precision("fp32", detect())
    after = []
    for loss_fn in (plain_causal_lm_loss, causal_lm_loss):
        model = copy.deepcopy(base)
        opt = build_optimizer(model, "adamw", 1e-3, 0.0, (0.9, 0.95), "cpu")
        for _ in range(2):
            st = accumulate(model, _batch(B=4, T=16), 2, prec, prec.make_scaler(), loss_fn=loss_fn)
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
        after.append((float(st.loss_sum), int(st.tokens), [p.detach().clone() for p in model.parameters()]))
    assert after[1][1] == after[0][1]
    assert after[1][0] == pytest.approx(after[0][0], rel=1e-5)
    for a, b in zip(after[1][2], after[0][2]):
        # (fp32 grads agree to ~1e-7; Adam's g/sqrt(v) turns that into up to ~lr/100 on a near-zero grad)
        assert torch.allclose(a, b, atol=5e-5, rtol=0)


def test_eval_and_generation_unchanged_and_unchunkable_heads_fall_back():
    model = _tiny("gpt2").eval()
    b = _batch()
    with torch.no_grad():
        s0, _ = plain_causal_lm_loss(model, b)
        s1, _ = causal_lm_loss(model, b)
        assert float(s1) == pytest.approx(float(s0), rel=1e-5)
        assert model(input_ids=b["input_ids"]).logits.shape[-1] == 256   # the head is back
        gen = model.generate(b["input_ids"][:1, :4], max_new_tokens=3, do_sample=False)
    assert gen.shape == (1, 7)
    h = model.lm_head.register_forward_hook(lambda *a: None)
    assert chunkable_head(model) is None               # a hook would see hidden states: plain path
    h.remove()
    gemma2 = copy.deepcopy(model)
    gemma2.config.model_type = "gemma2"                  # soft-caps its logits after the head
    assert chunkable_head(gemma2) is None
    assert lm_loss(False) is plain_causal_lm_loss and lm_loss(True) is causal_lm_loss


def test_peak_live_bytes_lower_at_large_vocab():
    from memfit.memtrack import LiveTensorTracker
    model = _tiny("llama", vocab=32000)
    b = _batch(32000, B=4, T=128)
    peaks = {}
    for fn in (plain_causal_lm_loss, causal_lm_loss):
        model.zero_grad(set_to_none=True)
        with LiveTensorTracker() as tr:
            base = tr.current_bytes
            s, n = fn(model, b)
            (s / n).backward()
            del s, n
            peaks[fn.__name__] = tr.peak_bytes - base
    # plain: 512 x 32000 logits, an fp32 log-softmax and its grad (~3 x 65 MB); chunked: one chunk
    assert peaks["plain_causal_lm_loss"] > 190e6
    assert peaks["causal_lm_loss"] < 0.4 * peaks["plain_causal_lm_loss"]


def test_switch_reaches_the_plan():
    from memfit import config as C
    from memfit.plan import make_plan
    cfg = C.Config(task="pretrain")
    on = make_plan(cfg, engine="analytic")
    off = make_plan(C.from_dict({"train": {"chunked_loss": False}}, C.Config(task="pretrain")), engine="analytic")
    assert on.spec.chunked_loss and not off.spec.chunked_loss
    assert on.memory.peak_tensor_bytes < off.memory.peak_tensor_bytes
