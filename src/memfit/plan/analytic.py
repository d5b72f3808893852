"""The analytic engine: memory of a training step from closed-form formulas (the model's dimensions are
plan/dims.py's, the step's time plan/timing.py's).

No torch here: every term is arithmetic on the architecture's dimensions, so it is instant and it
checks the trace engine independently. Sources for each formula are in the comments; where they
say "HF" they mean the transformers 5.x module named (GPT2Block, LlamaDecoderLayer, BertLayer with
SDPA attention), read op by op for the tensors autograd saves.

Notation (per micro-batch): B rows, T tokens per row, d width, L layers, H heads, ff MLP width,
V vocabulary, N parameters. a = bytes of an activation under the chosen precision (2 for
bf16/fp16 autocast, 4 for fp32), f = 4 (fp32: the residual stream, norms' statistics, the loss).

Rules used throughout (autograd and autocast semantics, pytorch/tools/autograd/derivatives.yaml and
aten/src/ATen/autocast_mode.cpp):
  R1 a linear layer saves its input only when its weight needs a gradient (frozen LoRA bases don't);
  R2 autocast casts a linear's fp32 input to a per call (q, k, v each make their own copy) and
     caches the low-precision copy of each trainable fp32 weight until backward (2 bytes/param);
  R3 SDPA (flash / memory-efficient / CPU flash) saves q, k, v, its output and a fp32 logsumexp of
     B*H*T: no T x T matrix. Eager attention (--attn-implementation eager: HF eager_attention_forward,
     matmul -> softmax -> matmul) keeps each layer's B*H*T*T probabilities instead: softmax runs in
     fp32 (Llama asks for it, autocast does for GPT-2/BERT) and saves its output; under autocast the
     second matmul also keeps its half-precision copy; with dropout the mask and dropout output. Its
     4-D float mask (B*T*T fp32) is a checkpointed block's input, so kept with checkpointing;
  R4 layer_norm saves its input plus fp32 mean/rstd per token; Llama's Python RMSNorm saves its
     input (pow), rsqrt per token and the normalised x (for the weight's gradient);
  R5 dropout keeps a mask: 1 byte/element on CUDA (native_dropout), the input's dtype on CPU;
  R6 zero_grad(set_to_none=True): gradients exist from the first backward of a step to its
     optimizer step; optimizer state exists from the first step on.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from memfit.plan.dims import Dims, block_linears, dims_of, param_tensors, targeted
from memfit.plan.spec import StepSpec, model_dropout

F32 = 4
EIGHT_BIT_MIN_SIZE = 4096   # bitsandbytes min_8bit_size: smaller tensors keep 32-bit state
EIGHT_BIT_BLOCK = 256       # bitsandbytes blockwise 8-bit optimizer block (one fp32 absmax each)
NF4_BLOCK = 64              # QLoRA nf4 blocksize (one absmax per 64 weights)
DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}


# ---------------------------------------------------------------- the memory model

@dataclass
class Memory:
    """Bytes, as the report shows them. `peak_bytes` is the analytic peak of live tensor bytes."""
    total_params: int
    trainable_params: int
    weights: int
    gradients: int
    optimizer: int
    autocast_weight_copies: int
    activations: int              # all layers' saved activations at the forward's end (+ embeddings)
    activation_per_layer: int     # saved by one block without checkpointing (per micro-batch)
    activation_per_layer_ckpt: int  # kept per block with checkpointing (its input)
    logits_loss: int              # transient peak of the LM head + fp32 loss
    temporaries: int              # other transients at the peak (recompute of one block, grads)
    peak_bytes: int
    peak_phase: str
    flops_per_micro_step: float
    notes: list[str] = field(default_factory=list)


def _lora_saved(d_in: int, r: int, a: int, p: float, mask_b: int, autocast: bool) -> int:
    """peft lora.Linear on an fp32 input x: dropout(x) (mask + new tensor) -> lora_A (autocast saves
    its own cast copy; fp32 saves the dropout output) -> lora_B saves lora_A's output (r wide)."""
    s = 0
    if p > 0:
        s += mask_b * d_in
    s += (a if autocast else F32) * d_in
    return s + a * r


