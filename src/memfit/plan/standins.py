"""Stand-ins for what does not run on fake tensors: bitsandbytes' 4-bit linear (nf4) and 8-bit AdamW, and
peft's LoRA linear. Each allocates exactly the tensors the real one does (state, packed weights, the
transient dequantized weight of bnb's MatMul4Bit in forward and backward) and computes the same forward,
so the trace counts the real run's bytes. Imported by plan/tracemodel.py when a trace runs (torch here).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from memfit.plan.analytic import EIGHT_BIT_BLOCK, EIGHT_BIT_MIN_SIZE, NF4_BLOCK


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
