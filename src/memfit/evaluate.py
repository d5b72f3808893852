"""Validation loss / perplexity, the unigram baseline, and sample generations."""

from __future__ import annotations

import math
from collections import Counter
from typing import Iterable

import torch

from memfit.train.precision import Precision
from memfit.train.step import Batch, causal_lm_loss, micro_batches


@torch.no_grad()
def evaluate_loss(model: torch.nn.Module, batches: Iterable[Batch], precision: Precision,
                  micro_batch_size: int, max_batches: int = 0, device: torch.device | str = "cpu",
                  loss_fn=causal_lm_loss) -> dict[str, float]:
    """Token-weighted mean loss over `batches` (all of them when max_batches == 0)."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    try:
        for i, batch in enumerate(batches):
            if max_batches and i >= max_batches:
                break
            for mb in micro_batches(batch, micro_batch_size):
                mb = {k: v.to(device) for k, v in mb.items()}
                with precision.autocast():
                    s, n = loss_fn(model, mb)
                total += float(s)
                count += int(n)
    finally:
        model.train(was_training)
    loss = total / max(count, 1)
    return {"val_loss": loss, "val_ppl": math.exp(min(loss, 50.0)), "val_tokens": count}


def unigram_baseline(train_batches: Iterable[Batch], val_batches: Iterable[Batch],
                     vocab_size: int) -> dict[str, float]:
    """Perplexity of an add-one (Laplace) unigram model fitted on the training tokens: a floor any
    trained LM must beat by a wide margin. Counts the same label tokens the LM loss is taken on."""
    counts: Counter[int] = Counter()
    n = 0
    for b in train_batches:
        lab = b["labels"][:, 1:]
        ids = lab[lab != -100]
        counts.update(ids.tolist())
        n += ids.numel()
    logp = torch.full((vocab_size,), math.log(1.0 / (n + vocab_size)), dtype=torch.float64)
    for tok, c in counts.items():
        logp[tok] = math.log((c + 1) / (n + vocab_size))
    nll, m = 0.0, 0
    for b in val_batches:
        lab = b["labels"][:, 1:]
        ids = lab[lab != -100]
        nll -= float(logp[ids].sum())
        m += ids.numel()
    loss = nll / max(m, 1)
    return {"unigram_loss": loss, "unigram_ppl": math.exp(loss), "train_tokens": n, "val_tokens": m}


@torch.no_grad()
def generate_text(model, tokenizer, prompt: str, max_new_tokens: int = 40,
                  device: torch.device | str = "cpu") -> str:
    """Greedy continuation (greedy draws no random numbers, so sampling never perturbs training RNG)."""
    was_training = model.training
    model.eval()
    try:
        enc = tokenizer(prompt, return_tensors="pt").to(device)
        if enc["input_ids"].shape[1] == 0:
            enc = {"input_ids": torch.tensor([[tokenizer.eos_token_id]], device=device)}
        out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id,
                             repetition_penalty=1.3)
        return tokenizer.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    finally:
        model.train(was_training)
