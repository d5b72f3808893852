"""Validation loss / perplexity, the unigram baseline, and sample generations."""

from __future__ import annotations

import math
from typing import Iterable

import torch

from memfit.train.oom import OOMController
from memfit.train.precision import Precision
from memfit.train.step import Batch, causal_lm_loss, micro_batches


@torch.no_grad()
def evaluate_loss(model: torch.nn.Module, batches: Iterable[Batch], precision: Precision,
                  micro_batch_size: int, max_batches: int = 0, device: torch.device | str = "cpu",
                  loss_fn=causal_lm_loss, oom: OOMController | None = None,
                  step: int | None = None) -> dict[str, float]:
    """Token-weighted mean loss over `batches` (all of them when max_batches == 0).

    With `oom` (the evaluation's own controller) the micro-batch is the controller's, and an OOM
    shrinks it and redoes that batch (its sums are only added once it completes), so the result is
    the same and training's micro-batch is untouched. `step` labels the history events.
    """
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    try:
        for i, batch in enumerate(batches):
            if max_batches and i >= max_batches:
                break
            if oom is None:
                s, n = _batch_loss(model, batch, micro_batch_size, precision, device, loss_fn)
            else:
                s, n = oom.run(step, None, None, lambda mbs, batch=batch: _batch_loss(
                    model, batch, mbs, precision, device, loss_fn, check=oom.check), what="eval")
            total += s
            count += n
    finally:
        model.train(was_training)
    loss = total / max(count, 1)
    return {"val_loss": loss, "val_ppl": math.exp(min(loss, 50.0)), "val_tokens": count}


def _batch_loss(model, batch: Batch, micro_batch_size: int, precision: Precision, device, loss_fn,
                check=None) -> tuple[float, int]:
    """(loss sum, label tokens) of one batch, evaluated micro-batch by micro-batch."""
    total, count = 0.0, 0
    for mb in micro_batches(batch, micro_batch_size):
        if check is not None:
            check(mb)   # the OOM controller's fault-injection hook
        mb = {k: v.to(device) for k, v in mb.items()}
        with precision.autocast():
            s, n = loss_fn(model, mb)
        total += float(s)
        count += int(n)
    return total, count


def unigram_baseline(train_docs: Iterable, val_batches: Iterable[Batch],
                     vocab_size: int) -> dict[str, float]:
    """Perplexity of an add-one (Laplace) unigram model fitted on the training tokens (arrays of token
    ids, one per document), scored on exactly the label tokens the LM's validation loss uses: a floor
    any trained LM must beat by a wide margin."""
    counts = torch.zeros(vocab_size, dtype=torch.float64)
    n = 0
    for ids in train_docs:
        ids = torch.as_tensor(ids, dtype=torch.long)
        counts += torch.bincount(ids, minlength=vocab_size)[:vocab_size].double()
        n += ids.numel()
    logp = torch.log((counts + 1) / (n + vocab_size))
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
                  device: torch.device | str = "cpu", oom: OOMController | None = None,
                  step: int | None = None) -> str:
    """Greedy continuation (greedy draws no random numbers, so sampling never perturbs training RNG).

    With `oom` (the evaluation's controller) an OOM shortens the sample instead of ending the run:
    half the new tokens, down to none ("[no sample: out of memory]")."""
    was_training = model.training
    model.eval()
    try:
        enc = tokenizer(prompt, return_tensors="pt").to(device)
        if enc["input_ids"].shape[1] == 0:
            enc = {"input_ids": torch.tensor([[tokenizer.eos_token_id]], device=device)}

        def run(n: int):
            return model.generate(**enc, max_new_tokens=n, do_sample=False,
                                  pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id,
                                  repetition_penalty=1.3)
        if oom is None:
            out = run(max_new_tokens)
        else:
            out = oom.generate(step, run, max_new_tokens, prompt_tokens=int(enc["input_ids"].shape[1]))
            if out is None:
                return "[no sample: out of memory]"
        return tokenizer.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    finally:
        model.train(was_training)
