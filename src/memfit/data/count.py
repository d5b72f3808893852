"""Counting: documents and tokens per split (exact for small data, else extrapolated), tokens per epoch,
and the token ids of a split in canonical order. Nothing here consumes RNG or leaves state behind."""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import numpy as np

from memfit.data.build import max_docs_per_source, resolve_data
from memfit.data.readers import CHUNK_BYTES, DataError, where
from memfit.data.sources import SplitFilter, split_filter
from memfit.data.tokenizer import PackEncoder, special_ids
from memfit.data.units import Source, raw_chunks, run_task

EXACT_SCAN_BYTES = 16_000_000     # estimate_tokens: tokenize everything up to this size
SAMPLE_SCAN_BYTES = 4_000_000     # ... else extrapolate from this many bytes spread over the data


def scan_source(source: Source, encoder, filters: dict[str, SplitFilter], eos: bool,
                exact_bytes: int = EXACT_SCAN_BYTES, sample_bytes: int = SAMPLE_SCAN_BYTES,
                chunk: int = CHUNK_BYTES) -> dict:
    """Documents and tokens of each named split of one source: exact when the source is at most
    ``exact_bytes`` (everything is read and tokenized), else extrapolated by bytes from
    ``sample_bytes`` read at evenly spaced units. Canonical order; no RNG."""
    if source.nbytes <= 0:
        raise DataError(f"{source.name}: its size is unknown, so tokens per epoch cannot be counted; "
                          "give --max-steps")
    exact = source.nbytes <= exact_bytes
    counts = {k: {"docs": 0, "pieces": 0, "tokens": 0} for k in filters}
    info = {"bad_records": 0, "replaced_chars": 0, "bytes_read": 0, "bad_examples": []}
    n = source.num_units
    if exact:
        raws: Any = raw_chunks(source, chunk)
    elif source.sequential:          # CSV: the first sample_bytes of each file, in order
        raws = _first_bytes(source, sample_bytes)
    else:
        k = max(1, min(n, math.ceil(sample_bytes / max(1, source.nbytes / max(1, n)))))
        picks = sorted({int(j * n / k) for j in range(k)})
        raws = (run_task(source.task([u])) for u in picks)
    read = 0
    for raw in raws:
        read += raw.nbytes
        info["bad_records"] += len(raw.bad)
        info["replaced_chars"] += raw.replaced
        for path, off, msg in raw.bad[: max(0, 3 - len(info["bad_examples"]))]:
            info["bad_examples"].append(f"{where(path, off)}: {msg}")
        keep = [i for i, h in enumerate(raw.hashes) if any(f.keep(h) for f in filters.values())]
        enc = encoder([raw.docs[i] for i in keep]) if keep else []
        for (ids, _, err), i in zip(enc, keep):
            if err is not None:
                info["bad_records"] += 1
                continue
            if ids.size == 0:
                continue
            for name, f in filters.items():
                if f.keep(raw.hashes[i]):
                    c = counts[name]
                    c["pieces"] += 1
                    c["docs"] += bool(raw.ends[i])
                    c["tokens"] += int(ids.size) + (1 if (eos and raw.ends[i]) else 0)
    info["bytes_read"] = read
    if not exact and read > 0:
        scale = source.nbytes / read
        for c in counts.values():
            for key in c:
                c[key] = round(c[key] * scale)
    info["exact"] = exact
    info.update(counts)
    return info


def _first_bytes(source: Source, budget: int):
    per_unit = max(1, budget // max(1, source.num_units))
    for u in range(source.num_units):
        off, got = 0, 0
        while off is not None and got < per_unit:
            raw = run_task(source.task([u], off))
            off = raw.next_offset
            got += raw.nbytes
            yield raw


def epoch_tokens(per_source_tokens: list[int], weights: list[float]) -> int:
    """Tokens until every mixed source has completed one pass: max_i T_i / share_i."""
    if len(per_source_tokens) == 1:
        return int(per_source_tokens[0])
    total = sum(weights) or 1.0
    return int(max(t / (w / total) for t, w in zip(per_source_tokens, weights)))


def estimate_tokens(cfg, tokenizer) -> int:
    """Training-split tokens per epoch (EOS separators included), for the LR schedule / --epochs.

    Exact (every document read and tokenized) for sources up to 16 MB; for larger sources an
    estimate extrapolated by bytes from ~4 MB read at evenly spaced units. ``--max-examples`` caps a
    source at its share of documents times the mean tokens per document. With several mixed sources
    one epoch lasts until every source has completed a pass (max over sources of tokens / share).
    Reads data but consumes no RNG and leaves no state behind.
    """
    srcs, _ = resolve_data(cfg, CHUNK_BYTES)
    enc = PackEncoder(tokenizer, cfg.data.text_field)
    eos, _ = special_ids(tokenizer)
    filt = split_filter(cfg.data, "train")
    limits = max_docs_per_source(cfg, srcs)
    toks = []
    for i, s in enumerate(srcs):
        c = scan_source(s, enc, {"train": filt}, eos is not None)["train"]
        t = c["tokens"]
        if limits is not None and c["docs"] > limits[i]:
            t = int(t * limits[i] / max(1, c["docs"]))
        toks.append(t)
    return epoch_tokens(toks, [s.weight for s in srcs])


def iter_split_tokens(cfg, tokenizer, role: str = "train") -> Iterator[np.ndarray]:
    """Token ids (int32 arrays, EOS appended where a document ends) of every training or validation
    document in canonical order, unshuffled and unpacked: for baselines (e.g. a unigram model fitted
    on the training split) and counts. Consumes no RNG."""
    train_srcs, val_srcs = resolve_data(cfg, CHUNK_BYTES)
    srcs = val_srcs if (role == "val" and val_srcs is not None) else train_srcs
    filt = split_filter(cfg.data, role)
    enc = PackEncoder(tokenizer, cfg.data.text_field)
    eos, _ = special_ids(tokenizer)
    tail = None if eos is None else np.array([eos], np.int32)
    for s in srcs:
        for raw in raw_chunks(s):
            keep = [i for i, h in enumerate(raw.hashes) if filt.keep(h)]
            for (ids, _, err), i in zip(enc([raw.docs[i] for i in keep]), keep):
                if err is None and ids.size:
                    yield np.concatenate([ids, tail]) if (tail is not None and raw.ends[i]) else ids
