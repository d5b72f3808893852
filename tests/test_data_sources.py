"""Sources: byte-grid units, formats, bad input, pre-flight checks, the embedded corpora."""

from __future__ import annotations

import json

import pytest

from memfit.config import Config
from memfit.data import corpora
from memfit.data import readers as R
from memfit.data import sources as S
from memfit.data import units as U
from memfit.data.check import check_data
from memfit.data.tokenizer import train_bpe


def docs_of(src: U.Source, chunk: int) -> list:
    out = []
    for raw in U.raw_chunks(src, chunk):
        out += list(zip(raw.docs, raw.ends))
    return out


def test_grid_units_partition_text_and_jsonl(tmp_path):
    lines = [json.dumps({"text": f"record {i} " + "é" * (i % 7) + "x" * (i * 37 % 300)}) for i in range(400)]
    p = tmp_path / "a.jsonl"
    p.write_text("\n".join(lines) + "\n", encoding="utf-8")
    for chunk in (97, 1000, 1 << 20):
        src = U.FileSource("a", 1.0, "jsonl", [str(p)], [p.stat().st_size], chunk)
        got = [d["text"] for d, _ in docs_of(src, chunk)]
        assert got == [json.loads(x)["text"] for x in lines], chunk
    # text: one document per file even when it spans many units; a line longer than a unit is cut
    # at a character boundary; the pieces join back to the file and only the last ends the document
    text = "".join(f"line {i} " + ("ü" * 500 if i == 7 else "") + "\n" for i in range(300))
    t = tmp_path / "b.txt"
    t.write_text(text, encoding="utf-8")
    src = U.FileSource("b", 1.0, "text", [str(t)], [t.stat().st_size], 256)
    pieces = docs_of(src, 256)
    assert len(pieces) > 10
    assert "".join(d for d, _ in pieces) == text
    assert [e for _, e in pieces] == [False] * (len(pieces) - 1) + [True]


def test_paragraph_mode(tmp_path):
    t = tmp_path / "p.txt"
    t.write_text("first para\nline two\n\n\nsecond para\n\nthird\n", encoding="utf-8")
    cfg = Config().replace(data={"text_split": "paragraph"})
    (src,) = S.resolve_sources([str(t)], cfg.data).sources
    assert [d.strip() for d, e in docs_of(src, 1 << 20)] == ["first para\nline two", "second para", "third"]


def test_csv_quoted_newlines_across_chunks(tmp_path):
    p = tmp_path / "d.csv"
    rows = [("id", "text")] + [(str(i), f'row {i} says "hi"\nand more {i}') for i in range(200)]
    import csv
    with open(p, "w", newline="", encoding="utf-8") as f:
        csv.writer(f).writerows(rows)
    for chunk in (64, 1 << 20):
        (src,) = S.resolve_sources([str(p)], Config().data, chunk).sources
        got = [d["text"] for d, _ in docs_of(src, chunk)]
        assert got == [r[1] for r in rows[1:]], chunk


def test_bad_jsonl_records_skip_or_fail(tmp_path):
    from memfit.data.build import build_streams
    p = tmp_path / "bad.jsonl"
    good = [json.dumps({"text": f"good record number {i} " * 3}) for i in range(30)]
    lines = good[:3] + ["{not json"] + good[3:10] + [json.dumps({"other": 1})] + good[10:]
    p.write_text("\n".join(lines) + "\n", encoding="utf-8")
    tok = train_bpe(["good record number"] * 20, 280)
    cfg = Config().replace(data={"data": (str(p),), "seq_len": 8, "val_fraction": 0.01})
    train, _ = build_streams(cfg, tok, 2, seed=0)
    next(iter(train))
    assert train.stats["bad_records"] == 2
    ex = " | ".join(train.stats["bad_examples"])
    assert f"{p}:4: not valid JSON" in ex and f"{p}:12: lacks field 'text'" in ex
    cfg = cfg.replace(data={"on_bad_record": "fail"})
    train, _ = build_streams(cfg, tok, 2, seed=0)
    with pytest.raises(R.DataError, match=r"bad.jsonl:4: not valid JSON"):
        next(iter(train))


def test_undecodable_bytes_are_replaced_and_counted(tmp_path):
    p = tmp_path / "latin.txt"
    p.write_bytes("caf\u00e9 cr\u00e8me ".encode("latin-1") * 10)
    (src,) = S.resolve_sources([str(p)], Config().data).sources
    raw = U.run_task(src.task([0]))
    assert raw.replaced == 20 and "\ufffd" in raw.docs[0]


