"""Fine-tuning data: records read, split train/validation deterministically, encoded to examples.

The split is by a hash of each record's content (never by file order), so the same data always gives
the same validation set and a record never moves between the two; classification splits per class
(stratified) so every class keeps its share of the validation set.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from memfit import config as C
from memfit.data.formats import (
    detect_format,
    encode_record,
    expand_paths,
    format_problem,
    prompt_text,
    read_records,
    response_text,
)

log = logging.getLogger("memfit")


def record_hash(record: Any) -> str:
    return hashlib.sha1(json.dumps(record, sort_keys=True, default=str).encode()).hexdigest()


def hash_split(items: list[Any], fraction: float, key=record_hash) -> tuple[list[Any], list[Any]]:
    """(train, val): the ceil(fraction * n) items with the smallest content hashes are validation."""
    if len(items) < 2:
        return list(items), []
    k = min(len(items) - 1, max(1, math.ceil(fraction * len(items))))
    ranked = sorted(range(len(items)), key=lambda i: key(items[i]))
    val_idx = set(ranked[:k])
    train = [x for i, x in enumerate(items) if i not in val_idx]
    return train, [x for i, x in enumerate(items) if i in val_idx]


def stratified_split(pairs: list[tuple[str, str]], fraction: float) -> tuple[list, list]:
    """hash_split within each label: fixed, and every class keeps `fraction` of its items in validation."""
    by_label: dict[str, list] = {}
    for p in pairs:
        by_label.setdefault(p[1], []).append(p)
    train, val = [], []
    for label in sorted(by_label):
        t, v = hash_split(by_label[label], fraction, key=lambda p: record_hash(p[0]))
        train += t
        val += v
    return train, val


def cap_stratified(pairs: list[tuple[str, str]], n: int) -> list[tuple[str, str]]:
    """At most n of `pairs`, each label keeping its share (largest remainders, >= 1 per label while n
    allows), the smallest content hashes of each label first: the same subset on every run."""
    if len(pairs) <= n:
        return list(pairs)
    by_label: dict[str, list] = {}
    for p in pairs:
        by_label.setdefault(p[1], []).append(p)
    exact = {lab: n * len(v) / len(pairs) for lab, v in by_label.items()}
    quota = {lab: min(len(by_label[lab]), max(1, math.floor(x))) for lab, x in exact.items()}
    for lab in sorted(exact, key=lambda lab: (quota[lab] - exact[lab], lab)):   # most short-changed first
        if sum(quota.values()) >= n:
            break
        quota[lab] = min(len(by_label[lab]), quota[lab] + 1)
    while sum(quota.values()) > n:   # the >= 1 floors overshot: take back where most was given beyond share
        over = [q for q in quota if quota[q] > 1] or [q for q in quota if quota[q] > 0]
        quota[max(over, key=lambda lab: (quota[lab] - exact[lab], -len(by_label[lab]), lab))] -= 1
    keep = {id(p) for lab, v in by_label.items()
            for p in sorted(v, key=lambda p: record_hash(p[0]))[:quota[lab]]}
    return [p for p in pairs if id(p) in keep]


def limit(items: list[Any], dcfg: C.DataConfig) -> list[Any]:
    """--max-examples / --subset-ratio on the training side only (validation stays whole)."""
    n = len(items)
    if dcfg.subset_ratio is not None:
        n = max(1, int(n * dcfg.subset_ratio))
    if dcfg.max_examples is not None:
        n = min(n, dcfg.max_examples)
    if n >= len(items):
        return items
    keep = sorted(range(len(items)), key=lambda i: record_hash(items[i]))[:n]   # spread over the whole set
    return [items[i] for i in sorted(keep)]


@dataclass
class LMData:
    train: list[dict[str, Any]]
    val: list[dict[str, Any]]
    prompts: list[tuple[str, str, bool]]   # held-out (prompt, reference, add_special_tokens) for samples
    counts: Counter = field(default_factory=Counter)

    def describe(self) -> str:
        c = self.counts
        parts = [f"{len(self.train)} training / {len(self.val)} validation examples",
                 ", ".join(f"{n} {fmt}" for fmt, n in sorted(c.items()) if fmt.startswith("format:")).replace(
                     "format:", "")]
        for key, what in (("bad", "bad records skipped"), ("unknown", "records of no known format skipped"),
                          ("no_response", "examples skipped: truncation left no response tokens"),
                          ("truncated", "examples truncated to --max-seq-len")):
            if c[key]:
                parts.append(f"{c[key]} {what}")
        return "; ".join(p for p in parts if p)


def row_length(cfg: C.Config, model_config: Any) -> int:
    """Tokens per example (padded) or per packed row: --max-seq-len, else 1024, never beyond the
    model's context. The plan prices the same length (plan.spec.finetune_seq_len)."""
    ctx = getattr(model_config, "max_position_embeddings", None) or getattr(model_config, "n_positions", 1024)
    return min(cfg.data.max_seq_len or 1024, ctx)


