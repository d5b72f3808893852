"""The trace engine: run two real training steps on fake tensors and count every byte.

Under ``FakeTensorMode`` on the fake *CPU* device, tensors have shapes, dtypes and storages but no
data, so a 7B model "trains" without allocating its weights. A TorchDispatchMode below it sees
every op's outputs and counts live storage bytes exactly as memfit.memtrack.LiveTensorTracker does
on real tensors (weakref finalizers fire when torch frees a storage), so the trace's peak is the
peak a real CPU run would show (DESIGN.md measured 673.4 vs 673.4 MiB).

What the trace runs is the training loop's step (memfit.train.loop/step): logits from the model,
the loss outside it in fp32, autocast for bf16/fp16 with fp32 master weights, GradScaler unscale,
grad-norm clipping, the optimizer, zero_grad(set_to_none=True). Its peak is the peak of steps 1-3
of a real run: the first optimizer step (which creates the optimizer state) and then a steady-state
step with every micro-batch traced (state present; later steps repeat it).

What the fake CPU device cannot show is added by emulation or formula:
  * target = CUDA: CUDA autocast runs pow/softmax/layer_norm/exp/... in fp32 where CPU autocast
    keeps bf16 (aten/src/ATen/autocast_mode.cpp AT_FORALL_FP32 / FP32_SET_OPT_DTYPE): emulated by a
    TorchFunctionMode that applies the CUDA policy on top of CPU autocast (above autograd, so the
    saved tensors are the ones CUDA saves).
  * CUDA dropout keeps a 1-byte bool mask (native_dropout); CPU's keeps a mask in the input dtype.
  * CUDA SDPA uses the flash / memory-efficient kernels (O(T) memory, no stored dropout mask);
    the CPU flash kernel has the same saved tensors (q, k, v, out, logsumexp): forced for CUDA.
  * bitsandbytes 8-bit optimizers and 4-bit weights do not run on fake tensors: stand-ins
    allocate exactly their state/weight tensors and the transient dequantized weight of bnb's
    MatMul4Bit (forward and backward), and LoRA layers mirror peft's lora.Linear.forward.
  * the CUDA caching allocator (512-byte rounding, 2 MiB / 20 MiB segments, block splitting) is
    replayed on the trace's allocation stream by plan.allocator -> peak reserved.
Large models are traced with 2 and 3 layers and every phase's peak extrapolated linearly in the
layer count (exact for per-layer terms: weights, grads, states and saved activations are linear).
"""

from __future__ import annotations

import contextlib
import copy
import math
import statistics
import weakref
from dataclasses import dataclass, field

from memfit.plan.spec import StepSpec

FULL_TRACE_MAX_LAYERS = 5   # deeper models: trace 2 and 3 layers and extrapolate
EIGHT_BIT_MIN_SIZE = 4096   # bitsandbytes min_8bit_size: smaller tensors keep 32-bit state
EIGHT_BIT_BLOCK = 256       # bitsandbytes blockwise 8-bit optimizer block (one fp32 absmax each)
NF4_BLOCK = 64              # QLoRA nf4 blocksize (one absmax per 64 weights)


@dataclass
class TraceResult:
    peak_bytes: int                      # exact live tensor bytes, max over the traced steps
    phase_peaks: dict[str, int]          # e.g. {"s1.fwd": .., "s2.bwd": .., "s2.opt": ..}
    peak_phase: str
    param_bytes: int                     # all parameters and buffers
    grad_bytes: int
    state_bytes: int                     # optimizer state (incl. paged, see paged_state_bytes)
    paged_state_bytes: int               # paged 8-bit state (CUDA unified memory, not allocator)
    total_params: int
    trainable_params: int
    layer_activation_bytes: int          # saved by one block in the forward (per micro-batch)
    flops_per_micro_step: float          # forward + backward (+ recompute) of one micro-batch (the
                                         # matmul/attention FLOPs torch.utils.flop_counter counts)
    cuda_allocated_peak: int             # allocator replay: rounded blocks
    cuda_reserved_peak: int              # allocator replay: segments
    layers_traced: tuple[int, ...]
    n_layers: int
    largest_tensor_bytes: int = 0
    notes: list[str] = field(default_factory=list)


