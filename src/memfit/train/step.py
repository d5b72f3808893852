"""One optimizer step's worth of forward/backward: split an effective batch, accumulate gradients.

Normalisation is by token count, not by the number of micro-batches: each micro-batch's backward
gets `loss_sum / n`, where n counts the label tokens of the WHOLE effective batch. The summed
gradient is then exactly the gradient of the mean over all tokens, however the rows are split
(averaging per-micro-batch means would over-weight short micro-batches).

The division happens BEFORE backward for every loss, not after: under fp16 the GradScaler's scale
multiplies what backward sees, so a backward of the raw sum carries gradients n times larger and
overflows at a scale where the mean does not (every step skipped until the scale has fallen by n).
A loss declares its count up front with a `count(batch)` attribute (causal_lm_loss, classify's loss);
otherwise n is estimated from the first micro-batch's count and corrected after the last one.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, ContextManager

import torch

from memfit.models.loss import Batch, LossFn, causal_lm_loss
from memfit.precision import Precision


def declared_count(loss_fn: LossFn, batch: Batch) -> int | None:
    """The count `loss_fn` will return for the whole effective batch, if it says so before any forward."""
    count = getattr(loss_fn, "count", None)
    return count(batch) if callable(count) else None


def batch_rows(batch: Batch) -> int:
    return next(iter(batch.values())).shape[0]


def micro_batches(batch: Batch, size: int) -> list[Batch]:
    """Rows [0:size], [size:2size], ... (the last may be smaller); trailing all-padding columns are cut
    per micro-batch so a padded fine-tuning batch costs only its longest row."""
    rows = batch_rows(batch)
    out = []
    for start in range(0, rows, size):
        mb = {k: v[start:start + size] for k, v in batch.items()}
        mask = mb.get("attention_mask")
        if mask is not None and mask.dim() == 2 and mask.shape[1] > 1:
            keep = int(mask.any(dim=0).nonzero().max()) + 1 if mask.any() else 1
            if keep < mask.shape[1]:
                mb = {k: (v[:, :keep] if v.dim() == 2 and v.shape[1] == mask.shape[1] else v)
                      for k, v in mb.items()}
        out.append(mb)
    return out


@dataclass
class StepStats:
    loss_sum: float = 0.0
    tokens: int = 0
    micro_steps: int = 0
    rows: int = 0
    denom: float = 0.0     # what each backward divided by (the global count under DDP)

    @property
    def loss(self) -> float:
        return self.loss_sum / max(self.tokens, 1)


def accumulate(model: torch.nn.Module, batch: Batch, micro_batch_size: int, precision: Precision,
               scaler: torch.amp.GradScaler, loss_fn: LossFn = causal_lm_loss,
               device: torch.device | str = "cpu",
               before_micro: Callable[[Batch], None] | None = None, count: int | None = None,
               micro_context: Callable[[], ContextManager] | None = None) -> StepStats:
    """Forward/backward every micro-batch of one effective batch into the parameters' .grad.

    Each backward gets `loss_sum / n`, n the effective batch's count. A loss without a declared count
    gets n estimated from its first micro-batch (count x rows / its rows: exact when the count is per
    row, as in classification); if the counts returned add up to something else, the gradients are
    rescaled once by estimate / actual at the end, so the result is the same mean either way.

    On N ranks (train/ddp.py) `batch` is this rank's shard, `count` the global batch's declared count,
    `micro_context` DDP's no_sync; the estimate's correction is then left to the caller, which knows
    the global count only after the ranks have agreed the step (train.ddp.DistTraining.reduce_step).
    """
    distributed = micro_context is not None
    denom: float | None = count if distributed else declared_count(loss_fn, batch)
    total_rows = batch_rows(batch)
    stats = StepStats()
    for mb in micro_batches(batch, micro_batch_size):
        if before_micro is not None:
            before_micro(mb)  # the OOM controller's fault-injection hook
        rows = batch_rows(mb)
        mb = {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in mb.items()}
        with micro_context() if distributed else contextlib.nullcontext():
            with precision.autocast():
                loss_sum, n = loss_fn(model, mb)
            n = int(n)
            if denom is None:   # first micro-batch of an undeclared count: per row as in this one
                denom = n * total_rows / rows if n > 0 else float(total_rows)
            scale = 1.0 / denom if denom else 1.0
            scaler.scale(loss_sum.float() * scale).backward()
        stats.loss_sum += float(loss_sum.detach())
        stats.tokens += n
        stats.micro_steps += 1
        stats.rows += rows
    stats.denom = float(denom or 0.0)
    if not distributed and denom and stats.tokens > 0 and denom != stats.tokens:
        fix = denom / stats.tokens     # the estimate was off (counts not proportional to rows)
        for p in model.parameters():
            if p.grad is not None:
                p.grad.mul_(fix)
    return stats
