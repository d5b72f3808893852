"""``memfit data inspect``: what an epoch is, before training.

Counts documents and tokens of the training and validation splits of every source (exact up to
16 MB per source, else extrapolated from a spread-out sample: the report says which), the tokenizer's
bytes per token, blocks and optimizer steps per epoch, bad records, and a few decoded sample blocks
from the start of the training stream.
"""

from __future__ import annotations

from typing import Any


def inspect_data(cfg, tokenizer, samples: int = 2, sample_chars: int = 240) -> dict[str, Any]:
    """A plain dict (JSON-serialisable) describing ``cfg.data`` as the training stream will see it."""
    from memfit.data.build import build_streams, max_docs_per_source, resolve_data
    from memfit.data.count import epoch_tokens, scan_source
    from memfit.data.readers import CHUNK_BYTES
    from memfit.data.sources import shares as source_shares
    from memfit.data.sources import split_filter
    from memfit.data.tokenizer import PackEncoder, special_ids

    d = cfg.data
    train_srcs, val_srcs = resolve_data(cfg, CHUNK_BYTES)
    enc = PackEncoder(tokenizer, d.text_field)
    eos, _ = special_ids(tokenizer)
    ftrain, fval = split_filter(d, "train"), split_filter(d, "val")
    limits = max_docs_per_source(cfg, train_srcs)
    shares = source_shares(train_srcs)
    out_sources = []
    train_tokens = []
    val_tokens = 0
    val_docs = 0
    exact = True
    bytes_read = tokens_read = 0
    for i, s in enumerate(train_srcs):
        filters = {"train": ftrain} if val_srcs is not None else {"train": ftrain, "val": fval}
        info = scan_source(s, enc, filters, eos is not None)
        exact &= info["exact"]
        t = info["train"]["tokens"]
        docs = info["train"]["docs"]
        if limits is not None and docs > limits[i]:
            t = int(t * limits[i] / max(1, docs))
            docs = limits[i]
        train_tokens.append(t)
        entry = {
            "name": s.name, "kind": s.kind, "bytes": s.nbytes, "weight": s.weight, "share": shares[i],
            "files": len(getattr(s, "files", []) or []) or None,
            "empty_files": getattr(s, "empty_files", 0),
            "train_docs": docs, "train_tokens": t, "exact": info["exact"],
            "bad_records": info["bad_records"], "replaced_chars": info["replaced_chars"],
            "bad_examples": info["bad_examples"],
        }
        if "val" in info:
            entry["val_docs"] = info["val"]["docs"]
            entry["val_tokens"] = info["val"]["tokens"]
            val_docs += info["val"]["docs"]
            val_tokens += info["val"]["tokens"]
        out_sources.append(entry)
        if info["exact"]:
            bytes_read += s.nbytes
            tokens_read += info["train"]["tokens"] + info.get("val", {}).get("tokens", 0)
    if val_srcs is not None:
        for s in val_srcs:
            info = scan_source(s, enc, {"val": fval}, eos is not None)
            exact &= info["exact"]
            val_docs += info["val"]["docs"]
            val_tokens += info["val"]["tokens"]
            out_sources.append({"name": s.name, "kind": s.kind, "bytes": s.nbytes, "role": "val",
                                "val_docs": info["val"]["docs"], "val_tokens": info["val"]["tokens"],
                                "exact": info["exact"], "bad_records": info["bad_records"],
                                "replaced_chars": info["replaced_chars"],
                                "bad_examples": info["bad_examples"]})
    per_epoch = epoch_tokens(train_tokens, [s.weight for s in train_srcs])
    stride = d.stride or d.seq_len
    blocks = max(0, (per_epoch - d.seq_len) // stride + 1) if per_epoch >= d.seq_len else 0
    eff = cfg.effective_batch()
    total_bytes = sum(s.nbytes for s in train_srcs)
    bpt = None
    if tokens_read:
        bpt = bytes_read / tokens_read
    elif sum(train_tokens):
        bpt = total_bytes / max(1, sum(train_tokens))
    report: dict[str, Any] = {
        "sources": out_sources,
        "tokenizer": {"name": d.tokenizer, "vocab_size": len(tokenizer), "bytes_per_token": bpt,
                      "eos_id": eos},
        "tokens_per_epoch": per_epoch,
        "exact": exact,
        "val_docs": val_docs,
        "val_tokens": val_tokens,
        "seq_len": d.seq_len,
        "stride": stride,
        "blocks_per_epoch": blocks,
        "effective_batch": eff,
        "steps_per_epoch": blocks // eff if eff else None,
        "samples": [],
    }
    if samples > 0 and per_epoch > 0:
        quick = cfg.replace(data={"shuffle_buffer_size": 0})    # the first documents, read in order
        train, val = build_streams(quick, tokenizer, max(1, samples), cfg.train.seed, num_workers=0)
        try:
            b = next(iter(train))
            for row in b["input_ids"][:samples]:
                report["samples"].append(tokenizer.decode(row.tolist())[:sample_chars])
        finally:
            train.close()
            val.close()
    return report


def _n(x) -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        return f"{x:.2f}"
    return f"{x:,}"


def format_report(r: dict[str, Any]) -> str:
    """The printable form of :func:`inspect_data`'s dict."""
    lines = ["memfit data inspect", ""]
    lines.append(f"{'source':<28} {'kind':<8} {'MB':>8} {'share':>6} {'train docs':>11} "
                 f"{'train tokens':>13} {'val docs':>9} {'val tokens':>11}  count")
    for s in r["sources"]:
        share = f"{s['share']:.2f}" if "share" in s else "val"
        lines.append(f"{s['name'][:28]:<28} {s['kind']:<8} {s['bytes'] / 1e6:>8.2f} {share:>6} "
                     f"{_n(s.get('train_docs')):>11} {_n(s.get('train_tokens')):>13} "
                     f"{_n(s.get('val_docs')):>9} {_n(s.get('val_tokens')):>11}  "
                     f"{'exact' if s['exact'] else 'estimated'}")
        if s.get("empty_files"):
            lines.append(f"    {s['empty_files']} empty file(s) skipped")
        if s.get("bad_records"):
            lines.append(f"    {s['bad_records']:,} bad record(s) skipped, e.g. "
                         + "; ".join(s["bad_examples"][:2]))
        if s.get("replaced_chars"):
            lines.append(f"    {s['replaced_chars']:,} undecodable byte sequence(s) replaced by U+FFFD")
    t = r["tokenizer"]
    lines += ["",
              (f"tokenizer        {t['name']} (vocab {t['vocab_size']:,}), "
               f"{_n(t['bytes_per_token'])} bytes/token"),
              f"tokens / epoch   {_n(r['tokens_per_epoch'])} ({'exact' if r['exact'] else 'estimated'})",
              f"validation       {_n(r['val_docs'])} docs, {_n(r['val_tokens'])} tokens",
              f"blocks / epoch   {_n(r['blocks_per_epoch'])} of {r['seq_len']} tokens (stride {r['stride']})",
              f"steps / epoch    {_n(r['steps_per_epoch'])} at an effective batch of {r['effective_batch']}"]
    if r["samples"]:
        lines += ["", "sample blocks (the first training documents, unshuffled):"]
        for k, s in enumerate(r["samples"]):
            lines.append(f"  [{k}] {s!r}")
    return "\n".join(lines)


def inspect_main(cfg) -> int:
    """Print the data report; 2 (with every problem listed) when the data cannot be used."""
    from memfit.data.check import check_data
    from memfit.data.readers import DataError
    from memfit.data.tokenizer import build_tokenizer
    problems = check_data(cfg)
    if problems:
        print(f"memfit: {len(problems)} problem(s) with the data:")
        for p in problems:
            print(f"  - {p}")
        return 2
    try:
        tok = build_tokenizer(cfg, None)
        print(format_report(inspect_data(cfg, tok)))
    except DataError as e:
        print(f"memfit: {len(e.problems)} problem(s) with the data:")
        for p in e.problems:
            print(f"  - {p}")
        return 2
    return 0
