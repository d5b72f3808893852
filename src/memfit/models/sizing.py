"""Target parameter count -> transformer shape (layers, width, heads), counted exactly.

Pure Python on purpose: the CLI and the planner size a model without importing torch or
transformers. ``ModelShape.params`` reproduces ``sum(p.numel() for p in model.parameters())`` of
the transformers model that ``build.build_causal_lm`` makes from the shape (the tests check it
against real and meta-device models).

Parameter counts (d = width, L = layers, V = vocab, P = positions, I = Llama MLP width):

* gpt2:  V*d (wte) + P*d (wpe) + L*(12 d^2 + 13 d) + 2d (ln_f) [+ V*d lm_head if untied]
         per block: ln_1 2d, c_attn d*3d+3d, c_proj d*d+d, ln_2 2d, c_fc d*4d+4d, mlp c_proj 4d*d+d
* llama: V*d (embed) + L*(2 d^2 + 2 d*kv*hd + 3 d*I + 2d) + d (final norm) [+ V*d if untied]
         no biases; RoPE has no parameters (inv_freq is a buffer).

Embedding dominance: with a large vocabulary the token embedding alone can exceed a small target
(50,257 x 64 = 3.2M). Embeddings are tied by default for both architectures (GPT-2 ties; small
Llamas such as SmolLM and Llama-3.2-1B tie too), and a target below the smallest reachable model
raises ``ValueError`` naming that smallest size. Reachable ranges with tied embeddings, seq 256:
vocab 8,192 from ~0.6M, vocab 49,152/50,257 from ~3.3M (so a 1M target needs a small vocabulary).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

ARCHS = ("gpt2", "llama")

# Search space. Widths are multiples of 64 (friendly to tensor cores and SDPA kernels); below 256
# multiples of 32 are allowed too, because with a big vocabulary the embedding table makes the step
# from 128 to 192 wide a 50% jump in total size at the small end.
_MIN_WIDTH = 64
_MAX_WIDTH = 8192
_MAX_LAYERS = 96
# Preferred width/depth ratio. GPT-2 small..XL runs 64 -> 33, nanoGPT's Shakespeare model is 64,
# Llama-3.2-1B is 128; Kaplan et al. (2020) find loss nearly flat for ratios ~20-200. 48 sits in
# the middle of the well-trodden range.
_PREFERRED_ASPECT = 48.0
# Closeness to the target weighs this much more than the aspect ratio (in log space): a 5% miss
# costs as much as a ratio 1.5x away from the preferred one.
_SIZE_WEIGHT = 8.0
TOLERANCE = 0.10  # the contract: land within +-10% of the target, all parameters counted


@dataclass(frozen=True)
class ModelShape:
    """Everything needed to build the model; ``params`` is its exact parameter count."""

    arch: str  # 'gpt2' | 'llama'
    n_layer: int
    n_embd: int  # hidden size
    n_head: int
    n_kv_head: int  # llama key/value heads (GQA when < n_head); equals n_head for gpt2
    intermediate_size: int  # MLP width (4 * n_embd for gpt2)
    vocab_size: int
    max_position: int  # sequence length the model is built for
    tie_embeddings: bool = True

    def __post_init__(self) -> None:
        if self.arch not in ARCHS:
            raise ValueError(f"arch must be one of {ARCHS}, got {self.arch!r}")
        if self.n_embd % self.n_head or self.n_head % self.n_kv_head:
            raise ValueError(f"heads must divide the width (and kv heads the heads): {self}")

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def embedding_params(self) -> int:
        """Token embedding (+ untied LM head, + GPT-2's learned positions)."""
        d = self.n_embd
        n = self.vocab_size * d * (1 if self.tie_embeddings else 2)
        if self.arch == "gpt2":
            n += self.max_position * d
        return n

    @property
    def block_params(self) -> int:
        """Parameters of one transformer block."""
        d, i = self.n_embd, self.intermediate_size
        if self.arch == "gpt2":
            # ln_1, ln_2: 2 x (weight + bias); attention qkv + out; MLP up + down; all with biases.
            return 2 * 2 * d + (d * 3 * d + 3 * d) + (d * d + d) + (d * i + i) + (i * d + d)
        kv = self.n_kv_head * self.head_dim
        # q, o: d x d; k, v: d x kv; gate, up, down: d x I; two RMSNorm weights; no biases.
        return 2 * d * d + 2 * d * kv + 3 * d * i + 2 * d

    @property
    def params(self) -> int:
        """Exact total parameter count (tied weights counted once)."""
        final_norm = 2 * self.n_embd if self.arch == "gpt2" else self.n_embd
        return self.embedding_params + self.n_layer * self.block_params + final_norm


def _heads(d: int) -> int:
    """Head count for width d: head_dim 32 up to 256 wide (GPT-style tiny models), 64 above
    (GPT-2, Llama-3.2-1B), 128 beyond 4096 wide (Llama-7B and up keep 128 too)."""
    head_dim = 32 if d <= 256 else 64 if d <= 4096 else 128
    return max(1, d // head_dim)


def _kv_heads(n_head: int) -> int:
    """Llama key/value heads: grouped-query attention (4 query heads per kv head, as Llama-3)
    once there are 16+ heads; plain multi-head attention for small models."""
    return n_head // 4 if n_head >= 16 and n_head % 4 == 0 else n_head


def _llama_mlp(d: int) -> int:
    """SwiGLU width: 8/3 d (same FLOPs as a 4d GELU MLP), rounded up to a multiple of 64."""
    return 64 * math.ceil(8 * d / 3 / 64)


def _widths() -> list[int]:
    # Every width is divisible by its head_dim (see _heads). Steps grow with the width so head
    # counts stay round (even above 1024 wide, a multiple of 4 above 2048 so GQA groups evenly):
    # 32 below 256, 64 up to 1024, 128 up to 2048, 256 beyond.
    return [*range(_MIN_WIDTH, 256, 32), *range(256, 1024, 64), *range(1024, 2048, 128),
            *range(2048, _MAX_WIDTH + 1, 256)]


def make_shape(arch: str, n_layer: int, n_embd: int, vocab_size: int, seq_len: int,
               tie_embeddings: bool = True) -> ModelShape:
    """The shape memfit's conventions give for a (layers, width) pair."""
    n_head = _heads(n_embd)
    if arch == "gpt2":
        return ModelShape("gpt2", n_layer, n_embd, n_head, n_head, 4 * n_embd, vocab_size, seq_len,
                          tie_embeddings)
    if arch == "llama":
        return ModelShape("llama", n_layer, n_embd, n_head, _kv_heads(n_head), _llama_mlp(n_embd),
                          vocab_size, seq_len, tie_embeddings)
    raise ValueError(f"arch must be one of {ARCHS}, got {arch!r}")


# Published shapes for the sizes people name: `--arch llama --target-params 7B` means Llama-2-7B's blocks
# (the grid search would pick another 7B shape). nominal params -> (layers, width, heads, kv heads, MLP width);
# the vocabulary (and tying) stay the job's, so the total is checked against the target like any shape.
KNOWN_SHAPES: dict[str, dict[int, tuple[int, int, int, int, int]]] = {
    "llama": {7_000_000_000: (32, 4096, 32, 32, 11008),        # Llama-2-7B
              13_000_000_000: (40, 5120, 40, 40, 13824),       # Llama-2-13B
              70_000_000_000: (80, 8192, 64, 8, 28672)},       # Llama-2-70B (GQA, 8 kv heads)
}


def known_shape(target_params: int, arch: str, vocab_size: int, seq_len: int,
                tie_embeddings: bool = True) -> ModelShape | None:
    """The published shape named by this target (within the ±10% contract with this vocabulary), or None."""
    for nominal, (n_layer, d, heads, kv, inter) in KNOWN_SHAPES.get(arch, {}).items():
        if abs(target_params / nominal - 1) > TOLERANCE:
            continue
        shape = ModelShape(arch, n_layer, d, heads, kv, inter, vocab_size, seq_len, tie_embeddings)
        if abs(shape.params / target_params - 1) <= TOLERANCE:
            return shape
    return None


def size_model(target_params: int, arch: str, vocab_size: int, seq_len: int,
               tie_embeddings: bool = True) -> ModelShape:
    """Choose layers/width/heads so the model has ``target_params`` (+-10%) parameters in total.

    Searches every (layers, width) on the grid and minimises
    ``8 * |ln(params/target)| + |ln((width/layers) / 48)|`` over shapes within +-10%: close to the
    target first, then a GPT-like aspect ratio. Deterministic (no RNG, no data).
    Raises ``ValueError`` when the target is out of reach (e.g. smaller than the embedding table).
    """
    if arch not in ARCHS:
        raise ValueError(f"arch must be one of {ARCHS}, got {arch!r}")
    if target_params <= 0 or vocab_size <= 0 or seq_len <= 0:
        raise ValueError("target_params, vocab_size and seq_len must be positive")
    known = known_shape(target_params, arch, vocab_size, seq_len, tie_embeddings)
    if known is not None:
        return known

    best: tuple[float, ModelShape] | None = None
    nearest: ModelShape | None = None  # closest in size, for the error message
    for d in _widths():
        for n_layer in range(1, _MAX_LAYERS + 1):
            shape = make_shape(arch, n_layer, d, vocab_size, seq_len, tie_embeddings)
            p = shape.params
            miss = abs(math.log(p / target_params))
            if nearest is None or miss < abs(math.log(nearest.params / target_params)):
                nearest = shape
            if p > target_params * (1 + TOLERANCE):
                break  # deeper only gets bigger
            if p < target_params * (1 - TOLERANCE):
                continue
            cost = _SIZE_WEIGHT * miss + abs(math.log(d / n_layer / _PREFERRED_ASPECT))
            if best is None or cost < best[0]:
                best = (cost, shape)
    if best is not None:
        return best[1]

    assert nearest is not None
    smallest = make_shape(arch, 1, _MIN_WIDTH, vocab_size, seq_len, tie_embeddings)
    if target_params < smallest.params:
        raise ValueError(
            f"target {_fmt(target_params)} params is below the smallest {arch} model reachable with vocab "
            f"{vocab_size:,} and seq_len {seq_len} ({'tied' if tie_embeddings else 'untied'} embeddings): "
            f"{describe(smallest)}. The embedding table alone is {_fmt(smallest.embedding_params)}; raise "
            f"the target to at least {_fmt(smallest.params)} or use a smaller vocabulary.")
    raise ValueError(f"no {arch} shape within ±{TOLERANCE:.0%} of {_fmt(target_params)} params; "
                     f"nearest is {describe(nearest)}")


def _fmt(n: int) -> str:
    for unit, scale in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f}{unit}"
    return str(n)


def describe(shape: ModelShape) -> str:
    """One line for logs: 'gpt2: 6 layers, 256 wide, 8 heads, 6.9M params'."""
    heads = f"{shape.n_head} heads"
    if shape.n_kv_head != shape.n_head:
        heads += f" ({shape.n_kv_head} kv)"
    layers = f"{shape.n_layer} layer{'s' if shape.n_layer != 1 else ''}"
    return f"{shape.arch}: {layers}, {shape.n_embd} wide, {heads}, {_fmt(shape.params)} params"