def residual_bytes(spec: StepSpec) -> int:
    """Bytes per element of the residual stream: fp32 master weights (and QLoRA's fp32 upcast)
    keep it fp32 under autocast; a LoRA base loaded in bf16/fp16 makes it half precision."""
    lo = spec.lora
    if lo is None or (lo.qlora and lo.kbit_upcast):
        return F32
    return DTYPE_BYTES[spec.frozen_dtype]


def block_saved_per_token(m: Dims, spec: StepSpec) -> int:
    """Bytes autograd keeps per token for one block (no checkpointing)."""
    a = DTYPE_BYTES[spec.precision]
    autocast = spec.precision != "fp32"
    cuda = spec.device_type == "cuda"
    lo = spec.lora
    full = lo is None
    tg = set(lo.targets) if lo else set()
    p = model_dropout(spec.model_config)
    res = residual_bytes(spec)
    mask_b = 1 if cuda else res
    d, ff, H = m.d, m.ff, m.H
    r = lo.r if lo else 0

    def lora(name, d_in):
        if lo is None or not targeted(name, tg):
            return 0
        # peft casts x to the adapters' fp32 first, so a CPU dropout mask is fp32 here
        return _lora_saved(d_in, r, a, lo.dropout, 1 if cuda else F32, autocast)

    def lin_in(width, src_bytes):
        """R1/R2: what a trainable linear keeps of its input: an own cast copy under autocast
        when the input is wider than a; otherwise the input itself (counted by the caller once)."""
        if not full:
            return 0
        return a * width if (autocast and src_bytes != a) else 0

    s = 0
    if m.arch == "gpt2":  # HF GPT2Block: ln_1 -> attn -> +res -> ln_2 -> mlp(gelu_new) -> +res
        s += 2 * 2 * res                                   # ln_1, ln_2 mean/rstd
        ln_out_kept = full and not (autocast and res != a)  # the LN output itself feeds the matmul
        s += lin_in(d, res) + (res * d if ln_out_kept else 0) + lora("c_attn", d)
        s += 3 * a * d                                     # q, k, v (c_attn output) kept by SDPA
        s += a * d + F32 * H                               # SDPA output (also c_proj's input) + lse
        s += lora("attn.c_proj", d)
        s += res * d                                       # residual after attention (ln_2 input)
        s += lin_in(d, res) + (res * d if ln_out_kept else 0) + lora("c_fc", d) + lora("mlp.c_proj", ff)
        if cuda and autocast:                              # CUDA autocast runs pow in fp32
            s += (3 * F32 + a) * ff                        # pow input, tanh, 1+tanh in fp32; 0.5x
            s += a * ff if full else 0                     # c_proj's cast of the fp32 gelu output
        else:                                              # c_fc out, 0.5x, tanh, 1+tanh (+ gelu out)
            s += 4 * a * ff + (a * ff if full else 0)
        s += res * d                                       # block output (next ln_1 input)
        if p > 0:
            s += 2 * mask_b * d                            # resid dropouts (attn c_proj, mlp)
            if not cuda:                                   # CPU SDPA with dropout: math kernel
                s += (2 * a + mask_b) * H * spec.seq_len
    elif m.arch == "llama":  # HF LlamaDecoderLayer: RMSNorm -> attn(RoPE) -> +res -> RMSNorm -> SwiGLU -> +res
        s += 2 * F32                                       # rsqrt per token, both norms
        if res != F32:
            s += 2 * F32 * d                               # RMSNorm's fp32 copy of a half-precision input
        norm_out = F32 if res == F32 else res              # weight * x.to(input dtype)
        s += 2 * (F32 * d if full else 0)                  # normalised x kept for the norm weights' grad
        kept = full and not (autocast and norm_out != a)   # q/k/v (gate/up) share the norm output
        s += 3 * lin_in(d, norm_out) + (norm_out * d if kept else 0)
        s += lora("q_proj", d) + lora("k_proj", d) + lora("v_proj", d)
        s += a * (m.qd + 2 * m.kvd)                        # RoPE'd q, k and v kept by SDPA
        s += a * m.qd + F32 * H                            # SDPA output (o_proj input) + lse
        s += lora("o_proj", m.qd)
        s += res * d if res == F32 else 0                  # residual after attention (norm 2's input)
        s += 2 * lin_in(d, norm_out) + (norm_out * d if kept else 0)
        s += lora("gate_proj", d) + lora("up_proj", d) + lora("down_proj", ff)
        q4 = lo is not None and lo.qlora and autocast      # bnb Linear4bit returns the input dtype (fp32)
        act = F32 if q4 else a
        s += 3 * act * ff                                  # gate out (silu in), silu out, up out
        s += a * ff if full else 0                         # gate*up kept by down_proj
        s += res * d if res == F32 else 0                  # block output (next norm's input)
        if p > 0 and not cuda:
            s += (2 * a + mask_b) * H * spec.seq_len
    else:  # bert: HF BertLayer (post-LN): q/k/v -> SDPA -> dense -> +res, LN -> dense, gelu, dense -> +res, LN
        s += 2 * 2 * res
        kept = full and not (autocast and res != a)        # the layer input (previous LN output)
        s += 3 * lin_in(d, res) + (res * d if kept else 0)
        s += lora("query", d) + lora("key", d) + lora("value", d)
        s += 3 * a * d                                     # q, k, v kept by SDPA
        s += a * d + F32 * H                               # SDPA output (+ lse)
        s += res * d                                       # LN1 input (dense + residual)
        s += lin_in(d, res) + (res * d if kept else 0)     # intermediate.dense input (LN1 output)
        s += a * ff                                        # gelu input
        s += a * ff if full else 0                         # gelu output kept by output.dense
        s += res * d                                       # LN2 input
        if p > 0:
            s += 2 * mask_b * d
            if not cuda:
                s += (2 * a + mask_b) * H * spec.seq_len
    if eager_attention(spec) and not (p > 0 and not cuda):   # (CPU + dropout: SDPA's math kernel, above)
        probs = F32 + (mask_b + a if p > 0 else (a if a != F32 else 0))
        s += probs * H * spec.seq_len - F32 * H           # R3: the probabilities, and no logsumexp
    if spec.padded:
        # SDPA converts the boolean [B,1,T,T] padding mask to an additive mask of q's dtype in every
        # call and keeps it for backward (aten scaled_dot_product_attention: convert_boolean_attn_mask)
        s += a * spec.seq_len
    return int(s)


