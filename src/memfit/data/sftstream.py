"""Fine-tuning examples streamed from large JSONL files: bounded host RAM whatever the size, exact resume.

Records are read in windows of WINDOW lines (a byte offset into one file starts each window); a window is
shuffled by (seed, epoch, file, offset) and its records are encoded only as they are yielded. A position
is (epoch, file, window offset, index in the window, example of that record, training records seen), so
a resume seeks to the window, re-reads and re-shuffles it and skips what was consumed: no replay of the
file, and the batches after a resume are the batches the uninterrupted run would have trained on.

Validation: a record is held out when its content hash falls below --val-fraction (the same record always,
wherever it lies); the first VAL_RECORDS held-out records of the files are the validation set, read once
before training. --subset-ratio keeps records by a second content hash; --max-examples ends each epoch
after that many training records (in stream order). jobs/finetune streams --data above STREAM_BYTES, and
every Hugging Face dataset (data/hfrecords.py: a table read by row index instead of by byte offset).
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

from memfit import config as C
from memfit.data.batches import PaddedBatches
from memfit.data.examples import record_hash
from memfit.data.formats import detect_format, encode_record
from memfit.data.packing import pack_rows

log = logging.getLogger("memfit")
STREAM_BYTES = 64 * 2**20     # --data larger than this (all .jsonl) is streamed, not loaded whole
WINDOW = 4096                 # records shuffled together: ~1 MB of JSON at Alpaca sizes
VAL_RECORDS = 512


def streamable(files: list[Path]) -> bool:
    return bool(files) and all(f.suffix == ".jsonl" for f in files) and \
        sum(f.stat().st_size for f in files) > STREAM_BYTES


def _unit(rec: dict[str, Any], salt: str = "") -> float:
    """A record's place in [0, 1), fixed by its content."""
    return int(record_hash(rec if not salt else [salt, rec])[:8], 16) / 2**32


class JsonlTable:
    """One JSONL file for the stream: `size` in bytes, `window` of lines from a byte offset."""

    def __init__(self, path: Path) -> None:
        self.name, self.path, self.size = str(path), path, path.stat().st_size

    def window(self, offset: int, n: int) -> tuple[list[bytes], int]:
        """Up to n non-empty lines from offset, and the offset after them."""
        lines = []
        with open(self.path, "rb") as fh:
            fh.seek(offset)
            while len(lines) < n:
                line = fh.readline()
                if not line:
                    break
                if line.strip():
                    lines.append(line)
            return lines, fh.tell()

    def rows(self):
        with open(self.path, "rb") as fh:
            yield from (line for line in fh if line.strip())


