"""The planner's formulas on hand-computed cases (no model is built; runs in well under a second)."""

import math

import pytest

from memfit.hardware import GiB, get_profile
from memfit.plan import allocator as A
from memfit.plan.analytic import block_saved_per_token, eight_bit_state_bytes, optimizer_bytes, parameter_bytes
from memfit.plan.dims import Dims, dims_of, param_tensors
from memfit.plan.spec import LoraSpec, StepSpec


def _gpt2(L=2, d=64, V=256, P=64):
    from memfit.models import hf_config, make_shape
    return hf_config(make_shape("gpt2", L, d, V, P))


def _spec(cfg, arch="gpt2", **kw):
    base = dict(micro_batch=4, seq_len=64, precision="fp32", device_type="cpu")
    base.update(kw)
    return StepSpec(cfg, arch, "causal", **base)


def test_allocator_rounding_and_segments():
    assert A.round_size(1) == 512 and A.round_size(512) == 512 and A.round_size(513) == 1024
    assert A.segment_size(100) == 2 << 20            # small pool: 2 MiB segments
    assert A.segment_size(5 << 20) == 20 << 20       # 1-10 MiB: 20 MiB segments
    assert A.segment_size((10 << 20) + 1) == 12 << 20  # >= 10 MiB: rounded up to 2 MiB
    alloc, reserved = A.replay([(1, 100), (2, 5 << 20), (2, -(5 << 20)), (3, 4 << 20)])
    # 512 B block + 5 MiB block live at once; the 4 MiB request reuses the freed 20 MiB segment
    assert alloc == 512 + (5 << 20)
    assert reserved == (2 << 20) + (20 << 20)


def test_allocator_split_and_merge():
    a = A.CachingAllocator()
    a.malloc("x", 3 << 20)        # 20 MiB segment split: 3 MiB used, 17 MiB free block
    a.malloc("y", 3 << 20)        # taken from the free remainder
    assert a.reserved == 20 << 20 and a.allocated == 6 << 20
    a.free("x")
    a.free("y")                   # both merge back with the remainder into one 20 MiB block
    a.malloc("z", 19 << 20)       # fits only if the blocks merged
    assert a.reserved == 20 << 20
    # a remainder of <= 1 MiB in the large pool is not split off: the block is counted whole
    b = A.CachingAllocator()
    b.malloc("w", (12 << 20) - 100)   # segment rounded to 12 MiB; remainder ~0 stays inside
    assert b.allocated == 12 << 20


def test_eight_bit_state_by_hand():
    # < 4,096 elements: fp32 exp_avg + exp_avg_sq; else uint8 x2 + one fp32 absmax per 256 (x2)
    assert eight_bit_state_bytes([100]) == 800
    assert eight_bit_state_bytes([4096]) == 2 * 4096 + 8 * 16
    assert eight_bit_state_bytes([10 ** 6]) == 2 * 10 ** 6 + 8 * math.ceil(10 ** 6 / 256)


def test_parameter_count_matches_sizing():
    from memfit.models import make_shape
    for arch in ("gpt2", "llama"):
        shape = make_shape(arch, 3, 128, 1000, 64)
        from memfit.models import hf_config
        m = dims_of(hf_config(shape), arch)
        assert sum(n for _, n in param_tensors(m)) == shape.params


def test_parameter_bytes_full_lora_qlora():
    cfg = _gpt2()
    m = dims_of(cfg, "gpt2")
    N = sum(n for _, n in param_tensors(m))
    total, trainable, weights, copies, sizes = parameter_bytes(m, _spec(cfg))
    assert (total, trainable, weights, copies) == (N, N, 4 * N, 0)
    # bf16 autocast keeps a bf16 copy of every matmul weight (4 block linears + the tied LM head)
    _, _, _, copies, _ = parameter_bytes(m, _spec(cfg, precision="bf16"))
    d, V, ff = 64, 256, 256
    assert copies == 2 * (2 * (d * 3 * d + d * d + d * ff + ff * d) + V * d)
    # LoRA r=4 on c_attn: A (d x r) + B (r x 3d) per layer
    lo = LoraSpec(r=4, alpha=8, dropout=0.0, targets=("c_attn",))
    total, trainable, weights, _, _ = parameter_bytes(m, _spec(cfg, lora=lo))
    assert trainable == 2 * (d * 4 + 4 * 3 * d) and total == N + trainable
    assert weights == 4 * N + 4 * trainable
    # QLoRA: block linears in nf4 (1/2 byte + 1 uint8 absmax per 64 + 1 fp32 per 64*256), rest fp32
    lo4 = LoraSpec(r=4, alpha=8, dropout=0.0, targets=("c_attn",), qlora=True)
    _, _, weights, _, _ = parameter_bytes(m, _spec(cfg, lora=lo4))
    q = 2 * (d * 3 * d + d * d + d * ff + ff * d)
    assert weights == int(q / 2 + q / 64 * (1 + 4 / 256) + 4 * (N - q) + 4 * trainable)


def test_optimizer_bytes():
    spec = _spec(_gpt2())
    assert optimizer_bytes(spec, [10, 20]) == 8 * 30 + 2 * 4
    spec8 = spec.replace(optimizer="adamw8bit")
    assert optimizer_bytes(spec8, [100, 4096]) == 800 + 2 * 4096 + 8 * 16 + 2048


def test_gpt2_block_activations_by_hand():
    """HF GPT2Block, fp32, CPU, per token: LN stats 4x4, ln_1 out d, qkv 3d, SDPA out d + lse 4H,
    residual d, ln_2 out d, gelu_new 5 x ff (c_fc out, 0.5x, tanh, 1+tanh, output), block out d — x4 bytes."""
    cfg = _gpt2(d=64)
    m = dims_of(cfg, "gpt2")
    d, H, ff = 64, m.H, 256
    assert block_saved_per_token(m, _spec(cfg)) == 16 + 4 * (d + 3 * d + d + d + d + 5 * ff + d) + 4 * H
    # bf16 on CPU: fp32 residual/LN stats, bf16 casts of the LN outputs, bf16 everything else
    bf = 16 + 2 * d + 6 * d + 2 * d + 4 * H + 4 * d + 2 * d + 10 * ff + 4 * d
    assert block_saved_per_token(m, _spec(cfg, precision="bf16")) == bf
    # CUDA autocast runs gelu_new's pow in fp32: (3x4 + 2 + 2) bytes per ff element instead of 5 x 2
    assert block_saved_per_token(m, _spec(cfg, precision="bf16", device_type="cuda")) == bf + 6 * ff


def test_hardware_profiles():
    t4 = get_profile("t4")
    assert not t4.bf16_native and t4.memory_bytes == int(14.75 * GiB)
    assert get_profile("A100-80").bf16_native and get_profile("h100").cublas_workspace_bytes > t4.cublas_workspace_bytes
    with pytest.raises(KeyError):
        get_profile("tpu")
    assert isinstance(Dims("gpt2", 1, 1, 1, 1, 1, 1, 1, 1, True).qd, int)
