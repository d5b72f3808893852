"""One optimizer step's worth of forward/backward: split an effective batch, accumulate gradients.

Normalisation is by token count, not by the number of micro-batches: each micro-batch's backward
gets `loss_sum / n`, where n counts the label tokens of the WHOLE effective batch. The summed
gradient is then exactly the gradient of the mean over all tokens, however the rows are split
(averaging per-micro-batch means would over-weight short micro-batches).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from memfit.train.precision import Precision

Batch = dict[str, torch.Tensor]
LossFn = Callable[[torch.nn.Module, Batch], tuple[torch.Tensor, torch.Tensor | int]]


def causal_lm_loss(model: torch.nn.Module, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of next-token cross-entropy over label tokens, number of label tokens)."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask")).logits
    labels = batch["labels"][:, 1:]
    # fp32 log-softmax: in bf16/fp16 the loss over an 8k-50k vocab loses digits that the gradient needs.
    loss_sum = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels.flatten(),
                               reduction="sum", ignore_index=-100)
    return loss_sum, (labels != -100).sum()


def label_token_count(batch: Batch) -> int | None:
    """Tokens the causal-LM loss is taken on, known before any forward (None if not an LM batch)."""
    labels = batch.get("labels")
    if labels is None or labels.dim() != 2:
        return None
    return int((labels[:, 1:] != -100).sum())


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

    @property
    def loss(self) -> float:
        return self.loss_sum / max(self.tokens, 1)


def accumulate(model: torch.nn.Module, batch: Batch, micro_batch_size: int, precision: Precision,
               scaler: torch.amp.GradScaler, loss_fn: LossFn = causal_lm_loss,
               device: torch.device | str = "cpu",
               before_micro: Callable[[Batch], None] | None = None) -> StepStats:
    """Forward/backward every micro-batch of one effective batch into the parameters' .grad.

    When the token count is not known up front (a user loss), each backward gets the raw sum and
    the gradients are divided by the total count afterwards — the same result, one extra pass.
    """
    denom = label_token_count(batch) if loss_fn is causal_lm_loss else None
    stats = StepStats()
    for mb in micro_batches(batch, micro_batch_size):
        if before_micro is not None:
            before_micro(mb)  # the OOM controller's fault-injection hook
        mb = {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in mb.items()}
        with precision.autocast():
            loss_sum, count = loss_fn(model, mb)
        scale = 1.0 / denom if denom else 1.0
        scaler.scale(loss_sum.float() * scale).backward()
        stats.loss_sum += float(loss_sum.detach())
        stats.tokens += int(count)
        stats.micro_steps += 1
        stats.rows += batch_rows(mb)
    if not denom and stats.tokens > 0:
        for p in model.parameters():
            if p.grad is not None:
                p.grad.div_(stats.tokens)
    return stats