class ExampleStream:
    """Encoded training examples from `files` (JSONL paths, or tables: data/hfrecords.ArrowTable), epoch
    after epoch; StreamedBatches holds its position in the checkpoint."""

    def __init__(self, files: list, cfg: C.Config, tokenizer, max_len: int) -> None:
        self.tables = [f if hasattr(f, "window") else JsonlTable(f) for f in files]
        self.files = [t.name for t in self.tables]
        self.tokenizer, self.max_len = tokenizer, max_len
        self.d, self.train_on_prompt, self.seed = cfg.data, cfg.lora.train_on_prompt, cfg.train.seed
        self.val_fraction = 0.0 if cfg.data.val_data else cfg.data.val_fraction
        self.pos = {"epoch": 0, "file": 0, "offset": 0, "index": 0, "example": 0, "seen": 0}
        self.counts: Counter = Counter()

    def held_out(self, rec: dict[str, Any]) -> bool:
        return _unit(rec) < self.val_fraction

    def kept(self, rec: Any) -> bool:
        if not isinstance(rec, dict) or detect_format(rec, self.d.text_field) is None or self.held_out(rec):
            return False
        return self.d.subset_ratio is None or _unit(rec, "subset") < self.d.subset_ratio

    def record(self, raw) -> Any:
        """A JSONL line parsed (None when it is not JSON), or a table's row as it is."""
        if not isinstance(raw, (bytes, str)):
            return raw
        try:
            return json.loads(raw)
        except ValueError:
            if self.d.on_bad_record == "fail":
                raise ValueError(f"not a JSON object: {raw[:80]!r}") from None
            return None

    def encode(self, raw) -> list[dict[str, Any]]:
        rec = self.record(raw)
        if not self.kept(rec):
            return []
        fmt = detect_format(rec, self.d.text_field)
        out = encode_record(rec, self.tokenizer, fmt, self.max_len, self.train_on_prompt, self.d.text_field)
        return [ex for ex in out if any(t != -100 for t in ex["labels"][1:])]

    def __iter__(self) -> Iterator[tuple[dict[str, int], dict[str, Any]]]:
        """(the position of this example, the example), forever; the position resumes AT the example."""
        p = self.pos
        while True:
            lines, end = self.tables[p["file"]].window(p["offset"], WINDOW)
            order = np.random.default_rng([self.seed, p["epoch"], p["file"], p["offset"]]).permutation(len(lines))
            while p["index"] < len(lines):
                exs = self.encode(lines[order[p["index"]]])
                while p["example"] < len(exs):
                    yield dict(p), exs[p["example"]]
                    p["example"] += 1
                p["index"], p["example"], p["seen"] = p["index"] + 1, 0, p["seen"] + bool(exs)
                if self.d.max_examples is not None and p["seen"] >= self.d.max_examples:
                    end = None
                    break
            p["index"], p["offset"] = 0, end
            if end is None or end >= self.tables[p["file"]].size:
                p["file"], p["offset"] = p["file"] + 1, 0
                if end is None or p["file"] == len(self.files):
                    if p["epoch"] == 0 and p["seen"] == 0:
                        raise C.ConfigError(["--data: no usable training examples in the stream"])
                    p.update(epoch=p["epoch"] + 1, file=0, offset=0, seen=0)

    def validation(self, val_files: list[Path]) -> list[dict[str, Any]]:
        """The first VAL_RECORDS held-out records of the files (or of --val-data's), encoded (read once,
        before training)."""
        out: list[dict[str, Any]] = []
        for table in [JsonlTable(f) for f in val_files] or self.tables:
            for raw in table.rows():
                try:
                    rec = self.record(raw)
                except ValueError:
                    rec = None
                if not isinstance(rec, dict) or detect_format(rec, self.d.text_field) is None \
                        or not (val_files or self.held_out(rec)):
                    continue
                fmt = detect_format(rec, self.d.text_field)
                out += encode_record(rec, self.tokenizer, fmt, self.max_len, self.train_on_prompt,
                                     self.d.text_field)
                if len(out) >= VAL_RECORDS:
                    return out
        return out


class StreamedBatches:
    """Effective batches of `rows` rows over an ExampleStream: packed first-fit (as PackedBatches, in
    stream order) or padded. The state is the stream position of the next example not yet in a batch."""

    def __init__(self, stream: ExampleStream, rows: int, pad_id: int, seq_len: int | None) -> None:
        self.stream, self.rows, self.pad_id, self.seq_len = stream, rows, pad_id, seq_len

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        it = iter(self.stream)
        pending = next(it)
        while True:
            batch: list[list[dict[str, Any]]] = [[] for _ in range(self.rows)]
            filled = [0] * self.rows
            while True:
                ex = pending[1]
                n = min(len(ex["input_ids"]), self.seq_len or 1 << 30)
                r = (next((r for r in range(self.rows) if filled[r] + n <= self.seq_len), None) if self.seq_len
                     else next((r for r in range(self.rows) if not batch[r]), None))
                if r is None:
                    break
                batch[r].append(ex)
                filled[r] += n
                pending = next(it)
            self.stream.pos = dict(pending[0])   # the state names the next batch's first example
            rows = [row for row in batch if row]
            if self.seq_len:
                yield pack_rows(rows, self.pad_id, self.seq_len)
            else:
                exs = [row[0] for row in rows]
                yield PaddedBatches(exs, len(exs), self.pad_id, shuffle=False).collate(range(len(exs)))

    def state_dict(self) -> dict[str, Any]:
        return {**self.stream.pos, "seed": self.stream.seed, "rows": self.rows, "packed": self.seq_len,
                "files": list(self.stream.files)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("packed") != self.seq_len or state.get("files") != list(self.stream.files):
            raise ValueError("the checkpoint's data stream was another (files or packing differ)")
        self.stream.pos = {k: int(state[k]) for k in ("epoch", "file", "offset", "index", "example", "seen")}

    @property
    def epoch(self) -> int:
        return self.stream.pos["epoch"]
