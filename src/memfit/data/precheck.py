"""`--on-bad-record fail`, checked before anything is written: for data small enough to scan
(sources.SMALL_DATA_BYTES), the first unreadable record (bad JSON, a CSV row with the wrong column
count, a record without --text-field) is reported by check_data, so the run stops with exit 2 before
config.yaml, tokenizer/ or a checkpoint exist (a rerun with the fix is then not refused as "a different
run"). Larger data is still stopped by the stream at the first bad record it meets."""

from __future__ import annotations


def bad_record_problem(sources, text_field: str, opt: str) -> str | None:
    from memfit.data import sources as S
    from memfit.data.tokenizer import doc_text
    if sum(s.nbytes for s in sources) > S.SMALL_DATA_BYTES:
        return None
    for s in sources:
        if s.kind not in ("text", "jsonl", "csv"):
            continue
        for raw in S._raw_chunks(s):
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
                return (f"{opt} {S.where(path, off)}: {msg} (--on-bad-record fail: fix or remove the record, "
                        "or use --on-bad-record skip to count and skip bad records)")
    return None