def read_lm_records(specs, dcfg: C.DataConfig, counts: Counter,
                    max_records: int | None = None) -> list[dict[str, Any]]:
    files, problems = expand_paths(specs)
    if problems:
        raise C.ConfigError(problems)
    records = []
    try:
        for where, rec in read_records(files, dcfg.on_bad_record):
            fmt = detect_format(rec, dcfg.text_field) if isinstance(rec, dict) else None
            if rec is None or fmt is None:
                if dcfg.on_bad_record == "fail":
                    raise ValueError(f"{where}: " + ("not a JSON object" if rec is None else
                                                     format_problem(rec, dcfg.text_field)))
                counts["bad" if rec is None else "unknown"] += 1
                if counts["bad"] + counts["unknown"] <= 3:
                    log.warning(f"skipping {where}: " + ("not a JSON object" if rec is None else
                                                          format_problem(rec, dcfg.text_field)))
                continue
            counts[f"format:{fmt}"] += 1
            records.append(rec)
            if max_records is not None and len(records) >= max_records:
                break             # the plan's sample of a large file (plan.epoch.packed_epoch)
    except ValueError as e:
        raise C.ConfigError([str(e)]) from None
    return records


def build_lm_data(cfg: C.Config, tokenizer, max_len: int, max_records: int | None = None) -> LMData:
    """Read --data (and --val-data), split, encode; raises ConfigError when nothing trainable is left.
    max_records: only the first records of --data (the plan's sample)."""
    d = cfg.data
    counts: Counter = Counter()
    records = read_lm_records(d.data, d, counts, max_records)
    if d.val_data:
        train_recs, val_recs = records, read_lm_records(d.val_data, d, Counter())
    else:
        train_recs, val_recs = hash_split(records, d.val_fraction)
    train_recs = limit(train_recs, d)

    def encode(recs: list[dict[str, Any]]) -> list[dict[str, Any]]:
        out = []
        for rec in recs:
            fmt = detect_format(rec, d.text_field)
            for ex in encode_record(rec, tokenizer, fmt, max_len, cfg.lora.train_on_prompt, d.text_field):
                if not any(t != -100 for t in ex["labels"][1:]):
                    counts["no_response"] += 1
                    continue
                if fmt != "text" and len(ex["input_ids"]) == max_len:
                    counts["truncated"] += 1
                out.append(ex)
        return out

    data = LMData(encode(train_recs), encode(val_recs), [], counts)
    for rec in val_recs[:2]:
        fmt = detect_format(rec, d.text_field)
        if fmt == "text":
            text = rec.get("_text") or rec[d.text_field]
            ids = tokenizer(text)["input_ids"]
            data.prompts.append((tokenizer.decode(ids[:24], skip_special_tokens=True),
                                 tokenizer.decode(ids[24:64]), True))
        else:
            # A prompt rendered by the chat template already holds its special tokens.
            templated = fmt == "chat" or (fmt == "alpaca" and bool(tokenizer.chat_template))
            data.prompts.append((prompt_text(rec, tokenizer, fmt), response_text(rec, fmt), not templated))
    if not data.train:
        raise C.ConfigError([f"--data {' '.join(d.data)}: no usable training examples ({data.describe()})"])
    if not data.val:
        raise C.ConfigError([f"no validation examples: give --val-data or more than one record in --data "
                             f"({data.describe()})"])
    return data
