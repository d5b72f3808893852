"""Sources: a named input made of read units, and how one read task (a few units) is run.

A :class:`Source` (files on a byte grid, CSV files read in order, in-memory documents, Parquet row groups,
a saved or streamed Hugging Face dataset) says how many units it has, how big each is, and which task
reads some of them; :func:`run_task` runs a task (in this process or a worker) and gives a
:class:`~memfit.data.readers.RawChunk`. Tasks are plain tuples, so worker processes need no source object.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from pathlib import Path

from memfit.data.encoding import is_utf8
from memfit.data.readers import (
    CHUNK_BYTES,
    MAX_RECORD_BYTES,
    DataError,
    RawChunk,
    doc_hash,
    parse_jsonl,
    parse_text,
    read_csv_chunk,
    read_grid_unit,
)

MAX_UNITS_PER_TASK = 4096        # small files grouped into one task
HF_ROWS_PER_UNIT = 1000


class Source:
    """A named data source made of read units. Subclasses say how units are read."""
    kind = "source"
    sequential = False          # units must be read in order, one chunk after another (CSV, hub)

    def __init__(self, name: str, weight: float | None):
        self.name = name
        self.weight = weight
        self.nbytes = 0
        self.num_units = 0

    def unit_bytes(self, u: int) -> int:
        raise NotImplementedError

    def task(self, units: list[int], offset: int = 0) -> tuple:
        raise NotImplementedError

    def fingerprint(self) -> str:
        return f"{self.kind}:{self.name}:{self.num_units}:{self.nbytes}"

    def describe(self) -> str:
        return f"{self.name} ({self.kind}, {self.nbytes / 1e6:.1f} MB)"


class FileSource(Source):
    """Text or JSONL files read on a byte grid (see the module docstring)."""

    def __init__(self, name, weight, fmt: str, files: list[str], sizes: list[int],
                 chunk: int = CHUNK_BYTES, text_unit: str = "file", encoding: str | None = None):
        super().__init__(name, weight)
        self.encoding = encoding
        self.kind = fmt
        self.fmt = fmt
        self.chunk = chunk
        self.text_unit = text_unit
        self.files = [str(f) for f in files]
        self.sizes = list(sizes)
        self.empty_files = sum(1 for s in self.sizes if s == 0)
        self.nbytes = sum(self.sizes)
        uf, uk = [], []
        for i, s in enumerate(self.sizes):
            if s <= 0:
                continue
            n = 1 if s <= chunk else math.ceil(s / chunk)
            uf.extend([i] * n)
            uk.extend(range(n))
        self._ufile, self._uk = uf, uk
        self.num_units = len(uf)

    def unit_bytes(self, u: int) -> int:
        s = self.sizes[self._ufile[u]]
        k = self._uk[u]
        return s if s <= self.chunk else min(self.chunk, s - k * self.chunk)

    def task(self, units, offset=0):
        items = [(self.files[self._ufile[u]], self.sizes[self._ufile[u]], self._uk[u]) for u in units]
        return ("grid", self.fmt, self.text_unit, self.chunk, items, self.encoding)

    def fingerprint(self):
        enc = "" if is_utf8(self.encoding) else f":{self.encoding}"    # UTF-8 runs keep their old one
        return f"{self.fmt}:{self.name}:{len(self.files)}:{self.nbytes}:{self.text_unit}{enc}"


class CsvSource(Source):
    sequential = True

    def __init__(self, name, weight, files, sizes, chunk=CHUNK_BYTES, encoding: str | None = None):
        super().__init__(name, weight)
        self.kind = "csv"
        self.encoding = encoding
        self.chunk = chunk
        keep = [(str(f), s) for f, s in zip(files, sizes) if s > 0]
        self.empty_files = len(files) - len(keep)
        self.files = [f for f, _ in keep]
        self.sizes = [s for _, s in keep]
        self.nbytes = sum(self.sizes)
        self.num_units = len(self.files)

    def unit_bytes(self, u):
        return self.sizes[u]

    def task(self, units, offset=0):
        (u,) = units
        delim = "\t" if self.files[u].lower().endswith(".tsv") else ","
        return ("csv", self.files[u], self.sizes[u], offset, self.chunk, delim, self.encoding)


class DocsSource(Source):
    """Documents held in memory (the kjv corpus: 1,189 chapters, 4 MB)."""

    def __init__(self, name, weight, docs: list[str]):
        super().__init__(name, weight)
        self.kind = "corpus"
        self.docs = docs
        self._bytes = [len(d.encode("utf-8")) for d in docs]
        self.nbytes = sum(self._bytes)
        self.num_units = len(docs)

    def unit_bytes(self, u):
        return self._bytes[u]

    def task(self, units, offset=0):
        return ("docs", self.name, [(u, self.docs[u]) for u in units])


class ParquetSource(Source):
    """Parquet row groups (needs pyarrow)."""

    def __init__(self, name, weight, files, sizes):
        super().__init__(name, weight)
        import pyarrow.parquet as pq
        self.kind = "parquet"
        self.files = [str(f) for f in files]
        self.units: list[tuple[int, int, int]] = []
        for i, f in enumerate(self.files):
            md = pq.ParquetFile(f).metadata
            for rg in range(md.num_row_groups):
                self.units.append((i, rg, md.row_group(rg).total_byte_size))
        self.nbytes = sum(sizes)
        self.empty_files = 0
        self.num_units = len(self.units)

    def unit_bytes(self, u):
        return max(1, self.units[u][2])

    def task(self, units, offset=0):
        return ("parquet", [(self.files[self.units[u][0]], self.units[u][1]) for u in units])


class HFDiskSource(Source):
    """A ``datasets`` dataset saved with ``save_to_disk`` (its 'train' split for a DatasetDict)."""

    def __init__(self, name, weight, path: str, split: str | None = None):
        super().__init__(name, weight)
        self.kind = "hf-disk"
        self.path = path
        ds = _hf_load_disk(path, split)
        self.split = split
        self.rows = len(ds)
        try:
            self.nbytes = int(sum(f.stat().st_size for f in Path(path).rglob("*.arrow")))
        except OSError:
            self.nbytes = 0
        self.num_units = max(0, math.ceil(self.rows / HF_ROWS_PER_UNIT))
        self._per_row = self.nbytes / max(1, self.rows)

    def unit_bytes(self, u):
        n = min(HF_ROWS_PER_UNIT, self.rows - u * HF_ROWS_PER_UNIT)
        return max(1, int(n * self._per_row))

    def task(self, units, offset=0):
        return ("hfdisk", self.path, self.split,
                [(u * HF_ROWS_PER_UNIT, min(self.rows, (u + 1) * HF_ROWS_PER_UNIT)) for u in units])


class HubSource(Source):
    """``hf:ID[:CONFIG][#SPLIT]`` streamed from the hub (``datasets``, network). Sequential: the
    position is the number of examples consumed; resuming skips that many (the hub cannot seek)."""
    sequential = True

    def __init__(self, name, weight, dataset_id: str, config: str | None, split: str):
        super().__init__(name, weight)
        self.kind = "hf-hub"
        self.dataset_id, self.config, self.split = dataset_id, config, split
        self.num_units = 1

    def unit_bytes(self, u):
        return 1

    def task(self, units, offset=0):
        return ("hub", self.dataset_id, self.config, self.split, offset, HF_ROWS_PER_UNIT)


_HF_CACHE: dict = {}
_HUB_ITERS: dict = {}


def _hf_load_disk(path, split):
    key = (path, split)
    if key not in _HF_CACHE:
        try:
            import datasets
        except ImportError:
            raise DataError(f"{path}: a saved Hugging Face dataset needs the 'datasets' package "
                            "(pip install datasets)") from None
        ds = datasets.load_from_disk(path)
        if hasattr(ds, "keys"):          # DatasetDict
            names = list(ds.keys())
            pick = split or ("train" if "train" in names else names[0])
            ds = ds[pick]
        _HF_CACHE[key] = ds
    return _HF_CACHE[key]


def _hf_records(batch: dict) -> list[dict]:
    cols = list(batch)
    n = len(batch[cols[0]]) if cols else 0
    return [{c: batch[c][i] for c in cols} for i in range(n)]


def _record_hash(rec) -> int:
    if isinstance(rec, str):
        return doc_hash(rec.encode("utf-8", "replace"))
    return doc_hash(json.dumps(rec, sort_keys=True, default=str).encode("utf-8", "replace"))


def run_task(task: tuple) -> RawChunk:
    """Read one task (one or more units): the documents it holds, in order."""
    kind = task[0]
    out = RawChunk()
    if kind == "grid":
        _, fmt, text_unit, chunk, items, enc = task
        limit = MAX_RECORD_BYTES if fmt == "jsonl" else chunk
        for path, size, k in items:
            data, start, end = read_grid_unit(path, size, k, chunk, limit)
            out.nbytes += len(data)
            if fmt == "jsonl":
                parse_jsonl(out, path, data, start, enc)
            else:
                parse_text(out, path, data, start, end, size, text_unit, enc)
        return out
    if kind == "csv":
        _, path, size, offset, chunk, delim, enc = task
        return read_csv_chunk(path, size, offset, chunk, delim, enc)
    if kind == "docs":
        _, name, items = task
        for i, text in items:
            b = text.encode("utf-8")
            out.nbytes += len(b)
            out.add(text, doc_hash(b), True, (name, i))
        return out
    if kind == "parquet":
        import pyarrow.parquet as pq
        for path, rg in task[1]:
            table = pq.ParquetFile(path).read_row_group(rg)
            out.nbytes += table.nbytes
            for j, rec in enumerate(table.to_pylist()):
                out.add(rec, _record_hash(rec), True, (path, j))
        return out
    if kind == "hfdisk":
        _, path, split, ranges = task
        ds = _hf_load_disk(path, split)
        for a, b in ranges:
            for j, rec in enumerate(_hf_records(ds[a:b])):
                out.add(rec, _record_hash(rec), True, (path, a + j))
        return out
    if kind == "hub":
        _, dsid, config, split, offset, n = task
        key = (dsid, config, split)
        it, pos = _HUB_ITERS.get(key, (None, -1))
        if it is None or pos != offset:
            try:
                import datasets
            except ImportError:
                raise DataError(f"hf:{dsid}: streaming from the hub needs the 'datasets' package "
                                "(pip install datasets) and a network") from None
            ds = datasets.load_dataset(dsid, config, split=split, streaming=True)
            if offset:
                ds = ds.skip(offset)
            it, pos = iter(ds), offset
        got = 0
        for rec in it:
            out.add(rec, _record_hash(rec), True, (f"hf:{dsid}", pos + got))
            got += 1
            if got >= n:
                break
        _HUB_ITERS[key] = (it, pos + got)
        out.next_offset = pos + got if got >= n else None
        return out
    raise ValueError(f"unknown read task {kind!r}")


def take_units(source: Source, order, pos: int, chunk: int) -> tuple[list[int], int]:
    """Consecutive units of ``order`` from ``pos`` adding up to about one chunk of bytes."""
    units: list[int] = []
    total = 0
    n = len(order)
    while pos < n and len(units) < MAX_UNITS_PER_TASK:
        u = int(order[pos])
        units.append(u)
        total += source.unit_bytes(u)
        pos += 1
        if total >= chunk:
            break
    return units, pos


def raw_chunks(s: Source, chunk: int = CHUNK_BYTES) -> Iterator[RawChunk]:
    if s.sequential:
        for u in range(s.num_units):
            off = 0
            while off is not None:
                raw = run_task(s.task([u], off))
                off = raw.next_offset
                yield raw
        return
    pos = 0
    order = range(s.num_units)
    while pos < s.num_units:
        units, pos = take_units(s, order, pos, chunk)
        yield run_task(s.task(units))