# ---------------------------------------------------------------- the byte counter

def _dispatch_base():
    from torch.utils._python_dispatch import TorchDispatchMode
    return TorchDispatchMode


class _Counter:
    """Factory for the dispatch-mode byte counter (a class made on first use: keeps torch lazy)."""

    cls = None

    @classmethod
    def make(cls):
        if cls.cls is None:
            import torch
            from torch.utils._pytree import tree_flatten

            class ByteCounter(_dispatch_base()):
                def __init__(self):
                    super().__init__()
                    self.current = 0
                    self.peak = 0
                    self.phase = "build"
                    self.phase_peaks: dict[str, int] = {}
                    self.sizes: dict[int, int] = {}
                    self.events: list[tuple[int, int]] = []   # (key, +bytes) alloc / (key, -bytes) free
                    self.largest = 0
                    self.flops_on = False
                    self.flops = 0.0
                    from torch.utils.flop_counter import flop_registry
                    self.flop_registry = flop_registry

                def add(self, t):
                    try:
                        st = t.untyped_storage()
                    except (RuntimeError, NotImplementedError):
                        return
                    key = id(st)
                    if key in self.sizes:
                        return
                    n = int(st.nbytes())
                    if n == 0:
                        return
                    self.sizes[key] = n
                    self.current += n
                    self.largest = max(self.largest, n)
                    self.events.append((key, n))
                    weakref.finalize(st, self._free, key)

                def _free(self, key):
                    n = self.sizes.pop(key, 0)
                    if n:
                        self.current -= n
                        self.events.append((key, -n))

                def bump(self):
                    self.peak = max(self.peak, self.current)
                    if self.current > self.phase_peaks.get(self.phase, 0):
                        self.phase_peaks[self.phase] = self.current

                def set_phase(self, name):
                    self.phase = name
                    self.phase_peaks[name] = max(self.phase_peaks.get(name, 0), self.current)

                def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                    out = func(*args, **(kwargs or {}))
                    if self.flops_on:   # FlopCounterMode's per-op formulas, without its module tracking
                        fn = self.flop_registry.get(func._overloadpacket)
                        if fn is not None:
                            self.flops += fn(*args, **(kwargs or {}), out_val=out)
                    for t in tree_flatten(out)[0]:
                        if isinstance(t, torch.Tensor):
                            self.add(t)
                    self.bump()
                    return out

            cls.cls = ByteCounter
        return cls.cls()


# ---------------------------------------------------------------- CUDA emulation on the CPU trace

# CUDA autocast policies missing from CPU autocast (aten/src/ATen/autocast_mode.h, torch 2.x).
_CUDA_FP32 = {"acos", "asin", "cosh", "erfinv", "exp", "expm1", "log", "log10", "log2", "log1p",
              "reciprocal", "rsqrt", "sinh", "tan", "pow", "__pow__", "__rpow__", "softplus",
              "layer_norm", "group_norm", "cosine_similarity", "poisson_nll_loss", "cosine_embedding_loss",
              "nll_loss", "hinge_embedding_loss", "kl_div", "l1_loss", "smooth_l1_loss", "huber_loss",
              "mse_loss", "margin_ranking_loss", "multilabel_margin_loss", "soft_margin_loss",
              "triplet_margin_loss", "multi_margin_loss", "binary_cross_entropy_with_logits", "dist",
              "pdist", "cdist", "renorm", "logsumexp"}
_CUDA_FP32_SET_OPT_DTYPE = {"prod", "softmax", "log_softmax", "cumprod", "cumsum", "sum"}


