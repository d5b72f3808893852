"""Cross-entropy through the LM head without the [B, T, V] logits: chunk by chunk of rows.

The plain causal-LM loss materialises the whole micro-batch's logits, then an fp32 copy, then the
fp32 log-softmax that autograd saves: 12 bytes per logit at least (SmolLM2's 49k vocabulary at 4k
tokens is 2.4 GB), the T4 long-context failure. Here the head's matmul, the fp32 log-softmax and the
gradient are done for `chunk` rows at a time; only one chunk's logits are ever alive.

The gradient is computed in the forward (as Liger Kernel's fused linear cross-entropy does), while the
chunk's logits are at hand: d loss / d logits = softmax - one_hot is all the backward needs, so
recomputing the logits in backward (torchtune-style checkpointing) would cost one more head matmul per
chunk for nothing. The forward keeps dL/dhidden (fp32, [N, H]) and dL/dweight (fp32, [V, H], only when
the head trains); the backward scales them by the incoming gradient (the loop's 1/token-count and the
GradScaler's scale), in place. Under no_grad (evaluation) only the loss is computed.

Precision follows the plain path exactly: the head's matmul runs in the autocast dtype when autocast
is on (else the weight's), the log-softmax and loss in fp32, the logits' gradient is cast back to
the matmul dtype for the two gradient matmuls (what autograd does through `.float()`); the weight
gradient is summed over chunks in fp32. Nothing reads a value on the host (no sync, fake-tensor safe).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE = -100
CHUNK_LOGIT_BYTES = 32 << 20   # fp32 logits of one chunk: big enough for efficient matmuls


def chunk_rows(rows: int, vocab: int) -> int:
    """Rows per chunk: one chunk's fp32 logits within CHUNK_LOGIT_BYTES (at least 1 row)."""
    return max(1, min(rows, CHUNK_LOGIT_BYTES // (4 * max(vocab, 1))))


def _matmul_dtype(hidden: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    dev = hidden.device.type
    if torch.is_autocast_enabled(dev):
        return torch.get_autocast_dtype(dev)
    return weight.dtype


class LinearCrossEntropy(torch.autograd.Function):
    """sum over rows with label != -100 of CE(hidden @ weight.T + bias, label); hidden [N, H]."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, chunk):   # noqa: D102 - see the class
        dt = _matmul_dtype(hidden, weight)
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        need_b = bias is not None and ctx.needs_input_grad[2]
        with torch.autocast(hidden.device.type, enabled=False):
            w = weight.to(dt)
            b = bias.to(dt) if bias is not None else None
            h = hidden.to(dt)
            n = h.shape[0]
            total = torch.zeros((), dtype=torch.float32, device=h.device)
            grad_h = torch.empty(hidden.shape, dtype=torch.float32, device=h.device) if need_h else None
            grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=h.device) if need_w else None
            grad_b = torch.zeros(bias.shape, dtype=torch.float32, device=h.device) if need_b else None
            for s in range(0, n, chunk):
                hc, yc = h[s:s + chunk], labels[s:s + chunk]
                logits = F.linear(hc, w, b).float()                  # [c, V] fp32, as `.float()` does
                lse = torch.logsumexp(logits, dim=-1)
                valid = yc != IGNORE
                safe = torch.where(valid, yc, torch.zeros_like(yc)).unsqueeze(1)
                picked = logits.gather(1, safe).squeeze(1)
                total = total + torch.where(valid, lse - picked, torch.zeros_like(lse)).sum()
                if not (need_h or need_w or need_b):
                    continue
                g = logits.sub_(lse.unsqueeze(1)).exp_()             # softmax, in the logits' buffer
                g.scatter_add_(1, safe, torch.full_like(picked, -1.0).unsqueeze(1))
                g.mul_(valid.unsqueeze(1))
                if need_b:
                    grad_b += g.sum(0)
                gd = g.to(dt)
                if need_h:
                    grad_h[s:s + chunk] = gd @ w
                if need_w:
                    if dt == torch.float32:
                        grad_w.addmm_(gd.t(), hc)
                    else:
                        grad_w += (gd.t() @ hc).float()
                del logits, g, gd
        ctx.grads = (grad_h, grad_w, grad_b)
        ctx.dtypes = (hidden.dtype, weight.dtype, bias.dtype if bias is not None else None)
        return total

    @staticmethod
    def backward(ctx, grad_out):   # noqa: D102
        grads, dtypes = ctx.grads, ctx.dtypes
        ctx.grads = None           # free with the graph's first use, not when the graph dies
        out = []
        for g, dt in zip(grads, dtypes):
            out.append(None if g is None else g.mul_(grad_out).to(dt))
        return out[0], out[1], out[2], None, None


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                         labels: torch.Tensor, chunk: int | None = None) -> torch.Tensor:
    """Summed CE of `hidden` [..., H] through the head (weight [V, H]) against `labels` [...]
    (-100 ignored), fp32, never holding more than `chunk` rows of logits (default: chunk_rows)."""
    h = hidden.reshape(-1, hidden.shape[-1])
    y = labels.reshape(-1)
    return LinearCrossEntropy.apply(h, weight, bias, y, chunk or chunk_rows(h.shape[0], weight.shape[0]))


def shifted_labels(labels: torch.Tensor) -> torch.Tensor:
    """Next-token targets aligned with every position: labels[:, 1:] and -100 for the last one, so the
    hidden states are used whole (a view) instead of copying hidden[:, :-1]."""
    pad = torch.full_like(labels[:, :1], IGNORE)
    return torch.cat([labels[:, 1:], pad], dim=1)
