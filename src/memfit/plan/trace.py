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

Modules: tracemodes (the byte counter and the CUDA emulation), tracemodel (the model, optimizer, loss and
batch the trace trains), standins (bitsandbytes / peft stand-ins), allocator (the caching-allocator replay).
"""

from __future__ import annotations

import contextlib
import math
import statistics
from dataclasses import dataclass, field

from memfit.plan.analytic import eight_bit_state_bytes
from memfit.plan.spec import StepSpec
from memfit.plan.tracemodel import blocks, build_model, dtype_of, loss_fn_for, make_optimizer, synthetic_batch
from memfit.plan.tracemodes import Counter, backward, cuda_emulation, packed_batch_masks

FULL_TRACE_MAX_LAYERS = 5   # deeper models: trace 2 and 3 layers and extrapolate


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


# ---------------------------------------------------------------- one trace

def _trace_once(spec: StepSpec, n_layers: int, count_flops: bool = True, real: bool = False,
                full_first_step: bool = True) -> TraceResult:
    """One traced run; real=True runs the same code on real tensors (tests compare the two)."""
    import torch
    from torch._subclasses.fake_tensor import FakeTensorMode

    counter = Counter.make()
    emulate = cuda_emulation(spec) if spec.device_type == "cuda" else contextlib.nullcontext()
    lowp = None if spec.precision == "fp32" else dtype_of(spec.precision)
    vocab = int(spec.model_config.vocab_size)
    flops = 0.0
    layer_deltas: list[int] = []
    notes: list[str] = []
    fake = contextlib.nullcontext() if real else FakeTensorMode(allow_non_fake_inputs=True)
    with packed_batch_masks(spec), fake, counter, emulate:
        model = build_model(spec, n_layers)
        opt = make_optimizer(model, spec)
        loss_fn = loss_fn_for(spec)
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
        for blk in blocks(model, n_layers):
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
                backward(loss)
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
