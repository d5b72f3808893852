"""Issue 11: ONE evaluation, OOM-safe for every job kind. An OOM while evaluating (injected above a token
threshold, the path a CUDA OOM takes, as tests/test_oom.py does) shrinks only the evaluation's
micro-batch, redoes the batch, and the run finishes with the same metric as a run without the OOM — in
finetune, classify and memfit.fit (before issue 11 only pretraining's evaluation recovered).

Real tiny models saved as HF folders (GPT-2 / BERT, width 32) with a word-level tokenizer; training
batches are short and validation batches long, so only the evaluation crosses the threshold.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from memfit import config as C

WORDS = [f"w{i}" for i in range(60)]


@pytest.fixture(autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)        # tiny models on shared cores: one intra-op thread is faster
    yield
    torch.set_num_threads(n)


def save_tokenizer(folder: Path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    specials = ["[PAD]", "[UNK]", "[EOS]"]
    vocab = {w: i for i, w in enumerate(specials + WORDS + ["a", "b"])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]",
                                   eos_token="[EOS]", model_max_length=128)
    fast.save_pretrained(folder)
    return fast


def text(rng, n: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n))


def ooms(rows, what):
    return [(r["old_micro_batch"], r["new_micro_batch"]) for r in rows if r["kind"] == "oom" and r["what"] == what]


def evals(rows):
    return [(r["step"], r["val_loss"]) for r in rows if r["kind"] == "eval"]


def same_evals(a, b):
    assert [s for s, _ in a] == [s for s, _ in b] and a
    for (_, x), (_, y) in zip(a, b):
        assert math.isclose(x, y, rel_tol=1e-5, abs_tol=1e-7)


def history(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "history.jsonl").read_text().splitlines()]


# --- finetune --------------------------------------------------------------------------------------

def test_finetune_eval_oom_shrinks_the_eval_batch_with_the_same_val_loss(tmp_path):
    import random

    from transformers import GPT2Config, GPT2LMHeadModel

    from memfit.jobs.finetune import run_causal_lm
    model_dir = tmp_path / "tiny-gpt2"
    tok = save_tokenizer(model_dir)
    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_positions=128, n_embd=32, n_layer=2, n_head=2,
                               eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)).save_pretrained(model_dir)
    rng = random.Random(0)
    (tmp_path / "train.jsonl").write_text("".join(json.dumps({"text": text(rng, 6)}) + "\n" for _ in range(32)))
    (tmp_path / "val.jsonl").write_text("".join(json.dumps({"text": text(rng, 40)}) + "\n" for _ in range(8)))

    def run(name, inject):
        cfg = C.Config(task="finetune").replace(
            model={"model": str(model_dir)},
            data={"data": (str(tmp_path / "train.jsonl"),), "val_data": (str(tmp_path / "val.jsonl"),),
                  "max_seq_len": 64, "packing": "off"},     # padded: train rows stay <= 7 tokens
            train={"batch_size": 4, "max_steps": 4, "eval_every": 2, "sample_tokens": 0, "precision": "fp32",
                   "log_every": 1},
            optim={"lr": 1e-3, "warmup_steps": 0}, oom={"inject_oom_above_tokens": inject},
            checkpoint={"save_every": 100}, run={"output_dir": str(tmp_path / name), "quiet": True})
        return run_causal_lm(cfg)

    # Train micro-batches: 4 rows x <= 7 tokens (< 100); validation: 4 x 41 -> 2 x 41 = 82 fits.
    hit, plain = run("hit", 100), run("plain", None)
    assert hit.status == plain.status == "finished" and hit.step == 4
    # The shrink happens in the evaluation before training (step 0), whose rows history.jsonl drops
    # (History.load_until(0) on a fresh start: an open defect, see notes/jobs.md): read it from the log.
    log = (tmp_path / "hit" / "memfit.log").read_text()
    assert "step 0: eval micro-batch 4 -> 2 (injected OOM: micro-batch of 164 tokens > limit 100)" in log
    assert "train micro-batch" not in log and "injected OOM" not in (tmp_path / "plain" / "memfit.log").read_text()
    same_evals(evals(history(tmp_path / "hit")), evals(history(tmp_path / "plain")))   # steps 2 and 4
    for k in ("val_loss_before", "val_loss_after"):
        assert math.isclose(hit.metrics[k], plain.metrics[k], rel_tol=1e-5), k
    assert hit.metrics["val_tokens"] == plain.metrics["val_tokens"] == 8 * 40   # every label token once


# --- classify --------------------------------------------------------------------------------------

def long_val_short_train(n_per_class: int, fraction: float, seed: int = 0) -> list[tuple[str, str]]:
    """Labelled texts where the stratified split's validation (each class's smallest content hashes)
    holds only long texts and training only short ones."""
    import random

    from memfit.data.examples import record_hash
    rng = random.Random(seed)
    n_val = math.ceil(fraction * n_per_class)
    pairs = []
    for label in ("a", "b"):
        longs = sorted((f"{label} {text(rng, 30)}" for _ in range(4 * n_val)), key=record_hash)[:n_val]
        edge = record_hash(longs[-1])
        shorts = []
        while len(shorts) < n_per_class - n_val:
            t = f"{label} {text(rng, 3)}"
            if record_hash(t) > edge and t not in shorts:
                shorts.append(t)
        pairs += [(t, label) for t in longs + shorts]
    return pairs


def test_classify_eval_oom_shrinks_the_eval_batch_with_the_same_metrics(tmp_path):
    from transformers import BertConfig, BertForSequenceClassification

    from memfit.data.examples import stratified_split
    from memfit.jobs.classify import run_classify
    model_dir = tmp_path / "tiny-bert"
    tok = save_tokenizer(model_dir)
    torch.manual_seed(0)
    BertForSequenceClassification(BertConfig(
        vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        max_position_embeddings=128, pad_token_id=tok.pad_token_id, num_labels=2)).save_pretrained(model_dir)
    pairs = long_val_short_train(20, 0.2)
    train, val = stratified_split(pairs, 0.2)
    assert {len(t.split()) for t, _ in val} == {31} and {len(t.split()) for t, _ in train} == {4}
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps({"text": t, "label": lab}) + "\n" for t, lab in pairs))

    def run(name, inject):
        cfg = C.Config(task="classify").replace(
            model={"model": str(model_dir)}, data={"data": (str(data),), "val_fraction": 0.2, "max_seq_len": 64},
            train={"batch_size": 8, "max_steps": 4, "eval_every": 2, "precision": "fp32", "log_every": 1},
            optim={"lr": 1e-3, "warmup_steps": 0}, oom={"inject_oom_above_tokens": inject},
            checkpoint={"save_every": 100}, run={"output_dir": str(tmp_path / name), "quiet": True})
        return run_classify(cfg)

    # Train micro-batches: 8 rows x 4 tokens = 32; validation: 8 x 31 -> 4 x 31 -> 2 x 31 = 62 < 100.
    hit, plain = run("hit", 100), run("plain", None)
    assert hit.status == plain.status == "finished" and hit.step == 4
    h, p = history(tmp_path / "hit"), history(tmp_path / "plain")
    assert ooms(h, "eval") == [(8, 4), (4, 2)] and ooms(h, "train") == [] and ooms(p, "eval") == []
    same_evals(evals(h), evals(p))
    for k in ("accuracy", "f1", "val_examples"):
        assert hit.metrics[k] == plain.metrics[k], k
    assert hit.metrics["val_examples"] == 8
    assert math.isclose(hit.metrics["val_loss"], plain.metrics["val_loss"], rel_tol=1e-5)


# --- memfit.fit ------------------------------------------------------------------------------------

def test_fit_eval_oom_shrinks_the_eval_batch_with_the_same_val_loss(tmp_path, tiny_gpt2):
    import copy

    import memfit

    def rows(n, length, seed):
        g = torch.Generator().manual_seed(seed)
        ids = torch.randint(0, 256, (n, length), generator=g)
        return [{"input_ids": r, "attention_mask": torch.ones_like(r), "labels": r.clone()} for r in ids]

    def run(name, inject):
        model = copy.deepcopy(tiny_gpt2)
        return memfit.fit(model, rows(32, 4, 0), eval_data=rows(16, 16, 1), output_dir=tmp_path / name,
                          batch_size=8, max_steps=4, eval_every=2, log_every=1, lr=1e-3, warmup_steps=0,
                          precision="fp32", quiet=True, inject_oom_above_tokens=inject)

    # Train micro-batches: 8 x 4 = 32 tokens; evaluation: 8 x 16 = 128 -> 4 x 16 = 64 fits.
    hit, plain = run("hit", 64), run("plain", None)
    assert hit.status == plain.status == "finished" and hit.step == 4
    assert ooms(hit.history, "eval") == [(8, 4)] and ooms(hit.history, "train") == []
    same_evals(evals(hit.history), evals(plain.history))
    assert math.isclose(hit.metrics["val_loss"], plain.metrics["val_loss"], rel_tol=1e-5)
    print(f"memfit.fit val_loss {hit.metrics['val_loss']:.6f} (eval OOM) vs {plain.metrics['val_loss']:.6f}")
