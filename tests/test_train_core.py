"""The loop's numerics (issue 2): token-normalised accumulation, precision, checkpointing, 8-bit."""

import math

import pytest
import torch

from memfit.device import DeviceInfo
from memfit.memtrack import LiveTensorTracker
from memfit.models.loss import causal_lm_loss
from memfit.models.optim import build_optimizer, optimizer_state_bytes
from memfit.precision import Precision, resolve_precision
from memfit.train.step import accumulate

CPU = DeviceInfo("cpu", "cpu", 1 << 34, True)


def _batch(rows=4, T=16, vocab=256, pad_lengths=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (rows, T), generator=g)
    labels = ids.clone()
    mask = torch.ones_like(ids)
    for r, n in enumerate(pad_lengths or []):
        labels[r, n:] = -100
        mask[r, n:] = 0
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def _grads(model):
    return [p.grad.detach().clone() for p in model.parameters()]


def test_unequal_micro_batches_give_the_gradient_of_one_batch(tiny_gpt2):
    # Rows hold 16, 3, 9 and 12 tokens: per-micro-batch means would weight row 2 five times more.
    batch = _batch(pad_lengths=[16, 4, 10, 13])
    fp32 = Precision("fp32", "cpu", "test")
    scaler = fp32.make_scaler()
    accumulate(tiny_gpt2, batch, 4, fp32, scaler)
    whole = _grads(tiny_gpt2)
    tiny_gpt2.zero_grad(set_to_none=True)
    stats = accumulate(tiny_gpt2, batch, 1, fp32, scaler)
    split = _grads(tiny_gpt2)
    assert stats.micro_steps == 4 and stats.tokens == 15 + 3 + 9 + 12
    for a, b in zip(whole, split):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)

    # The mean-of-means a naive loop computes is measurably different here.
    tiny_gpt2.zero_grad(set_to_none=True)
    for r in range(4):
        mb = {k: v[r:r + 1] for k, v in batch.items()}
        s, n = causal_lm_loss(tiny_gpt2, mb)
        (s / n / 4).backward()
    naive = _grads(tiny_gpt2)
    assert max((a - b).abs().max().item() for a, b in zip(whole, naive)) > 1e-4


