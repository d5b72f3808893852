"""Tokenizers (trained BPE, offline GPT-2, local dir) and `memfit data inspect`."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from memfit.config import Config
from memfit.data import sources as S
from memfit.data import synth
from memfit.data.inspect import format_report, inspect_data, inspect_main
from memfit.data.tokenizer import build_tokenizer, iter_training_texts


@pytest.fixture(scope="module")
def small_cfg(tmp_path_factory):
    root = tmp_path_factory.mktemp("tokdata")
    synth.make_text_files(root / "txt", 80, words=300)
    return Config().replace(data={"data": (str(root / "txt"),), "vocab_size": 400, "seq_len": 32,
                                  "val_fraction": 0.1})


def test_bpe_is_deterministic_saved_and_uses_no_global_rng(small_cfg, tmp_path):
    from transformers import AutoTokenizer
    random.seed(1)
    np.random.seed(1)
    torch.manual_seed(1)
    before = (random.getstate(), np.random.get_state()[1].copy(), torch.get_rng_state().clone())
    a = build_tokenizer(small_cfg, tmp_path / "tok")
    b = build_tokenizer(small_cfg, None)
    assert random.getstate() == before[0] and (np.random.get_state()[1] == before[1]).all()
    assert torch.equal(torch.get_rng_state(), before[2])
    assert a.backend_tokenizer.to_str() == b.backend_tokenizer.to_str()
    assert len(a) == 400 and a.eos_token == "<|endoftext|>" and a.pad_token_id == a.eos_token_id
    loaded = AutoTokenizer.from_pretrained(str(tmp_path / "tok"))
    text = synth.doc_text(3, 50)
    assert loaded.encode(text) == a.encode(text) and loaded.decode(a.encode(text)) == text
    # a local directory is a valid --tokenizer
    c = build_tokenizer(small_cfg.replace(data={"tokenizer": str(tmp_path / "tok")}), None)
    assert c.encode(text) == a.encode(text)


def test_bpe_sample_is_the_training_split_only(small_cfg):
    texts = list(iter_training_texts(small_cfg))
    heads = {t.split("\n", 1)[0] for t in texts}
    _, val = S.split_filter(small_cfg.data, "train"), S.split_filter(small_cfg.data, "val")
    (src,) = S.resolve_sources(small_cfg.data.data, small_cfg.data).sources
    val_heads = {d.split("\n", 1)[0] for d, _, _ in S.iter_source_docs(src, val)}
    assert val_heads and not (heads & val_heads) and len(heads) + len(val_heads) == 80
    capped = list(iter_training_texts(small_cfg, max_bytes=5000))
    assert 5000 <= sum(map(len, capped)) < 5000 + 3000


def test_gpt2_offline():
    tok = build_tokenizer(Config().replace(data={"tokenizer": "gpt2"}), None)
    assert tok.encode("Hello world") == [15496, 995]
    assert tok.eos_token_id == 50256 and len(tok) == 50257


def test_inspect(small_cfg, capsys):
    tok = build_tokenizer(small_cfg, None)
    r = inspect_data(small_cfg, tok)
    (s,) = r["sources"]
    assert s["exact"] and s["train_docs"] + s["val_docs"] == 80 and s["val_docs"] > 0
    assert r["tokens_per_epoch"] == s["train_tokens"] > 0
    assert r["tokenizer"]["bytes_per_token"] > 1
    assert r["blocks_per_epoch"] == (r["tokens_per_epoch"] - 32) // 32 + 1
    assert len(r["samples"]) == 2 and all(r["samples"])
    text = format_report(r)
    assert "tokens / epoch" in text and "bytes/token" in text
    bad = small_cfg.replace(data={"data": ("no_such_corpus", "/nonexistent/x.txt")})
    assert inspect_main(bad) == 2
    out = capsys.readouterr().out
    assert "2 problem(s)" in out and "no_such_corpus" in out and "/nonexistent/x.txt" in out
