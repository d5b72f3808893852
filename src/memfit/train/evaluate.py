"""THE evaluation (OOM-safe, for every job kind and memfit.fit), validation loss / perplexity, the unigram
baseline, and sample generations."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

import torch

from memfit.models.loss import LossFn, causal_lm_loss
from memfit.precision import Precision
from memfit.train.oom import OOMController
from memfit.train.step import Batch, micro_batches

if TYPE_CHECKING:
    from memfit.train.job import Job


# One micro-batch's contribution to an evaluation: numbers are summed over the evaluation, lists joined
# (a loss sum and its count; a classifier's predictions).
Score = Callable[[torch.nn.Module, Batch], dict[str, Any]]


def loss_score(loss_fn: LossFn = causal_lm_loss) -> Score:
    """A training loss as a Score: its sum and the count it covers (token-weighted, like training)."""
    def score(model: torch.nn.Module, mb: Batch) -> dict[str, Any]:
        s, n = loss_fn(model, mb)
        return {"loss_sum": float(s), "count": int(n)}
    return score


@torch.no_grad()
def evaluate_batches(model: torch.nn.Module, batches: Iterable[Batch], precision: Precision,
                     micro_batch_size: int, score: Score, max_batches: int = 0,
                     device: torch.device | str = "cpu", oom: OOMController | None = None,
                     step: int | None = None, stop: Callable[[], bool] | None = None) -> tuple[dict, int]:
    """THE evaluation loop, for every job kind and memfit.fit: `score` summed over every micro-batch of
    `batches` (all of them when max_batches == 0; fewer when `stop()` says so before a batch, e.g. the
    deadline). Returns (totals, batches done).

    With `oom` (the evaluation's own controller) the micro-batch is the controller's, and an OOM
    shrinks it and redoes that batch (its scores are only added once it completes), so the result is
    the same and training's micro-batch is untouched. `step` labels the history events.
    """
    was_training = model.training
    model.eval()
    totals: dict[str, Any] = {}
    done = 0
    try:
        for i, batch in enumerate(batches):
            if (max_batches and i >= max_batches) or (stop is not None and i and stop()):
                break
            done = i + 1
            if oom is None:
                part = _batch_score(model, batch, micro_batch_size, precision, device, score)
            else:
                part = oom.run(step, None, None, lambda mbs, batch=batch: _batch_score(
                    model, batch, mbs, precision, device, score, check=oom.check), what="eval")
            _add(totals, part)
    finally:
        model.train(was_training)
    return totals, done


def evaluate_loss(model: torch.nn.Module, batches: Iterable[Batch], precision: Precision,
                  micro_batch_size: int, max_batches: int = 0, device: torch.device | str = "cpu",
                  loss_fn: LossFn = causal_lm_loss, oom: OOMController | None = None,
                  step: int | None = None, stop: Callable[[], bool] | None = None) -> dict[str, float]:
    """Token-weighted mean loss over `batches` (evaluate_batches with the loss as its score), with its
    perplexity, the label tokens and the batches it covers (`val_batches`)."""
    totals, done = evaluate_batches(model, batches, precision, micro_batch_size, loss_score(loss_fn),
                                    max_batches, device, oom, step, stop)
    count = totals.get("count", 0)
    loss = totals.get("loss_sum", 0.0) / max(count, 1)
    return {"val_loss": loss, "val_ppl": math.exp(min(loss, 50.0)), "val_tokens": count, "val_batches": done}


def job_loss(job: Job, batches: Iterable[Batch], max_batches: int = 0,
             stop: Callable[[], bool] | None = None) -> dict[str, float]:
    """evaluate_loss of a job: its model, precision, device and loss, under the evaluation's own OOM
    controller (which the history's eval events come from; train.finish records them)."""
    return evaluate_loss(job.model, batches, job.precision, job.eval_oom.micro_batch_size, max_batches,
                         job.device.torch_device, job.loss_fn, job.eval_oom, job.counters["step"], stop)


def job_scores(job: Job, batches: Iterable[Batch], score: Score, max_batches: int = 0) -> tuple[dict, int]:
    """evaluate_batches of a job with its own `score` (e.g. a classifier's predictions), OOM-safe."""
    return evaluate_batches(job.model, batches, job.precision, job.eval_oom.micro_batch_size, score,
                            max_batches, job.device.torch_device, job.eval_oom, job.counters["step"])


def _add(totals: dict[str, Any], part: dict[str, Any]) -> None:
    for k, v in part.items():
        totals[k] = totals[k] + v if k in totals else v


def _batch_score(model, batch: Batch, micro_batch_size: int, precision: Precision, device, score: Score,
                 check=None) -> dict[str, Any]:
    """`score` of one batch, summed micro-batch by micro-batch."""
    totals: dict[str, Any] = {}
    for mb in micro_batches(batch, micro_batch_size):
        if check is not None:
            check(mb)   # the OOM controller's fault-injection hook
        mb = {k: v.to(device) for k, v in mb.items()}
        with precision.autocast():
            _add(totals, score(model, mb))
    return totals


def unigram_baseline(train_docs: Iterable, val_batches: Iterable[Batch], vocab_size: int,
                     max_train_tokens: int = 0, stop: Callable[[], bool] | None = None) -> dict[str, float]:
    """Perplexity of an add-one (Laplace) unigram model fitted on the training tokens (arrays of token
    ids, one per document), scored on exactly the label tokens the LM's validation loss uses: a floor
    any trained LM must beat by a wide margin. Fitting stops after `max_train_tokens` (0: all) or when
    `stop()` says so (a 50 MB corpus is minutes of tokenizing; unigram counts settle long before)."""
    counts = torch.zeros(vocab_size, dtype=torch.float64)
    n = 0
    for ids in train_docs:
        if (max_train_tokens and n >= max_train_tokens) or (stop is not None and n and stop()):
            break
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


_NOTED: set[str] = set()


def context_length(model) -> int | None:
    """How many positions the model was built for (GPT-2 n_positions, Llama max_position_embeddings)."""
    cfg = getattr(model, "config", None)
    for key in ("n_positions", "max_position_embeddings", "n_ctx"):
        value = getattr(cfg, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


@torch.no_grad()
def generate_in_context(model, input_ids: torch.Tensor, max_new_tokens: int,
                        **generate_kwargs) -> tuple[torch.Tensor, str | None]:
    """`model.generate` that never runs past the model's context: (new token ids [1, n], a note or None).

    GPT-2's position table has `ctx` rows (one more position is an IndexError); Llama's rotary positions
    do not crash but are untrained past `ctx`. A prompt longer than the context keeps its last ctx/2
    tokens; when the sequence fills the context, generation slides: it continues from the last ctx/2
    tokens (a window, re-encoded: no KV cache across windows). Greedy decoding stays deterministic."""
    ctx = context_length(model)
    eos = generate_kwargs.get("eos_token_id", getattr(getattr(model, "generation_config", None),
                                                      "eos_token_id", None))
    eos_ids = set(eos if isinstance(eos, (list, tuple)) else [eos]) - {None}

    def run(ids: torch.Tensor, n: int) -> torch.Tensor:
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=n,
                             **generate_kwargs)
        return out[:, ids.shape[1]:]
    if ctx is None:
        return run(input_ids, max_new_tokens), None
    keep = max(1, ctx // 2)
    notes = []
    ids = input_ids
    if ids.shape[1] > ctx:
        ids = ids[:, -keep:]
        notes.append(f"the prompt was cut to its last {keep} tokens (the model's context is {ctx})")
    new: list[torch.Tensor] = []
    left = max_new_tokens
    while left > 0:
        n = min(left, ctx + 1 - ids.shape[1])   # the last new token is predicted, never fed back
        chunk = run(ids, n)
        new.append(chunk)
        left -= chunk.shape[1]
        if chunk.shape[1] < n or (chunk.shape[1] and int(chunk[0, -1]) in eos_ids):
            break                    # stopped at EOS
        if left > 0:
            slide = (f"the sequence reached the model's context ({ctx} tokens): generation continued "
                     f"from its last {keep} tokens")
            if slide not in notes:
                notes.append(slide)
            ids = torch.cat([ids, chunk], dim=1)[:, -keep:]
    out = torch.cat(new, dim=1) if new else input_ids[:, :0]
    return out, ("; ".join(notes) or None)


# Readable defaults for samples of small models: the eval sample and `memfit generate`.
SAMPLING = dict(do_sample=True, temperature=0.8, top_k=40, repetition_penalty=1.1)


@torch.no_grad()
def generate_text(model, tokenizer, prompt: str, max_new_tokens: int = 40,
                  device: torch.device | str = "cpu", oom: OOMController | None = None,
                  step: int | None = None) -> str:
    """A sampled continuation (SAMPLING below) within the model's context (generate_in_context; its note
    goes to the log). Greedy decoding of a small or young model repeats itself (a tiny GPT emits newlines
    for ever), so the sample is drawn at temperature 0.8 from the top 40 tokens, stopping at EOS. It is
    drawn under a forked RNG seeded by `step`: the training RNG is untouched (resume stays bit-exact) and
    the same weights at the same step give the same text.

    With `oom` (the evaluation's controller) an OOM shortens the sample instead of ending the run:
    half the new tokens, down to none ("[no sample: out of memory]")."""
    import logging
    was_training = model.training
    model.eval()
    try:
        ids = tokenizer(prompt, return_tensors="pt")["input_ids"].to(device)
        if ids.shape[1] == 0:
            ids = torch.tensor([[tokenizer.eos_token_id]], device=device)
        notes: list[str] = []

        def run(n: int) -> torch.Tensor:
            devices = [ids.device] if ids.device.type == "cuda" else []
            with torch.random.fork_rng(devices=devices):
                torch.manual_seed(step or 0)
                out, note = generate_in_context(model, ids, n, **SAMPLING,
                                                pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id)
            notes.append(note or "")
            return out
        if oom is None:
            out = run(max_new_tokens)
        else:
            ctx = context_length(model)
            prompt_tokens = min(int(ids.shape[1]), ctx // 2) if ctx else int(ids.shape[1])
            out = oom.generate(step, run, max_new_tokens, prompt_tokens=prompt_tokens)
            if out is None:
                return "[no sample: out of memory]"
        if notes and notes[-1] and notes[-1] not in _NOTED:
            _NOTED.add(notes[-1])    # once per run, not at every evaluation
            logging.getLogger("memfit").info(f"sample: {notes[-1]}")
        return tokenizer.decode(out[0], skip_special_tokens=True)
    finally:
        model.train(was_training)