def test_check_data_lists_every_problem(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    arr = tmp_path / "arr.json"
    arr.write_text('[{"text": "a"}]')
    nofield = tmp_path / "nf.jsonl"
    nofield.write_text('{"body": "x"}\n')
    cfg = Config().replace(data={"data": ("shakespear", str(tmp_path / "missing.txt"), str(tmp_path / "*.xyz"),
                                          str(empty), f"{nofield}@-1", str(arr), "hf:foo/bar",
                                          str(tmp_path / "x.parquet")),
                                 "val_data": ("nope_corpus",)})
    (tmp_path / "x.parquet").write_bytes(b"PAR1")
    problems = check_data(cfg)
    text = "\n".join(problems)
    assert "Did you mean 'shakespeare'" in text
    assert "missing.txt: no such file" in text
    assert "glob matches no file" in text
    assert "empty.txt: the file is empty" in text
    assert "weight after '@' must be a positive number" in text
    assert "JSON array" in text
    assert "nf.jsonl" in text and "'text'" in text
    assert "--val-data nope_corpus: unknown corpus" in text
    if not S._have("datasets"):
        assert "hf:foo/bar" in text and "datasets" in text
    if not S._have("pyarrow"):
        assert "pyarrow" in text
    else:                # with pyarrow: a 4-byte file is one listed problem, not pyarrow's ArrowInvalid
        assert "x.parquet: not a readable Parquet file" in text
    assert check_data(Config()) == []


def test_tiny_corpus_without_validation_docs_is_reported(tmp_path):
    (tmp_path / "one.txt").write_text("just one document")
    cfg = Config().replace(data={"data": (str(tmp_path / "one.txt"),)})
    problems = check_data(cfg)
    assert any("validation split" in p or "no training document" in p for p in problems)


def test_mixing_syntax_and_natural_weights(tmp_path):
    a = tmp_path / "a.txt"
    a.write_text("a" * 3000)
    b = tmp_path / "b.jsonl"
    b.write_text('{"text": "b"}\n' * 100)
    r = S.resolve_sources([str(a), str(b)], Config().data)
    assert [s.weight for s in r.sources] == [3000.0, 1400.0]           # sizes: one pass over each
    r = S.resolve_sources([f"{a}@3", str(b)], Config().data)
    assert [s.weight for s in r.sources] == [3.0, 1.0]


def test_embedded_corpora():
    assert len(corpora.shakespeare_files()) == 42
    kjv = corpora.kjv_documents()
    assert len(kjv) == 1189 and kjv[0].startswith("Genesis 1\nIn the beginning")
    ex = corpora.bbc_examples()
    assert len(ex) == 2225 and {label for _, label in ex} == set(corpora.BBC_LABELS)
    assert all(isinstance(t, str) and t for t, _ in ex)
    r = S.resolve_sources(["shakespeare", "kjv", "bbc"], Config().data)
    assert not r.problems and [s.name for s in r.sources] == ["shakespeare", "kjv", "bbc"]
    # the default corpus holds documents on both sides of the split
    assert check_data(Config().replace(data={"data": ("shakespeare", "kjv")})) == []


def test_saved_hf_dataset_code_path_with_a_stand_in(tmp_path, monkeypatch):
    """The `datasets` package is optional; a stand-in with the same load_from_disk/slicing shape
    exercises the reader (row-range units, records as dicts)."""
    import importlib.machinery
    import sys
    import types

    class FakeDS:
        def __init__(self, n):
            self.n = n

        def __len__(self):
            return self.n

        def __getitem__(self, sl):
            r = range(self.n)[sl]
            return {"text": [f"row {i}" for i in r], "id": list(r)}

    mod = types.ModuleType("datasets")
    mod.__spec__ = importlib.machinery.ModuleSpec("datasets", None)
    mod.load_from_disk = lambda path: {"train": FakeDS(2500), "test": FakeDS(3)}
    monkeypatch.setitem(sys.modules, "datasets", mod)
    monkeypatch.setattr(U, "_HF_CACHE", {})
    d = tmp_path / "saved"
    d.mkdir()
    (d / "dataset_dict.json").write_text("{}")
    (src,) = S.resolve_sources([str(d)], Config().data).sources
    assert src.kind == "hf-disk" and src.num_units == 3
    got = [doc["text"] for doc, _ in docs_of(src, 1 << 20)]
    assert got == [f"row {i}" for i in range(2500)]