def eager_attention(spec: StepSpec) -> bool:
    """The model runs transformers' eager attention (--attn-implementation eager, set on its config)."""
    return getattr(spec.model_config, "_attn_implementation", None) == "eager"


def parameter_bytes(m: Dims, spec: StepSpec) -> tuple[int, int, int, int, list[int]]:
    """(total params, trainable params, weight bytes, autocast copy bytes, trainable tensor sizes)."""
    tensors = param_tensors(m, spec.num_labels, spec.kind)
    lo = spec.lora
    total = sum(n for _, n in tensors)
    autocast = spec.precision != "fp32"
    lin_names = {name for name, *_ in block_linears(m)}
    # weights that go through matmuls (autocast casts these; embedding lookups and norms are not cast)
    mm = sum(n for name, n in tensors if name.rsplit(".", 1)[0].split(".", 1)[-1] in lin_names
             and name.endswith(".w"))
    if spec.kind == "causal":
        mm += m.V * m.d                         # tied or untied LM head is a matmul weight
    elif m.arch == "bert":
        mm += m.d * m.d                         # pooler
    if lo is None:
        weights = F32 * total
        trainable_sizes = [n for _, n in tensors]
        copies = 2 * mm if autocast else 0
        return total, total, weights, copies, trainable_sizes
    frozen_b = DTYPE_BYTES[spec.frozen_dtype]
    adapters = []
    q_numel = 0
    for i in range(m.L):
        for name, n_in, n_out, bias in block_linears(m):
            if targeted(name, lo.targets):
                adapters += [n_in * lo.r, lo.r * n_out]
            if lo.qlora:
                q_numel += n_in * n_out
    head = [n for name, n in tensors if name.startswith(("classifier", "score"))]
    trainable_sizes = adapters + head
    trainable = sum(trainable_sizes)
    if lo.qlora:
        rest = total - q_numel
        rest_b = F32 if lo.kbit_upcast else frozen_b
        absmax = q_numel / NF4_BLOCK * (1 + 4 / 256) if lo.double_quant else q_numel / NF4_BLOCK * 4
        weights = int(q_numel / 2 + absmax + rest * rest_b + F32 * trainable)
    else:
        weights = frozen_b * (total - sum(head)) + F32 * trainable
    copies = 0
    if autocast:
        copies += 2 * sum(adapters)
        if frozen_b == F32 and not lo.qlora:   # frozen fp32 weights: a cast copy kept per matmul
            copies += 2 * mm
    return total + sum(adapters), trainable, weights, copies, trainable_sizes


