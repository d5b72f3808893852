"""A model's dimensions and parameter tensors as the analytic formulas see them (GPT-2, Llama, BERT
layouts from a transformers config), and which linears LoRA targets. No torch here."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Dims:
    arch: str
    d: int
    L: int
    H: int
    kv: int
    hd: int
    ff: int
    V: int
    P: int
    tied: bool
    bias: bool = False          # llama attention/mlp bias
    type_vocab: int = 2

    @property
    def qd(self) -> int:
        return self.H * self.hd

    @property
    def kvd(self) -> int:
        return self.kv * self.hd


def dims_of(config, arch: str) -> Dims:
    c = config
    if arch == "gpt2":
        d = c.n_embd
        return Dims("gpt2", d, c.n_layer, c.n_head, c.n_head, d // c.n_head, c.n_inner or 4 * d, c.vocab_size,
                    c.n_positions, bool(getattr(c, "tie_word_embeddings", True)), True)
    if arch == "bert":
        d = c.hidden_size
        return Dims("bert", d, c.num_hidden_layers, c.num_attention_heads, c.num_attention_heads,
                    d // c.num_attention_heads, c.intermediate_size, c.vocab_size, c.max_position_embeddings,
                    True, True, getattr(c, "type_vocab_size", 2))
    d = c.hidden_size
    H = c.num_attention_heads
    hd = getattr(c, "head_dim", None) or d // H
    return Dims("llama", d, c.num_hidden_layers, H, getattr(c, "num_key_value_heads", None) or H, hd,
                c.intermediate_size, c.vocab_size, getattr(c, "max_position_embeddings", 2048),
                bool(getattr(c, "tie_word_embeddings", False)), bool(getattr(c, "attention_bias", False)))


def block_linears(m: Dims) -> list[tuple[str, int, int, bool]]:
    """(name, in, out, bias) of one block's matmul layers (HF module names)."""
    d, ff = m.d, m.ff
    if m.arch == "gpt2":   # GPT2Attention.c_attn/c_proj, GPT2MLP.c_fc/c_proj (Conv1D)
        return [("c_attn", d, 3 * d, True), ("c_proj", d, d, True), ("c_fc", d, ff, True),
                ("mlp.c_proj", ff, d, True)]
    if m.arch == "bert":   # BertSelfAttention q/k/v, BertSelfOutput, BertIntermediate, BertOutput
        return [("query", d, d, True), ("key", d, d, True), ("value", d, d, True), ("attention.output.dense", d, d, True),
                ("intermediate.dense", d, ff, True), ("output.dense", ff, d, True)]
    b = m.bias              # LlamaAttention q/k/v/o_proj, LlamaMLP gate/up/down_proj
    return [("q_proj", d, m.qd, b), ("k_proj", d, m.kvd, b), ("v_proj", d, m.kvd, b), ("o_proj", m.qd, d, b),
            ("gate_proj", d, ff, False), ("up_proj", d, ff, False), ("down_proj", ff, d, False)]


def param_tensors(m: Dims, num_labels: int = 2, kind: str = "causal") -> list[tuple[str, int]]:
    """Every parameter tensor as (name, numel); tied weights once (sizing.py has the same totals)."""
    d, V = m.d, m.V
    out: list[tuple[str, int]] = []
    if m.arch == "gpt2":
        out += [("wte", V * d), ("wpe", m.P * d)]
        per = [("ln_1.w", d), ("ln_1.b", d), ("ln_2.w", d), ("ln_2.b", d)]
    elif m.arch == "bert":
        out += [("word", V * d), ("pos", m.P * d), ("type", m.type_vocab * d), ("emb_ln.w", d), ("emb_ln.b", d)]
        per = [("ln1.w", d), ("ln1.b", d), ("ln2.w", d), ("ln2.b", d)]
    else:
        out += [("embed", V * d)]
        per = [("in_norm", d), ("post_norm", d)]
    for i in range(m.L):
        for name, n_in, n_out, bias in block_linears(m):
            out.append((f"{i}.{name}.w", n_in * n_out))
            if bias:
                out.append((f"{i}.{name}.b", n_out))
        out += [(f"{i}.{n}", k) for n, k in per]
    if m.arch == "gpt2":
        out += [("ln_f.w", d), ("ln_f.b", d)]
    elif m.arch == "llama":
        out += [("norm", d)]
    if m.arch == "bert":
        out += [("pooler.w", d * d), ("pooler.b", d), ("classifier.w", d * num_labels), ("classifier.b", num_labels)]
    elif kind == "classify":
        out += [("score.w", d * num_labels)]
    elif not m.tied:
        out += [("lm_head", V * d)]
    return out


def targeted(name: str, targets) -> bool:
    leaf = name.split(".")[-1]
    return "all-linear" in targets or leaf in targets or name in targets
