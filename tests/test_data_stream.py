"""The token stream: exact resume (text, JSONL, mixed; shuffle on; 0 and 2 workers), resume cost,
epochs, packing, mixing, max-examples/subset. (Padded batches of map-style data: test_finetune_data.)"""

from __future__ import annotations

import io
import random
import time

import numpy as np
import pytest
import torch

from memfit.config import Config
from memfit.data import readers as R
from memfit.data import synth
from memfit.data.build import build_streams
from memfit.data.count import estimate_tokens
from memfit.data.tokenizer import train_bpe

SEQ = 32
ROWS = 4


@pytest.fixture(scope="module")
def tok():
    texts = [synth.doc_text(i, 200) for i in range(40)]
    return train_bpe(texts, 300)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    synth.make_text_files(root / "txt", 120, words=60, big_every=17, big_words=3000)
    synth.make_jsonl(root / "a.jsonl", 600, words=40)
    return root


def cfg_for(data, **data_kw) -> Config:
    base = {"data": tuple(data), "seq_len": SEQ, "shuffle_buffer_size": 64, "val_fraction": 0.1}
    base.update(data_kw)
    return Config().replace(data=base)


def roundtrip(state):
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


def take(it, n):
    return [next(it) for _ in range(n)]


def same(a, b):
    return all(torch.equal(x[k], y[k]) for x, y in zip(a, b) for k in ("input_ids", "attention_mask",
                                                                        "labels")) and len(a) == len(b)


@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize("kind", ["text", "jsonl", "mixed"])
def test_resume_exact(tok, corpus, kind, workers):
    data = {"text": [str(corpus / "txt")], "jsonl": [str(corpus / "a.jsonl")],
            "mixed": [f"{corpus / 'txt'}@2", f"{corpus / 'a.jsonl'}@1"]}[kind]
    cfg = cfg_for(data, num_workers=workers)
    a, _ = build_streams(cfg, tok, ROWS, seed=7, chunk_bytes=8192)
    it = iter(a)
    take(it, 40)
    state = roundtrip(a.state_dict())
    expected = take(it, 16)
    b, _ = build_streams(cfg, tok, ROWS, seed=7, chunk_bytes=8192)
    b.load_state_dict(state)
    got = take(iter(b), 16)
    assert same(expected, got)
    assert expected[0]["input_ids"].shape == (ROWS, SEQ) and expected[0]["input_ids"].dtype == torch.int64
    a.close()
    b.close()


def test_workers_do_not_change_the_stream(tok, corpus):
    cfg = cfg_for([f"{corpus / 'txt'}@1", f"{corpus / 'a.jsonl'}@1"])
    a, _ = build_streams(cfg, tok, ROWS, seed=3, chunk_bytes=8192, num_workers=0)
    b, _ = build_streams(cfg, tok, ROWS, seed=3, chunk_bytes=8192, num_workers=2)
    assert same(take(iter(a), 60), take(iter(b), 60))
    b.close()


def test_seed_changes_order_and_stream_is_deterministic(tok, corpus):
    cfg = cfg_for([str(corpus / "txt")])
    x = take(iter(build_streams(cfg, tok, ROWS, seed=1, chunk_bytes=8192)[0]), 10)
    y = take(iter(build_streams(cfg, tok, ROWS, seed=1, chunk_bytes=8192)[0]), 10)
    z = take(iter(build_streams(cfg, tok, ROWS, seed=2, chunk_bytes=8192)[0]), 10)
    assert same(x, y)
    assert not same(x, z)