def optimizer_bytes(spec: StepSpec, sizes: list[int]) -> int:
    if spec.optimizer == "adamw":
        return sum(8 * n + 4 for n in sizes)          # exp_avg + exp_avg_sq fp32, a step scalar each
    return eight_bit_state_bytes(sizes) + 2048          # + the two 256-entry fp32 qmaps


def eight_bit_state_bytes(numels) -> int:
    """bitsandbytes blockwise 8-bit Adam state for tensors of these sizes (plan/standins.Adam8bitStandIn
    allocates this layout in the trace): uint8 exp_avg/exp_avg_sq + one fp32 absmax each per block."""
    total = 0
    for n in numels:
        if n < EIGHT_BIT_MIN_SIZE:
            total += 8 * n
        else:
            total += 2 * n + 8 * math.ceil(n / EIGHT_BIT_BLOCK)
    return total


def flops_per_micro_step(m: Dims, spec: StepSpec, trainable_frac: float) -> float:
    """Matmul FLOPs of forward + backward (Kaplan et al. 2020: 2N per token forward, 4N backward;
    a frozen weight skips its weight-gradient matmul, so LoRA is ~4N) + attention 4*T*d per token
    per layer forward (QK^T and AV; causal halves it in flash kernels but not in FlopCounterMode's
    count) x3 for forward+backward; checkpointing recomputes the forward (+2N, +1x attention)."""
    tok = spec.micro_batch * spec.seq_len
    n_mm = sum(n_in * n_out for _, n_in, n_out, _ in block_linears(m)) * m.L
    if spec.kind == "causal":
        n_mm += m.V * m.d
    fwd = 2 * n_mm * tok
    bwd = 2 * n_mm * tok * (1 + (1.0 if spec.lora is None else 0.0))
    attn = 4 * spec.seq_len * m.qd * tok * m.L
    total = fwd + bwd + 3 * attn
    if spec.gradient_checkpointing:
        total += fwd - 2 * (m.V * m.d * tok if spec.kind == "causal" else 0) + attn
    return float(total)


def chunked_loss_bytes(m: Dims, spec: StepSpec, a: int) -> tuple[int, int, int]:
    """(forward peak, backward peak, after the loss) of models/chunked_ce.py: one chunk's logits (the
    matmul's output in the compute dtype, its fp32 copy that becomes the softmax/gradient in place,
    the gradient cast back), under autocast the weight's cast copy and one chunk's weight-gradient
    product in the compute dtype then fp32; and what the forward keeps for backward: dL/dhidden and,
    for a trainable head, dL/dweight (fp32)."""
    from memfit.models.chunked_ce import chunk_rows
    rows = spec.micro_batch * spec.seq_len
    c = chunk_rows(rows, m.V)
    lowp = a != F32
    head_trains = spec.lora is None
    kept = F32 * rows * m.d + (F32 * m.V * m.d if head_trains else 0)
    chunk = (F32 + (a if lowp else 0)) * c * m.V
    if lowp:
        chunk += a * m.V * m.d + (a + F32) * m.V * m.d * head_trains
    return kept + chunk, kept, kept


