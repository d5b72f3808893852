"""The modes a trace runs under: the byte counter (a TorchDispatchMode counting live storage bytes and
FLOPs), the CUDA emulation on the CPU trace (autocast fp32 policy, bool dropout masks, flash SDPA), a
backward that the emulation sees, and the packed-batch mask patch. torch is imported when a trace runs.
"""

from __future__ import annotations

import contextlib
import weakref

from memfit.plan.spec import StepSpec

# ---------------------------------------------------------------- the byte counter

def _dispatch_base():
    from torch.utils._python_dispatch import TorchDispatchMode
    return TorchDispatchMode


class Counter:
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


def cuda_emulation(spec: StepSpec):
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


def backward(loss) -> None:
    """loss.backward() without passing through torch-function dispatch: Tensor.backward and
    torch.autograd.backward hand themselves to an active TorchFunctionMode, inside whose handler the
    mode is off, so the CUDA emulation would miss the backward and checkpoint recomputation."""
    import torch
    from torch.autograd.graph import _engine_run_backward
    _engine_run_backward((loss,), (torch.ones_like(loss),), False, False, (),
                         allow_unreachable=True, accumulate_grad=True)


@contextlib.contextmanager
def packed_batch_masks(spec: StepSpec):
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