def test_resume_at_batch_10000_reads_one_chunk(tok, tmp_path):
    """Two sources; resuming deep into the stream reads at most one chunk per source before the
    next batch, and costs about as much as resuming at batch 10."""
    chunk = 16384
    txt = tmp_path / "big.txt"
    txt.write_text("".join(synth.doc_text(i, 150) for i in range(700)), encoding="utf-8")
    synth.make_jsonl(tmp_path / "big.jsonl", 1500, words=60)
    cfg = cfg_for([str(txt), str(tmp_path / "big.jsonl")], seq_len=16, shuffle_buffer_size=32,
                  text_split="paragraph")
    rows = 2
    a, _ = build_streams(cfg, tok, rows, seed=11, chunk_bytes=chunk)
    it = iter(a)
    states = {}
    for k in range(1, 10_001):
        next(it)
        if k in (10, 10_000):
            states[k] = roundtrip(a.state_dict())
    assert a.stats["bytes_read"] > 20 * chunk           # the corpus is large relative to a chunk
    R.IO.reset()
    expected = take(it, 300)                            # uninterrupted: what the next 300 batches read
    later_bytes = R.IO.bytes
    assert later_bytes > 2 * chunk

    costs = {}
    for k, st in states.items():
        b, _ = build_streams(cfg, tok, rows, seed=11, chunk_bytes=chunk)
        R.IO.reset()
        t0 = time.perf_counter()
        b.load_state_dict(st)
        bit = iter(b)
        first = next(bit)
        costs[k] = (time.perf_counter() - t0, R.IO.bytes)
        assert R.IO.bytes <= 2 * (chunk + R.LOOKAHEAD), costs   # <= one chunk per source
        if k == 10_000:
            rest = take(bit, 299)
            assert same([first] + rest, expected)
            assert R.IO.bytes == later_bytes                    # nothing consumed is read again
    (t10, _), (t10k, _) = costs[10], costs[10_000]
    assert t10k <= 3 * t10 + 0.25, costs          # (replaying 10,000 batches takes seconds)


def test_epoch_is_exact_and_split_disjoint(tok, corpus):
    """One token per document (+ EOS, --seq-len 2: one document per batch): epoch 0 delivers every
    training document exactly once (shuffled); validation documents never appear in training."""
    ids_of = {}

    def encode(doc):
        key = doc.split("\n", 1)[0]
        ids_of.setdefault(key, len(ids_of) + 1)
        return {"input_ids": [ids_of[key]], "labels": [ids_of[key]]}

    cfg = cfg_for([str(corpus / "txt")], shuffle_buffer_size=16, seq_len=2)
    train, val = build_streams(cfg, tok, 1, seed=5, encode=encode, chunk_bytes=1 << 20)
    val_ids = {int(b["input_ids"][0, 0]) for b in val}
    it = iter(train)
    seen = []
    while train.epoch == 0:
        seen.append(int(next(it)["input_ids"][0, 0]))
    n_train = len(seen)
    assert len(set(seen)) == n_train                    # exactly once
    assert not (set(seen) & val_ids)                     # no leak
    assert n_train + len(val_ids) == 120                 # together: every document
    assert seen != sorted(seen)                          # shuffled
    second = [int(next(it)["input_ids"][0, 0]) for _ in range(n_train - 1)]
    assert set(second) <= set(seen) and second != seen[1:]   # epoch 2: same docs, new order
    # the val stream restarts on every iter() and is deterministic
    assert [int(b["input_ids"][0, 0]) for b in val] == [int(b["input_ids"][0, 0]) for b in val]


def test_packing_eos_stride_and_val_tail(tok, tmp_path):
    (tmp_path / "d").mkdir()
    for i in range(3):
        (tmp_path / "d" / f"{i}.txt").write_text(f"doc {i} " + "ka lo mi " * 20, encoding="utf-8")
    cfg = cfg_for([str(tmp_path / "d")], seq_len=8, stride=4, shuffle_buffer_size=0, val_fraction=0.01)
    train, _ = build_streams(cfg, tok, 3, seed=0)
    b = next(iter(train))
    x = b["input_ids"]
    assert torch.equal(x[0, 4:], x[1, :4]) and torch.equal(x[1, 4:], x[2, :4])   # stride 4 overlap
    assert torch.equal(b["labels"], x) and bool(b["attention_mask"].all())
    eos = tok.eos_token_id
    flat = []
    it = iter(train)
    while train.epoch == 0:
        flat += next(it)["input_ids"][:, :4].reshape(-1).tolist()
    assert flat.count(eos) >= 2                          # documents separated by EOS
    # without shuffle the train stream starts with the first document, as read
    assert tok.decode(x[0].tolist()).startswith("doc ")


def test_val_last_batch_short_and_padded(tok, corpus):
    cfg = cfg_for([str(corpus / "a.jsonl")], val_fraction=0.2)
    _, val = build_streams(cfg, tok, 5, seed=0)
    batches = list(val)
    assert batches and all(b["input_ids"].shape[1] == SEQ for b in batches)
    last = batches[-1]
    assert last["input_ids"].shape[0] <= 5
    m = last["attention_mask"]
    assert torch.equal(last["labels"][m == 0], torch.full_like(last["labels"][m == 0], -100))
    total = sum(int(b["attention_mask"].sum()) for b in batches)
    assert total == sum(int(b["attention_mask"].sum()) for b in val)