def analytic_memory(spec: StepSpec) -> Memory:
    m = dims_of(spec.model_config, spec.arch)
    B, T = spec.micro_batch, spec.seq_len
    tok = B * T
    a = DTYPE_BYTES[spec.precision]
    total, trainable, weights, copies, sizes = parameter_bytes(m, spec)
    grads = F32 * trainable
    opt = optimizer_bytes(spec, sizes)
    paged = spec.optimizer == "paged_adamw8bit" and spec.device_type == "cuda"
    per_tok = block_saved_per_token(m, spec)
    layer = per_tok * tok
    # Embedding / final-norm extras: the first block's input (fp32 embeddings) and, for a trainable
    # head, the final norm output cast for the LM head (R2).
    extra = F32 * m.d * tok
    chunked = spec.kind == "causal" and spec.chunked_loss
    if spec.kind == "causal" and spec.lora is None:
        # (the chunked loss saves nothing: it casts the final hidden states per forward, then frees them)
        extra += (0 if chunked else a * m.d * tok) + (F32 * m.d * tok if m.arch == "llama" else 0)
    if spec.padded:                        # HF builds a [B,1,T,T] mask for SDPA when padding is present
        extra += B * T * T * (a if m.arch == "bert" else 1)
    res = residual_bytes(spec)
    ckpt_layer = res * m.d * tok           # non-reentrant checkpoint keeps each block's input
    if spec.gradient_checkpointing:
        acts = m.L * ckpt_layer + extra + (F32 * B * T * T if eager_attention(spec) else 0)   # R3's mask
        recompute = layer                  # one block's activations live again during its backward
        fwd_copies = copies                # the autocast weight cache lives until autocast exits;
        bwd_copies = 0                     # recomputation re-casts per block (transient)
    else:
        acts = m.L * layer + extra
        recompute = 0
        fwd_copies = bwd_copies = copies   # cast weights are saved for backward
    # LM head + loss (memfit.models.loss.causal_lm_loss): logits (a) -> fp32 copy -> log_softmax
    # (fp32, saved) in forward; in backward nll grad + log_softmax grad (fp32) with the saved
    # log_softmax alive: 12 bytes per logit at the head's backward, (a + 8) in forward.
    if chunked:
        logits_fwd, logits_bwd, head_grad = chunked_loss_bytes(m, spec, a)
    elif spec.kind == "causal":
        n_logits = B * (T - 1) * m.V
        logits_fwd, logits_bwd = (a + 2 * F32) * n_logits, 3 * F32 * n_logits
        # after the loss: the logits' grad (a) and the LM head / tied embedding grad (fp32)
        head_grad = a * n_logits + (F32 * m.V * m.d if spec.lora is None else 0)
    else:
        logits_fwd = logits_bwd = 3 * F32 * B * spec.num_labels
        head_grad = 0
    logits = max(logits_fwd, logits_bwd)
    accum_grads = grads if spec.micro_steps > 1 else 0   # later micro-batches see earlier grads
    static = weights + (0 if paged else opt) + accum_grads + acts
    # Inside a block the MLP's wide intermediates coexist briefly (forward: up/activation outputs;
    # backward: the grad of the activation plus the layer's weight grads being written).
    fwd_transient = 2 * a * m.ff * tok
    bwd_transient = a * m.ff * tok + (F32 * m.d * m.ff if spec.lora is None else 0)
    forward_end = static + fwd_copies + max(logits_fwd, fwd_transient)
    # With checkpointing the last block recomputed (the first layer) runs with almost every gradient
    # already written: grads + one block's activations + its backward transients.
    tail = (grads + recompute + bwd_transient) if spec.gradient_checkpointing else bwd_transient
    backward = static + bwd_copies + max(logits_bwd, head_grad, tail)
    fwd_bwd = max(forward_end, backward)
    opt_phase = weights + grads + (0 if paged else opt)
    phase = "forward/backward" if fwd_bwd >= opt_phase else "optimizer step"
    notes = []
    if paged:
        notes.append("paged 8-bit optimizer state is in CUDA unified memory (not in the allocator)")
    return Memory(
        total_params=total, trainable_params=trainable, weights=int(weights), gradients=int(grads),
        optimizer=int(opt), autocast_weight_copies=int(copies), activations=int(acts),
        activation_per_layer=int(layer), activation_per_layer_ckpt=int(ckpt_layer), logits_loss=int(logits),
        temporaries=int(max(tail - logits, head_grad - logits, 0) + accum_grads), peak_bytes=int(max(fwd_bwd, opt_phase)),
        peak_phase=phase, flops_per_micro_step=flops_per_micro_step(m, spec, trainable / max(total, 1)),
        notes=notes)