def test_user_loss_without_known_count_is_normalised_after_the_fact(tiny_gpt2):
    batch = _batch(pad_lengths=[16, 4, 10, 13])
    fp32 = Precision("fp32", "cpu", "test")

    def user_loss(model, mb):  # same math, but the loop cannot know the count up front
        return causal_lm_loss(model, mb)

    accumulate(tiny_gpt2, batch, 4, fp32, fp32.make_scaler())
    whole = _grads(tiny_gpt2)
    tiny_gpt2.zero_grad(set_to_none=True)
    accumulate(tiny_gpt2, batch, 1, fp32, fp32.make_scaler(), loss_fn=user_loss)
    for a, b in zip(whole, _grads(tiny_gpt2)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_first_loss_is_ln_vocab(tiny_gpt2):
    torch.manual_seed(1)
    loss_sum, n = causal_lm_loss(tiny_gpt2, _batch(rows=8, T=64))
    assert abs(loss_sum.item() / n.item() - math.log(256)) < 0.1


def _step(model, precision, batch):
    opt = build_optimizer(model, "adamw", 1e-3, 0.0, (0.9, 0.95), "cpu")
    scaler = precision.make_scaler()
    stats = accumulate(model, batch, 2, precision, scaler)
    scaler.unscale_(opt)
    scaler.step(opt)
    scaler.update()
    return opt, scaler, stats


@pytest.mark.parametrize("name", ["fp32", "bf16", "fp16"])
def test_each_precision_trains_a_step_with_fp32_master_weights(tiny_gpt2, name):
    before = [p.detach().clone() for p in tiny_gpt2.parameters()]
    _, _, stats = _step(tiny_gpt2, Precision(name, "cpu", "test"), _batch(rows=4, T=32))
    assert math.isfinite(stats.loss)
    assert all(p.dtype == torch.float32 for p in tiny_gpt2.parameters())
    changed = sum(not torch.equal(a, b) for a, b in zip(before, tiny_gpt2.parameters()))
    assert changed == len(before)


def test_fp16_inf_gradient_skips_the_step_and_halves_the_scale(tiny_gpt2):
    fp16 = Precision("fp16", "cpu", "test")
    opt = build_optimizer(tiny_gpt2, "adamw", 1e-3, 0.0, (0.9, 0.95), "cpu")
    scaler = fp16.make_scaler()
    accumulate(tiny_gpt2, _batch(rows=2, T=16), 2, fp16, scaler)
    first = next(tiny_gpt2.parameters())
    first.grad[0, 0] = float("inf")  # what an fp16 overflow in backward leaves behind
    before = [p.detach().clone() for p in tiny_gpt2.parameters()]
    scale = scaler.get_scale()
    scaler.unscale_(opt)
    scaler.step(opt)
    scaler.update()
    assert scaler.get_scale() == scale / 2
    assert all(torch.equal(a, b) for a, b in zip(before, tiny_gpt2.parameters()))
    assert all(p.dtype == torch.float32 for p in tiny_gpt2.parameters())
    # fused AdamW creates its state lazily but, given found_inf, leaves the step count at 0
    assert all(float(s.get("step", 0)) == 0 for s in opt.state.values())


def test_precision_policy_auto_choices():
    t4 = DeviceInfo("cuda", "Tesla T4", 16 << 30, False, (7, 5))
    a100 = DeviceInfo("cuda", "A100", 40 << 30, True, (8, 0))
    old_cpu = DeviceInfo("cpu", "cpu", 1 << 34, False)
    assert resolve_precision("auto", t4)[0].name == "fp16"
    assert resolve_precision("auto", a100)[0].name == "bf16"
    assert resolve_precision("auto", CPU)[0].name == "bf16"
    assert resolve_precision("auto", old_cpu)[0].name == "fp32"
    p, warnings = resolve_precision("bf16", t4)
    assert p.name == "bf16" and "emulated" in warnings[0] and "fp16" in warnings[0]


def test_gradient_checkpointing_same_gradients_and_30pct_less_peak_memory():
    from memfit.jobs.common import enable_gradient_checkpointing
    from memfit.models import build_causal_lm, make_shape
    fp32 = Precision("fp32", "cpu", "test")
    batch = _batch(rows=4, T=256, vocab=512, seed=3)
    results = []
    for ckpt in (False, True):
        torch.manual_seed(0)
        model = build_causal_lm(make_shape("gpt2", 4, 128, 512, 256))
        if ckpt:
            enable_gradient_checkpointing(model)
        model.train()
        with LiveTensorTracker() as t:
            base = t.current_bytes
            accumulate(model, batch, 4, fp32, fp32.make_scaler())
            peak = t.peak_bytes - base
        results.append((peak, _grads(model)))
        del model
    (peak_plain, g_plain), (peak_ckpt, g_ckpt) = results
    for a, b in zip(g_plain, g_ckpt):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    assert peak_ckpt <= 0.7 * peak_plain, (peak_plain, peak_ckpt)


def test_8bit_adamw_state_is_about_two_bytes_per_param():
    pytest.importorskip("bitsandbytes")
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(256, 512, bias=False), torch.nn.Linear(512, 256, bias=False))
    opt = build_optimizer(model, "adamw8bit", 1e-3, 0.0, (0.9, 0.95), "cpu")
    model(torch.randn(8, 256)).pow(2).mean().backward()
    opt.step()
    n = sum(p.numel() for p in model.parameters())
    per_param = optimizer_state_bytes(opt) / n
    # two uint8 moments + one fp32 absmax per 256-element block: 2 + 2*4/256 = 2.03 bytes/param
    assert 2.0 <= per_param <= 2.1, per_param
    fp32_opt = build_optimizer(model, "adamw", 1e-3, 0.0, (0.9, 0.95), "cpu")
    model(torch.randn(8, 256)).pow(2).mean().backward()
    fp32_opt.step()
    assert optimizer_state_bytes(fp32_opt) / n >= 8.0