def test_mixing_follows_weights(tok, corpus):
    cfg = cfg_for([f"{corpus / 'txt'}@3", f"{corpus / 'a.jsonl'}@1"])
    train, _ = build_streams(cfg, tok, ROWS, seed=0, chunk_bytes=8192)
    take(iter(train), 300)
    a, b = train._mix
    assert 2.6 < a / b < 3.4


def test_max_examples_and_subset(tok, corpus):
    ids_of = {}

    def encode(doc):
        key = doc.split("\n", 1)[0]
        ids_of.setdefault(key, len(ids_of) + 1)
        return {"input_ids": [ids_of[key]]}

    cfg = cfg_for([str(corpus / "txt")], max_examples=7, seq_len=2)      # one document per batch
    train, _ = build_streams(cfg, tok, 1, seed=0, encode=encode)
    it = iter(train)
    first = []
    while train.epoch == 0:
        first.append(int(next(it)["input_ids"][0, 0]))
    second = []
    while train.epoch == 1:
        second.append(int(next(it)["input_ids"][0, 0]))
    assert len(first) == 7 and sorted(first) == sorted(second)   # the same 7 documents each epoch
    cfg = cfg_for([str(corpus / "a.jsonl")], subset_ratio=0.5, val_fraction=0.1)
    full = estimate_tokens(cfg_for([str(corpus / "a.jsonl")], val_fraction=0.1), tok)
    half = estimate_tokens(cfg, tok)
    assert 0.35 < half / full < 0.65


def test_estimate_tokens_exact_matches_stream(tok, corpus):
    # stride 1: each batch consumes exactly one token, and a refill stops at the first piece that
    # completes a block, so when the epoch ends the stream holds no token of the next pass
    cfg = cfg_for([str(corpus / "txt")], seq_len=2, stride=1)
    est = estimate_tokens(cfg, tok)
    train, _ = build_streams(cfg, tok, 1, seed=0)
    it = iter(train)
    n = 0
    while train.epoch == 0:
        next(it)
        n += 1
    assert n + len(train._carry) == est          # consumed + read but not yet consumed


def test_stream_consumes_no_global_rng(tok, corpus):
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    before = (random.getstate(), np.random.get_state()[1].copy(), torch.get_rng_state().clone())
    cfg = cfg_for([f"{corpus / 'txt'}@1", f"{corpus / 'a.jsonl'}@1"])
    estimate_tokens(cfg, tok)
    train, val = build_streams(cfg, tok, ROWS, seed=0, chunk_bytes=8192)
    take(iter(train), 20)
    list(val)
    assert random.getstate() == before[0]
    assert (np.random.get_state()[1] == before[1]).all()
    assert torch.equal(torch.get_rng_state(), before[2])


def test_state_refuses_other_data(tok, corpus):
    a, _ = build_streams(cfg_for([str(corpus / "txt")]), tok, ROWS, seed=0)
    next(iter(a))
    b, _ = build_streams(cfg_for([str(corpus / "a.jsonl")]), tok, ROWS, seed=0)
    with pytest.raises(ValueError, match="different data"):
        b.load_state_dict(a.state_dict())


def test_data_parallel_ranks_read_disjoint_documents(tok, corpus):
    heads = []
    for rank in (0, 1):
        ids_of = {}

        def encode(doc, ids_of=ids_of):
            return {"input_ids": [int(doc.split("\n", 1)[0].split()[1])]}

        cfg = cfg_for([str(corpus / "txt")], seq_len=2)                  # one document per batch
        train, _ = build_streams(cfg, tok, 1, seed=0, encode=encode, rank=rank, world_size=2)
        it = iter(train)
        got = []
        while train.epoch == 0:
            got.append(int(next(it)["input_ids"][0, 0]))
        heads.append(set(got))
    assert heads[0] and heads[1] and not (heads[0] & heads[1])
    assert 100 <= len(heads[0] | heads[1]) <= 115          # every training document, once


def test_iter_split_tokens_counts_match_estimate(tok, corpus):
    from memfit.data.count import iter_split_tokens
    cfg = cfg_for([str(corpus / "a.jsonl")])
    assert sum(len(a) for a in iter_split_tokens(cfg, tok, "train")) == estimate_tokens(cfg, tok)
    assert sum(1 for _ in iter_split_tokens(cfg, tok, "val")) > 0
