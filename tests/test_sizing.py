"""Sizing: target parameter count -> shape, within +-10% counting all parameters (pure Python).

That ``ModelShape.params`` equals the built transformers model's count is checked in test_build.py.
"""

from __future__ import annotations

import pytest

from memfit.models.sizing import ModelShape, describe, make_shape, size_model

M = 1_000_000
TARGETS = [1 * M, 3 * M, 10 * M, 30 * M, 124 * M, 350 * M, 1_000 * M]
# Where a target is reachable: a 50k vocabulary's embedding alone is 3.2M at the narrowest width.
FEASIBLE = [(8192, t) for t in TARGETS] + [(v, t) for v in (49152, 50257) for t in TARGETS if t >= 10 * M]


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
@pytest.mark.parametrize(("vocab", "target"), FEASIBLE)
def test_size_within_ten_percent_with_sane_shape(arch: str, vocab: int, target: int) -> None:
    s = size_model(target, arch, vocab, seq_len=256)
    assert abs(s.params / target - 1) <= 0.10, describe(s)
    assert s.n_embd % s.n_head == 0 and s.n_head % s.n_kv_head == 0
    assert 32 <= s.head_dim <= 128
    assert s.n_embd % 32 == 0 and (s.n_embd < 256 or s.n_embd % 64 == 0)
    # Aspect ratio (width / depth) in the range small GPTs use; the tiny end is embedding-bound.
    assert 16 <= s.n_embd / s.n_layer <= 128 or target < 3 * M, describe(s)
    assert (s.arch, s.vocab_size, s.max_position) == (arch, vocab, 256)


def test_known_small_shapes() -> None:
    # The default job's neighbourhood (vocab 8192, seq 256), pinned so a change is deliberate.
    assert size_model(3 * M, "gpt2", 8192, 256) == make_shape("gpt2", 3, 192, 8192, 256)
    assert size_model(10 * M, "gpt2", 8192, 256) == make_shape("gpt2", 6, 320, 8192, 256)


def test_gpt2_formula_matches_gpt2_small() -> None:
    # GPT-2 small (12 x 768, vocab 50257, 1024 positions, tied) has 124,439,808 parameters.
    s = ModelShape("gpt2", 12, 768, 12, 12, 3072, 50257, 1024, tie_embeddings=True)
    assert s.params == 124_439_808


def test_bigger_targets_give_monotone_sizes() -> None:
    sizes = [size_model(t, "llama", 8192, 512).params for t in TARGETS]
    assert sizes == sorted(sizes)


def test_untied_embeddings_count_the_head() -> None:
    tied = make_shape("llama", 4, 256, 8192, 256, tie_embeddings=True)
    untied = make_shape("llama", 4, 256, 8192, 256, tie_embeddings=False)
    assert untied.params - tied.params == 8192 * 256
    s = size_model(30 * M, "llama", 8192, 256, tie_embeddings=False)
    assert not s.tie_embeddings and abs(s.params / (30 * M) - 1) <= 0.10


def test_gqa_for_many_heads() -> None:
    s = size_model(1_000 * M, "llama", 50257, 256)
    assert s.n_head >= 16 and s.n_kv_head == s.n_head // 4
    assert "kv" in describe(s)


@pytest.mark.parametrize("vocab", [49152, 50257])
def test_unreachable_small_target_names_the_smallest_size(vocab: int) -> None:
    with pytest.raises(ValueError, match=r"smallest gpt2 model .*raise the target to at least 3\.[0-9]M"):
        size_model(1 * M, "gpt2", vocab, 256)


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="arch"):
        size_model(3 * M, "bert", 8192, 256)
    with pytest.raises(ValueError, match="positive"):
        size_model(0, "gpt2", 8192, 256)
    with pytest.raises(ValueError, match="heads"):
        ModelShape("gpt2", 2, 100, 3, 3, 400, 8192, 256)


def test_describe() -> None:
    s = make_shape("gpt2", 6, 256, 8192, 256)
    assert describe(s) == "gpt2: 6 layers, 256 wide, 8 heads, 6.9M params"
