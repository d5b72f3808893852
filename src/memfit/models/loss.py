"""What one step computes: the losses memfit trains with, each returning (loss sum, count).

Used by the training loop (train/step.accumulate), by the planner's trace and by pre-flight, so all
three run the same math. A loss declares its count before any forward with a `count(batch)` attribute,
which lets the step divide before backward (train/step.py says why).
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from memfit.models.chunked_ce import linear_cross_entropy, shifted_labels
from memfit.models.heads import chunkable_head, head_bypassed

Batch = dict[str, torch.Tensor]
LossFn = Callable[[torch.nn.Module, Batch], tuple[torch.Tensor, torch.Tensor | int]]


def lm_inputs(batch: Batch) -> dict[str, torch.Tensor | bool | None]:
    """The model's keyword arguments for a causal-LM batch. A packed batch (data/packing.py) gives
    position_ids and no attention_mask: transformers then masks block-diagonally, one block per example
    (its attention_mask only marks the padded tail for the meter). No cache, or the packing is ignored."""
    if "position_ids" in batch:
        return {"input_ids": batch["input_ids"], "position_ids": batch["position_ids"], "use_cache": False}
    return {"input_ids": batch["input_ids"], "attention_mask": batch.get("attention_mask")}


def plain_causal_lm_loss(model: torch.nn.Module, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of next-token cross-entropy over label tokens, number of label tokens), from the model's
    whole logits (what --no-chunked-loss trains with, and the fallback of causal_lm_loss)."""
    logits = model(**lm_inputs(batch)).logits
    labels = batch["labels"][:, 1:]
    # fp32 log-softmax: in bf16/fp16 the loss over an 8k-50k vocab loses digits that the gradient needs.
    loss_sum = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels.flatten(),
                               reduction="sum", ignore_index=-100)
    return loss_sum, (labels != -100).sum()


def causal_lm_loss(model: torch.nn.Module, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    """The same (loss sum, label tokens) as plain_causal_lm_loss, and the same gradients, without the
    micro-batch's logits: the model runs with its LM head bypassed (its forward returns the final
    hidden states) and models/chunked_ce.py applies the head chunk by chunk. Models where that would not
    be exact (see chunkable_head) take the plain path."""
    head = chunkable_head(model)
    if head is None:
        return plain_causal_lm_loss(model, batch)
    with head_bypassed(head):
        hidden = model(**lm_inputs(batch)).logits
    labels = shifted_labels(batch["labels"])
    loss_sum = linear_cross_entropy(hidden, head.weight, head.bias, labels)
    return loss_sum, (labels != -100).sum()      # (shifted_labels' extra last column is -100)


def label_token_count(batch: Batch) -> int | None:
    """Tokens the causal-LM loss is taken on, known before any forward (None if not an LM batch)."""
    labels = batch.get("labels")
    if labels is None or labels.dim() != 2:
        return None
    return int((labels[:, 1:] != -100).sum())


causal_lm_loss.count = label_token_count   # type: ignore[attr-defined]
plain_causal_lm_loss.count = label_token_count   # type: ignore[attr-defined]


def lm_loss(chunked: bool = True) -> LossFn:
    """The causal-LM training loss: chunked (the default) or plain (--no-chunked-loss)."""
    return causal_lm_loss if chunked else plain_causal_lm_loss


def classification_loss(class_weights: torch.Tensor | None = None) -> LossFn:
    """Sequence classification: (sum of per-row cross-entropy, optionally class-weighted; rows)."""
    def loss_fn(model: torch.nn.Module, batch: Batch) -> tuple[torch.Tensor, int]:
        logits = model(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask")).logits.float()
        ce = F.cross_entropy(logits, batch["labels"], reduction="none")
        if class_weights is not None:
            ce = ce * class_weights.to(ce.device)[batch["labels"]]
        return ce.sum(), batch["labels"].numel()
    loss_fn.count = lambda batch: batch["labels"].numel()   # type: ignore[attr-defined]
    return loss_fn
