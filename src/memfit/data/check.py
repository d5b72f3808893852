"""Pre-flight checks of the data (``check_data``): every problem found before any model is built or any
file is written, so a run with bad input stops with exit 2 and one list of problems.

``--on-bad-record fail`` is checked here too: for data small enough to scan (SMALL_DATA_BYTES), the first
unreadable record (bad JSON, a CSV row with the wrong column count, a record without --text-field) is
reported, so the run stops before config.yaml, tokenizer/ or a checkpoint exist (a rerun with the fix is
then not refused as "a different run"). Larger data is still stopped by the stream at the first bad record
it meets.
"""

from __future__ import annotations

import os

from memfit.data.encoding import encoding_problem, scan_sources
from memfit.data.readers import RawChunk, doc_text, parse_jsonl, read_at, read_csv_chunk, where
from memfit.data.sources import Resolved, SplitFilter, resolve_sources
from memfit.data.tokenizer import tokenizer_problems
from memfit.data.units import CsvSource, FileSource, Source, raw_chunks

SMALL_DATA_BYTES = 64_000_000


def check_data(cfg) -> list[str]:
    """Every problem with ``--data`` / ``--val-data`` / ``--tokenizer``, found before any model is
    built: missing paths, globs that match nothing, unknown corpora (with a suggestion), empty files,
    formats that need a missing package, JSONL whose first records lack ``--text-field``, and, for data
    small enough to scan (<= 64 MB), a split that leaves no training or no validation document."""
    d = cfg.data
    problems: list[str] = []
    if not d.data:
        problems.append("--data is empty: name a file, glob, directory or corpus (shakespeare, kjv, bbc)")
    res = resolve_sources(d.data, d)
    problems += res.problems
    vres = resolve_sources(d.val_data, d, opt="--val-data") if d.val_data else Resolved([], [])
    problems += vres.problems
    field_check = cfg.task in ("pretrain",)
    for opt, srcs in (("--data", res.sources), ("--val-data", vres.sources)):
        for s in srcs:
            if field_check and s.kind in ("jsonl", "csv"):
                p = _field_problem(s, d.text_field)
                if p:
                    problems.append(f"{opt} {s.name}: {p}")
    if res.sources and not res.problems and not d.val_data:
        total = sum(s.nbytes for s in res.sources)
        if 0 < total <= SMALL_DATA_BYTES and all(not s.sequential or s.kind == "csv" for s in res.sources):
            n_train = n_val = 0
            tr, va = SplitFilter("train", d.val_fraction, d.subset_ratio), SplitFilter("val", d.val_fraction)
            for s in res.sources:
                st = _count_split(s, tr, va)
                n_train += st[0]
                n_val += st[1]
            if n_val == 0:
                problems.append(f"--data: none of its documents falls in the validation split "
                                f"(--val-fraction {d.val_fraction}): raise --val-fraction, use "
                                "--text-split paragraph, or give --val-data")
            if n_train == 0:
                problems.append("--data: no training document is left after the validation split / "
                                "--subset-ratio")
    problems += tokenizer_problems(cfg)
    if d.on_bad_record == "fail" and not res.problems:
        for opt, srcs in (("--data", res.sources), ("--val-data", vres.sources)):
            why = bad_record_problem(srcs, d.text_field, opt)
            if why:
                problems.append(why)
    enc_problem = encoding_problem(d.encoding) if getattr(d, "encoding", None) else None
    if enc_problem:
        problems.append(enc_problem)
    else:
        for opt, srcs in (("--data", res.sources), ("--val-data", vres.sources)):
            problems += scan_sources(srcs, getattr(d, "encoding", None), opt)[0]
    return problems


def encoding_warnings(cfg) -> list[str]:
    """The undecodable-bytes warnings of check_data's scan (cached: no second read)."""
    d = cfg.data
    out: list[str] = []
    for opt, entries in (("--data", d.data), ("--val-data", d.val_data)):
        if entries:
            out += scan_sources(resolve_sources(entries, d, opt=opt).sources, getattr(d, "encoding", None),
                                opt)[1]
    return out


def _count_split(s: Source, tr: SplitFilter, va: SplitFilter) -> tuple[int, int]:
    n_tr = n_va = 0
    for raw in raw_chunks(s):
        for h in raw.hashes:
            n_tr += tr.keep(h)
            n_va += va.keep(h)
    return n_tr, n_va


def _field_problem(s: Source, text_field: str) -> str | None:
    """Look at the first records of the first file: do any parse and have the field?"""
    if isinstance(s, FileSource):
        f = next((f for f, z in zip(s.files, s.sizes) if z > 0), None)
        if f is None:
            return None
        raw = RawChunk()
        data = read_at(f, 0, min(os.path.getsize(f), 1 << 18))
        cut = data.rfind(b"\n")
        parse_jsonl(raw, f, data[:cut + 1] if cut >= 0 and len(data) == 1 << 18 else data, 0)
    elif isinstance(s, CsvSource):
        raw = read_csv_chunk(s.files[0], s.sizes[0], 0, 1 << 18, "\t" if s.files[0].endswith(".tsv") else ",")
    else:
        return None
    docs = raw.docs[:50]
    if not docs:
        if raw.bad:
            path, off, msg = raw.bad[0]
            return f"its first records are unreadable ({where(path, off)}: {msg})"
        return None
    errors = []
    for doc in docs:
        try:
            doc_text(doc, text_field)
            return None
        except ValueError as e:
            errors.append(str(e))
    return f"none of the first {len(docs)} records has text for --text-field {text_field!r}: {errors[0]}"


def bad_record_problem(sources, text_field: str, opt: str) -> str | None:
    """The first unreadable record of small data, as one problem (None: none found)."""
    if sum(s.nbytes for s in sources) > SMALL_DATA_BYTES:
        return None
    for s in sources:
        if s.kind not in ("text", "jsonl", "csv"):
            continue
        for raw in raw_chunks(s):
            bad = list(raw.bad)
            if not bad and s.kind != "text":
                for doc, loc in zip(raw.docs, raw.locs):
                    try:
                        doc_text(doc, text_field)
                    except ValueError as e:
                        bad.append((*loc, str(e)))
                        break
            if bad:
                path, off, msg = bad[0]
                return (f"{opt} {where(path, off)}: {msg} (--on-bad-record fail: fix or remove the record, "
                        "or use --on-bad-record skip to count and skip bad records)")
    return None