def _cuda_emulation(spec: StepSpec):
    import torch
    import torch.nn.functional as F
    from torch.overrides import TorchFunctionMode

    lowp = {torch.float16, torch.bfloat16}
    sdpa = F.scaled_dot_product_attention

    def to32(x):
        if isinstance(x, torch.Tensor) and x.dtype in lowp:
            return x.float()
        if isinstance(x, (list, tuple)):
            return type(x)(to32(y) for y in x)
        return x

    class CudaEmulation(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            kwargs = dict(kwargs or {})
            if func is F.dropout:
                x = args[0] if args else kwargs.pop("input")
                p = args[1] if len(args) > 1 else kwargs.get("p", 0.5)
                training = args[2] if len(args) > 2 else kwargs.get("training", True)
                if training and 0 < p < 1:
                    return torch.native_dropout(x, p, True)[0]   # CUDA: bool mask saved
                return x
            if func is sdpa:
                # flash / mem-efficient kernels: no T x T matrix, no stored dropout mask.
                kwargs["dropout_p"] = 0.0
                if len(args) > 4:
                    args = tuple(args[:4])
                from torch.nn.attention import SDPBackend, sdpa_kernel
                try:
                    with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
                        return func(*args, **kwargs)
                except RuntimeError:
                    return func(*args, **kwargs)
            if torch.is_autocast_enabled("cpu"):
                name = getattr(func, "__name__", "")
                if name in _CUDA_FP32:
                    return func(*to32(tuple(args)), **{k: to32(v) for k, v in kwargs.items()})
                if name in _CUDA_FP32_SET_OPT_DTYPE and args and isinstance(args[0], torch.Tensor) \
                        and args[0].dtype in lowp and "dtype" not in kwargs:
                    try:
                        return func(*args, dtype=torch.float32, **kwargs)
                    except TypeError:
                        pass
            return func(*args, **kwargs)

    return CudaEmulation()


# ---------------------------------------------------------------- stand-ins for bnb and peft

def _stand_ins():
    import torch
    import torch.nn.functional as F
    from torch import nn

    class Dequant4bitMatmul(torch.autograd.Function):
        """bnb MatMul4Bit for training-sized inputs: dequantize (transient) + linear; saves only
        the packed weight (already resident), backward dequantizes again."""

        @staticmethod
        def forward(ctx, A, packed, bias, out_f, in_f, double_quant, saves_input):
            if double_quant:   # nested absmax dequantized to fp32 first (bnb default impl)
                torch.empty(math.ceil(out_f * in_f / NF4_BLOCK), dtype=torch.float32)
            W = torch.empty((out_f, in_f), dtype=A.dtype)
            out = F.linear(A, W, bias)
            ctx.shape = (out_f, in_f)
            if saves_input:    # bitsandbytes < 0.45: ctx.tensors = (A, B)
                ctx.save_for_backward(packed, A)
            else:
                ctx.save_for_backward(packed)
            return out

        @staticmethod
        def backward(ctx, grad_out):
            W = torch.empty(ctx.shape, dtype=grad_out.dtype)
            return torch.matmul(grad_out, W), None, None, None, None, None, None

    class FourBitLinear(nn.Module):
        """bitsandbytes Linear4bit (nf4): packed uint8 weight + absmax; forward as bnb's."""

        def __init__(self, in_f, out_f, bias, compute_dtype, bias_dtype, double_quant, saves_input=False):
            super().__init__()
            n = in_f * out_f
            self.in_features, self.out_features = in_f, out_f
            self.weight = nn.Parameter(torch.empty(((n + 1) // 2, 1), dtype=torch.uint8), requires_grad=False)
            blocks = math.ceil(n / NF4_BLOCK)
            if double_quant:
                self.register_buffer("absmax", torch.empty(blocks, dtype=torch.uint8))
                self.register_buffer("absmax2", torch.empty(math.ceil(blocks / 256), dtype=torch.float32))
            else:
                self.register_buffer("absmax", torch.empty(blocks, dtype=torch.float32))
            self.bias = nn.Parameter(torch.empty(out_f, dtype=bias_dtype), requires_grad=False) if bias else None
            self.compute_dtype = compute_dtype
            self.double_quant = double_quant
            self.saves_input = saves_input

        def forward(self, x):
            inp_dtype = x.dtype
            x = x.to(self.compute_dtype)
            bias = None if self.bias is None else self.bias.to(self.compute_dtype)
            out = Dequant4bitMatmul.apply(x, self.weight, bias, self.out_features, self.in_features,
                                          self.double_quant, self.saves_input)
            return out.to(inp_dtype)

    class LoraLinear(nn.Module):
        """peft lora.Linear / lora.bnb.Linear4bit forward (peft 0.21), adapters in fp32."""

        def __init__(self, base, in_f, out_f, r, alpha, dropout, quantized, cuda_autocast):
            super().__init__()
            self.base_layer = base
            self.lora_A = nn.Linear(in_f, r, bias=False, dtype=torch.float32)
            self.lora_B = nn.Linear(r, out_f, bias=False, dtype=torch.float32)
            self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
            self.scaling = alpha / r
            self.quantized = quantized
            self.cuda_autocast = cuda_autocast

        def forward(self, x):
            result = self.base_layer(x)
            if self.quantized:
                result = result.clone()   # "defensively clone" (peft lora/bnb.py)
                # peft tests torch.is_autocast_enabled() (the CUDA flag): true on a CUDA target
                requires_conversion = not (self.cuda_autocast or torch.is_autocast_enabled())
                if requires_conversion:
                    expected = result.dtype
                    if x.dtype != self.lora_A.weight.dtype:
                        x = x.to(self.lora_A.weight.dtype)
                out = self.lora_B(self.lora_A(self.lora_dropout(x))) * self.scaling
                if requires_conversion:
                    out = out.to(expected)
                return result + out
            dtype = result.dtype
            if x.dtype != self.lora_A.weight.dtype:
                x = x.to(self.lora_A.weight.dtype)
            result = result + self.lora_B(self.lora_A(self.lora_dropout(x))) * self.scaling
            return result.to(dtype)

    class Adam8bitStandIn(torch.optim.Optimizer):
        """bitsandbytes (Paged)AdamW8bit state layout: uint8 exp_avg/exp_avg_sq + one fp32 absmax
        per 256-element block; 32-bit state under 4,096 elements; qmaps shared. The update itself
        is an in-place CUDA kernel with no temporaries (and opaque on CPU)."""

        def __init__(self, params, paged=False):
            super().__init__(params, {"lr": 1e-3})
            self.paged = paged
            self.qmaps = None

        @torch.no_grad()
        def step(self, closure=None):
            for group in self.param_groups:
                for p in group["params"]:
                    if p.grad is None:
                        continue
                    st = self.state[p]
                    if st or self.paged:
                        continue  # paged state lives in CUDA unified memory, counted by formula
                    st["step"] = 0
                    if p.numel() < EIGHT_BIT_MIN_SIZE:
                        st["state1"] = torch.zeros_like(p, dtype=torch.float32)
                        st["state2"] = torch.zeros_like(p, dtype=torch.float32)
                    else:
                        if self.qmaps is None:
                            self.qmaps = (torch.zeros(256), torch.zeros(256))
                        blocks = math.ceil(p.numel() / EIGHT_BIT_BLOCK)
                        st["state1"] = torch.zeros_like(p, dtype=torch.uint8)
                        st["state2"] = torch.zeros_like(p, dtype=torch.uint8)
                        st["absmax1"] = torch.zeros(blocks, dtype=torch.float32)
                        st["absmax2"] = torch.zeros(blocks, dtype=torch.float32)

    return FourBitLinear, LoraLinear, Adam8bitStandIn


def eight_bit_state_bytes(numels) -> int:
    """bitsandbytes blockwise 8-bit Adam state for tensors of these sizes (see Adam8bitStandIn)."""
    total = 0
    for n in numels:
        if n < EIGHT_BIT_MIN_SIZE:
            total += 8 * n
        else:
            total += 2 * n + 8 * math.ceil(n / EIGHT_BIT_BLOCK)
    return total


# ---------------------------------------------------------------- building the model (fake)

_DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def _dtype(name):
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


def _blocks(model, n_layers: int):
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

    FourBitLinear, LoraLinear, _ = _stand_ins()
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
    torch.set_default_dtype(_dtype(build_dtype))
    try:
        model = cls.from_config(config, dtype=_dtype(build_dtype))
    finally:
        torch.set_default_dtype(prev)
    model.train()

    if lo is not None:
        for p in model.parameters():
            p.requires_grad_(False)
        compute = _dtype(spec.precision if spec.precision != "fp32" else spec.frozen_dtype)
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
    _, _, Adam8bitStandIn = _stand_ins()
    params = [p for p in model.parameters() if p.requires_grad]
    if spec.optimizer == "adamw":
        try:
            from memfit.models.optim import build_optimizer
            return build_optimizer(model, "adamw", 1e-3, 0.0, (0.9, 0.95), spec.device_type)
        except ImportError:
            import torch
            return torch.optim.AdamW(params, lr=1e-3, fused=True)
    return Adam8bitStandIn(params, paged=spec.optimizer == "paged_adamw8bit" and spec.device_type == "cuda")


def _loss_fn(spec: StepSpec):
    import torch.nn.functional as F
    if spec.kind == "causal":
        try:
            from memfit.models.loss import causal_lm_loss
            return causal_lm_loss
        except ImportError:
            pass

        def causal(model, batch):
            logits = model(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask")).logits
            labels = batch["labels"][:, 1:]
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels.flatten(),
                                   reduction="sum", ignore_index=-100)
            return loss, (labels != -100).sum()
        return causal

    def classify(model, batch):   # memfit.jobs.classify's loss
        logits = model(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask")).logits.float()
        return F.cross_entropy(logits, batch["labels"], reduction="none").sum(), batch["labels"].numel()
    return classify


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


# ---------------------------------------------------------------- one trace

def _backward(loss) -> None:
    """loss.backward() without passing through torch-function dispatch: Tensor.backward and
    torch.autograd.backward hand themselves to an active TorchFunctionMode, inside whose handler the
    mode is off, so the CUDA emulation would miss the backward and checkpoint recomputation."""
    import torch
    from torch.autograd.graph import _engine_run_backward
    _engine_run_backward((loss,), (torch.ones_like(loss),), False, False, (),
                         allow_unreachable=True, accumulate_grad=True)


@contextlib.contextmanager
def _packed_batch_masks(spec: StepSpec):
    """transformers skips the 4-D causal mask (SDPA is_causal) when nothing is padded, but treats
    any FakeTensor as 'tracing' and then always builds it; for packed batches (no padding) let it
    see through fake tensors so the trace takes the path the real run takes."""
    if spec.padded:
        yield
        return
    try:
        import transformers.masking_utils as mu
    except ImportError:
        yield
        return
    orig = getattr(mu, "_ignore_causal_mask_sdpa", None)
    if orig is None:
        yield
        return

    def ignore(padding_mask, q_length, kv_length, *args, **kwargs):
        local = kwargs.get("local_attention_size", args[2] if len(args) > 2 else None)
        if padding_mask is None and (q_length == 1 or kv_length == q_length) and (
                local is None or kv_length < local):
            return True   # what the real run decides for an unpadded batch
        return orig(padding_mask, q_length, kv_length, *args, **kwargs)

    orig_packed = getattr(mu, "find_packed_sequence_indices", None)
    mu._ignore_causal_mask_sdpa = ignore
    if orig_packed is not None:   # synthetic rows use plain 0..T-1 positions: not packed
        mu.find_packed_sequence_indices = lambda *a, **k: None
    try:
        yield
    finally:
        mu._ignore_causal_mask_sdpa = orig
        if orig_packed is not None:
            mu.find_packed_sequence_indices = orig_packed


def _trace_once(spec: StepSpec, n_layers: int, count_flops: bool = True, real: bool = False,
                full_first_step: bool = True) -> TraceResult:
    """One traced run; real=True runs the same code on real tensors (tests compare the two)."""
    import torch
    from torch._subclasses.fake_tensor import FakeTensorMode

    counter = _Counter.make()
    emulate = _cuda_emulation(spec) if spec.device_type == "cuda" else contextlib.nullcontext()
    lowp = None if spec.precision == "fp32" else _dtype(spec.precision)
    vocab = int(spec.model_config.vocab_size)
    flops = 0.0
    layer_deltas: list[int] = []
    notes: list[str] = []
    fake = contextlib.nullcontext() if real else FakeTensorMode(allow_non_fake_inputs=True)
    with _packed_batch_masks(spec), fake, counter, emulate:
        model = build_model(spec, n_layers)
        opt = make_optimizer(model, spec)
        loss_fn = _loss_fn(spec)
        params = [p for p in model.parameters() if p.requires_grad]
        total_params = sum(p.numel() for p in model.parameters())
        trainable = sum(p.numel() for p in params)
        param_bytes = counter.current
        resident = list(counter.sizes.items())    # weights, in allocation order (allocator replay)
        train_start = len(counter.events)
        scale = torch.full((), 65536.0) if spec.precision == "fp16" else None
        counter.peak = counter.current
        counter.phase_peaks.clear()

        # per-block saved activations (forward of step 2, first micro-batch)
        marks = {}

        def pre(mod, *a, **k):
            if counter.phase == "s2.fwd" and marks.get("on"):
                marks[id(mod)] = counter.current

        def post(mod, *a, **k):
            if counter.phase == "s2.fwd" and marks.get("on") and id(mod) in marks:
                layer_deltas.append(counter.current - marks.pop(id(mod)))

        hooks = []
        for blk in _blocks(model, n_layers):
            hooks.append(blk.register_forward_pre_hook(pre))
            hooks.append(blk.register_forward_hook(post))

        micro = min(spec.micro_steps, 2)

        def optimizer_step():
            grads = [p.grad for p in params if p.grad is not None]
            if scale is not None and grads:
                found_inf = torch.zeros(1)
                torch._amp_foreach_non_finite_check_and_unscale_(grads, found_inf, torch.ones(()))
            if grads:  # the loop always clips (max_norm inf when --max-grad-norm 0)
                torch.nn.utils.clip_grad_norm_([p for p in params if p.grad is not None],
                                               spec.max_grad_norm or math.inf)
            del grads
            opt.step()
            opt.zero_grad(set_to_none=spec.zero_grad_to_none)

        def forward_backward(step: int):
            for m in range(micro):
                counter.set_phase(f"s{step}.fwd")
                marks["on"] = step == 2 and m == 0
                counter.flops_on = count_flops and step == 2 and m == 0
                batch = synthetic_batch(spec, vocab)
                ac = torch.autocast("cpu", dtype=lowp) if lowp is not None else contextlib.nullcontext()
                with ac:
                    loss_sum, count = loss_fn(model, batch)
                counter.set_phase(f"s{step}.bwd")
                loss = loss_sum.float() * (1.0 / max(1, spec.tokens))
                if scale is not None:
                    loss = loss * scale
                _backward(loss)
                counter.flops_on = False
                del loss, loss_sum, count, batch

        # Step 1: its forward/backward never sets the peak (it is step 2's without optimizer state)
        # but it shapes the caching allocator's segments before the state is allocated, so it is
        # traced when `full_first_step`; otherwise zero gradients of the right shapes stand in.
        if full_first_step:
            forward_backward(1)
        else:
            counter.set_phase("s1.opt")
            for p in params:
                p.grad = torch.zeros_like(p)
        grad_bytes = sum(p.grad.untyped_storage().nbytes() for p in params if p.grad is not None)
        counter.set_phase("s1.opt")
        optimizer_step()
        state_bytes = sum(v.untyped_storage().nbytes() for st in opt.state.values()
                          for v in st.values() if isinstance(v, torch.Tensor))
        if getattr(opt, "qmaps", None):
            state_bytes += 2 * 256 * 4
        # Step 2: the steady state (steps 2, 3, ... repeat it), every micro-batch traced.
        forward_backward(2)
        flops = counter.flops
        counter.set_phase("s2.opt")
        optimizer_step()
        for h in hooks:
            h.remove()
        paged = 0
        if spec.optimizer == "paged_adamw8bit" and spec.device_type == "cuda":
            paged = eight_bit_state_bytes(p.numel() for p in params)
        phase_peaks = dict(counter.phase_peaks)
        peak = counter.peak
        largest = counter.largest
        events = counter.events[train_start:]
        model = opt = params = None   # drop the fake model inside the mode

    from memfit.plan.allocator import replay
    alloc_peak, reserved_peak = replay(events, resident)
    peak_phase = max(phase_peaks, key=phase_peaks.get) if phase_peaks else "s2.fwd"
    layer_act = int(statistics.median(layer_deltas)) if layer_deltas else 0
    return TraceResult(
        peak_bytes=peak, phase_peaks=phase_peaks, peak_phase=peak_phase, param_bytes=param_bytes,
        grad_bytes=grad_bytes, state_bytes=state_bytes + paged, paged_state_bytes=paged,
        total_params=total_params, trainable_params=trainable, layer_activation_bytes=layer_act,
        flops_per_micro_step=flops, cuda_allocated_peak=alloc_peak, cuda_reserved_peak=reserved_peak,
        layers_traced=(n_layers,), n_layers=n_layers, largest_tensor_bytes=largest, notes=notes)


def _extrapolate(a: TraceResult, b: TraceResult, L: int) -> TraceResult:
    """Linear in the layer count from traces with la < lb layers."""
    la, lb = a.n_layers, b.n_layers

    def lin(x, y):
        return int(round(x + (y - x) * (L - la) / (lb - la)))

    phases = {k: lin(a.phase_peaks.get(k, 0), b.phase_peaks.get(k, 0)) for k in b.phase_peaks}
    peak_phase = max(phases, key=phases.get)
    peak = phases[peak_phase]
    alloc = max(lin(a.cuda_allocated_peak, b.cuda_allocated_peak), peak)
    reserved = max(lin(a.cuda_reserved_peak, b.cuda_reserved_peak), alloc)
    return TraceResult(
        peak_bytes=peak, phase_peaks=phases, peak_phase=peak_phase, param_bytes=lin(a.param_bytes, b.param_bytes),
        grad_bytes=lin(a.grad_bytes, b.grad_bytes), state_bytes=lin(a.state_bytes, b.state_bytes),
        paged_state_bytes=lin(a.paged_state_bytes, b.paged_state_bytes),
        total_params=lin(a.total_params, b.total_params), trainable_params=lin(a.trainable_params, b.trainable_params),
        layer_activation_bytes=b.layer_activation_bytes,
        flops_per_micro_step=a.flops_per_micro_step + (b.flops_per_micro_step - a.flops_per_micro_step) * (L - la) / (lb - la),
        cuda_allocated_peak=alloc, cuda_reserved_peak=reserved, layers_traced=(la, lb), n_layers=L,
        largest_tensor_bytes=max(a.largest_tensor_bytes, b.largest_tensor_bytes),
        notes=b.notes + [f"traced {la} and {lb} layers, extrapolated to {L}"])


def trace_plan(spec: StepSpec, count_flops: bool = True) -> TraceResult:
    """Trace the training step of `spec` (optimizer state created, then a steady step) without real memory.
    Planning runs before training: the torch RNG is left exactly as it was."""
    import torch
    rng = torch.get_rng_state()
    try:
        return _trace_plan(spec, count_flops)
    finally:
        torch.set_rng_state(rng)


def _trace_plan(spec: StepSpec, count_flops: bool) -> TraceResult:
    L = spec.n_layers
    if L <= FULL_TRACE_MAX_LAYERS:
        return _trace_once(spec, L, count_flops)
    # Not 1 and 2: the first block differs from the rest (its input comes from the embeddings, which
    # need no gradient under LoRA), so blocks 2..L are the homogeneous ones to extrapolate from.
    # The first step's forward/backward is skipped here (see _trace_once): it never sets the tensor
    # peak, only the allocator's segment history, and it would double the time of a 7B plan.
    a = _trace_once(spec, 2, count_flops, full_first_step=False)
    b = _trace_once(spec, 3, count_flops, full_first_step=False)
    return _extrapolate(a, b, L)
