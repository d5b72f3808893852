"""Lazy data sources with byte positions: what ``--data`` / ``--val-data`` name, and how they are read.

``--data`` syntax (one or more entries, each optionally ``@WEIGHT``):

- a corpus name: ``shakespeare``, ``kjv``, ``bbc`` (see :mod:`memfit.data.corpora`);
- a file: ``.txt``/``.md``/other text (one document per file, or per blank-line block with
  ``--text-split paragraph``), ``.jsonl``/``.ndjson`` (``--text-field``, or a template such as
  ``"{instruction}\\n{output}"``), ``.csv``/``.tsv`` (a column or template), ``.parquet`` (needs pyarrow);
- a directory (every supported file below it, sorted) or a glob (``data/**/*.txt``);
- a Hugging Face dataset saved with ``save_to_disk`` (a directory), or ``hf:ID[:CONFIG][#SPLIT]`` streamed
  from the hub (both need the ``datasets`` package; the hub needs a network).

Mixing: ``--data shakespeare@3 kjv@1`` draws 3 training *tokens* from shakespeare for every 1 from kjv
(a deterministic deficit schedule, not a random draw). Entries without a weight get weight 1 when any
entry has one; when none has a weight, sources are mixed in proportion to their sizes (one epoch is
then about one pass over everything). A small source repeats (its own passes, each reshuffled) until
every source has completed a pass: that is one epoch of the mixture.

Reading is by *units*: a file of at most one chunk (``CHUNK_BYTES``, 1 MiB) is one unit; a larger file
is cut on a fixed byte grid whose boundaries are moved to the next newline (text, JSONL), so any unit can
be read on its own, in any order, by any process, and always gives the same documents. A document that
spans several units becomes several *pieces*; only the last ends the document (gets EOS).

Nothing here imports torch. Every byte read from a file goes through :func:`read_at` (counted in
:data:`IO`, which the resume tests use).
"""

from __future__ import annotations

import csv
import difflib
import glob as globmod
import hashlib
import io
import json
import math
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from memfit.data.encoding import decode_bytes, encoding_problem, is_utf8, scan_sources

CHUNK_BYTES = 1 << 20            # one read unit
LOOKAHEAD = 1 << 12              # read past a unit's end to find the next newline in the same read
MAX_RECORD_BYTES = 64 << 20      # a JSONL/CSV record longer than this is a bad record, not an OOM
MAX_UNITS_PER_TASK = 4096        # small files grouped into one task
HF_ROWS_PER_UNIT = 1000

TEXT_EXT = {".txt", ".text", ".md", ".rst", ".tex", ".py", ".log", ""}
JSONL_EXT = {".jsonl", ".ndjson", ".json"}
CSV_EXT = {".csv", ".tsv"}
PARQUET_EXT = {".parquet", ".pq"}
COMPRESSED_EXT = {".gz", ".bz2", ".xz", ".zst", ".zip", ".7z", ".tar", ".lz4"}


class DataError(ValueError):
    """Bad data found while reading (a record with --on-bad-record fail, a source with no documents).

    ``problems`` lists every problem; the CLI prints them and exits 2.
    """

    def __init__(self, problems: list[str] | str):
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        super().__init__("; ".join(self.problems))

    def __reduce__(self):          # picklable from worker processes
        return (DataError, (self.problems,))


# ---------------------------------------------------------------- instrumented reads

class IOCounter:
    """Bytes and read calls made through :func:`read_at` in this process."""

    def __init__(self) -> None:
        self.bytes = 0
        self.reads = 0

    def reset(self) -> None:
        self.bytes = 0
        self.reads = 0


IO = IOCounter()


def read_at(path: str, offset: int, n: int) -> bytes:
    if n <= 0:
        return b""
    with open(path, "rb") as f:
        f.seek(offset)
        b = f.read(n)
    IO.bytes += len(b)
    IO.reads += 1
    return b


def line_number(path: str, offset: int) -> int:
    """1-based line of byte ``offset`` (reads the file up to it; only used for error messages)."""
    n, pos, step = 1, 0, 1 << 22
    while pos < offset:
        b = read_at(path, pos, min(step, offset - pos))
        if not b:
            break
        n += b.count(b"\n")
        pos += len(b)
    return n


def where(path: str, offset: int | None) -> str:
    if offset is None:
        return str(path)
    if not os.path.isfile(path):
        return f"{path}[{offset}]"      # an in-memory document index or a dataset row
    return f"{path}:{line_number(path, offset)}"


# ---------------------------------------------------------------- hashing / split

def doc_hash(b: bytes) -> int:
    return int.from_bytes(hashlib.blake2b(b, digest_size=8).digest(), "little")


@dataclass(frozen=True)
class SplitFilter:
    """Which documents a stream keeps, from a 64-bit content hash (low 32 bits: train/val split;
    high 32 bits: --subset-ratio). Seed-independent, so validation never leaks into training and the
    same document always lands on the same side (duplicates included)."""
    role: str = "all"                 # 'train' | 'val' | 'all'
    val_fraction: float = 0.0
    subset_ratio: float | None = None
    separate_val: bool = False        # --val-data given: no split of --data

    def keep(self, h: int) -> bool:
        if self.role == "all":
            return True
        is_val = (not self.separate_val) and (h & 0xFFFFFFFF) < self.val_fraction * 4294967296.0
        if self.role == "val":
            return self.separate_val or is_val
        if is_val:
            return False
        return self.subset_ratio is None or (h >> 32) < self.subset_ratio * 4294967296.0


# ---------------------------------------------------------------- raw chunks

@dataclass
class RawChunk:
    """What one read task gives: documents (str or dict), their hashes, whether each piece ends its
    document, where each came from (path, byte offset or row), bad records, decode replacements."""
    docs: list = field(default_factory=list)
    hashes: list = field(default_factory=list)
    ends: list = field(default_factory=list)
    locs: list = field(default_factory=list)
    bad: list = field(default_factory=list)        # (path, offset, message)
    replaced: int = 0                              # characters decoded as U+FFFD
    nbytes: int = 0
    next_offset: int | None = None                 # sequential sources: where the next chunk starts

    def add(self, doc, h, end, loc):
        self.docs.append(doc)
        self.hashes.append(h)
        self.ends.append(end)
        self.locs.append(loc)


def decode(b: bytes, encoding: str | None = None) -> tuple[str, int]:
    """--encoding (default UTF-8), undecodable bytes replaced; returns (text, replacement count)."""
    return decode_bytes(b, encoding)


# ---------------------------------------------------------------- grid units (text, JSONL)

def _boundary(path: str, size: int, b: int, buf: bytearray, lo: int, limit: int) -> int:
    """The record boundary for nominal grid position ``b``: ``b`` itself if byte b-1 is a newline,
    else just after the first newline in [b, b+limit), else the first UTF-8 lead byte at or after b
    (at most 3 bytes on). Monotonic in b, so consecutive grid units partition the file.
    ``buf`` holds file bytes from ``lo`` and is extended in place when the search runs past it."""
    if b <= 0:
        return 0
    if b >= size:
        return size
    if buf[b - 1 - lo] == 0x0A:
        return b
    searched = b
    stop = min(size, b + limit)
    while True:
        end = lo + len(buf)
        q = buf.find(b"\n", searched - lo, min(end, stop) - lo)
        if q >= 0:
            return lo + q + 1
        searched = min(end, stop)
        if searched >= stop:
            break
        more = read_at(path, end, min(max(len(buf), 1 << 16), stop - end))
        if not more:
            break
        buf.extend(more)
    # no newline within the limit: cut at a character boundary
    for p in range(b, min(b + 3, size)):
        if p - lo >= len(buf):
            buf.extend(read_at(path, lo + len(buf), 4))
        if p - lo < len(buf) and (buf[p - lo] & 0xC0) != 0x80:
            return p
    return min(b + 3, size)


def read_grid_unit(path: str, size: int, k: int, chunk: int, limit: int) -> tuple[bytes, int, int]:
    """The bytes of unit k of a file (its records), with their [start, end) file offsets."""
    if size <= chunk:
        return read_at(path, 0, size), 0, size
    s_nom, e_nom = k * chunk, min((k + 1) * chunk, size)
    lo = max(0, s_nom - 1)
    buf = bytearray(read_at(path, lo, min(size, e_nom + LOOKAHEAD) - lo))
    start = _boundary(path, size, s_nom, buf, lo, limit)
    end = _boundary(path, size, e_nom, buf, lo, limit)
    if end <= start:
        return b"", start, start
    if end - lo > len(buf):          # (cannot happen: _boundary extends buf) defensive
        buf.extend(read_at(path, lo + len(buf), end - lo - len(buf)))
    return bytes(buf[start - lo:end - lo]), start, end


_PARA = re.compile(rb"\n[ \t\r\f\v]*\n")


def parse_text(out: RawChunk, path: str, data: bytes, start: int, end: int, size: int, unit: str,
               encoding: str | None = None) -> None:
    at_eof = end >= size
    if start == 0 and data.startswith(b"\xef\xbb\xbf"):
        data = data[3:]
        start += 3
    if unit == "paragraph":
        pos = 0
        parts = _PARA.split(data)
        seps = [m.end() - m.start() for m in _PARA.finditer(data)]
        for i, part in enumerate(parts):
            off = start + pos
            pos += len(part) + (seps[i] if i < len(seps) else 0)
            if not part.strip():
                continue
            text, rep = decode(part, encoding)
            out.replaced += rep
            ends = i < len(parts) - 1 or at_eof
            out.add(text, doc_hash(part), ends, (path, off))
        return
    if not data.strip():
        return
    text, rep = decode(data, encoding)
    out.replaced += rep
    out.add(text, doc_hash(data), at_eof, (path, start))


def parse_jsonl(out: RawChunk, path: str, data: bytes, start: int, encoding: str | None = None) -> None:
    if start == 0 and data.startswith(b"\xef\xbb\xbf"):
        data = data[3:]
        start += 3
    pos = 0
    n = len(data)
    loads = json.loads if is_utf8(encoding) else (lambda b: json.loads(decode_bytes(b, encoding)[0]))
    while pos < n:
        q = data.find(b"\n", pos)
        if q < 0:
            q = n
        line = data[pos:q]
        off = start + pos
        pos = q + 1
        if not line.strip():
            continue
        if len(line) > MAX_RECORD_BYTES:
            out.bad.append((path, off, f"record longer than {MAX_RECORD_BYTES >> 20} MiB"))
            continue
        try:
            rec = loads(line)
        except ValueError as e:
            msg = str(e)
            if isinstance(e, UnicodeDecodeError):
                msg = "not UTF-8"
            out.bad.append((path, off, f"not valid JSON ({msg[:80]})"))
            continue
        out.add(rec, doc_hash(line), True, (path, off))


# ---------------------------------------------------------------- CSV (sequential: quoted newlines)

def _csv_record_ends(buf: bytes, base: int, quote: int = 0x22) -> list[int]:
    """Absolute offsets just after each complete record (a newline outside quotes) in buf."""
    ends = []
    inq = False
    pos = 0
    n = len(buf)
    while pos < n:
        q = buf.find(b"\n", pos)
        if q < 0:
            break
        c = buf.count(b'"', pos, q)
        if c & 1:
            inq = not inq
        pos = q + 1
        if not inq:
            ends.append(base + pos)
    return ends


def _csv_header(path: str, size: int, delim: str, encoding: str | None = None) -> tuple[list[str], int]:
    buf = b""
    while True:
        more = read_at(path, len(buf), min(1 << 16, size - len(buf)))
        buf += more
        ends = _csv_record_ends(buf, 0)
        if ends or not more or len(buf) >= size:
            end = ends[0] if ends else len(buf)
            text, _ = decode(buf[:end], encoding)
            row = next(csv.reader(io.StringIO(text.lstrip("\ufeff")), delimiter=delim), [])
            return [c.strip() for c in row], end
        if len(buf) > MAX_RECORD_BYTES:
            raise DataError(f"{path}: CSV header longer than {MAX_RECORD_BYTES >> 20} MiB")


def read_csv_chunk(path: str, size: int, offset: int, chunk: int, delim: str,
                   encoding: str | None = None) -> RawChunk:
    out = RawChunk()
    header, hdr_end = _csv_header(path, size, delim, encoding)
    offset = max(offset, hdr_end)
    if offset >= size:
        out.next_offset = None
        return out
    buf = bytearray(read_at(path, offset, min(size - offset, chunk + LOOKAHEAD)))
    while True:
        ends = _csv_record_ends(bytes(buf), offset)
        past = [e for e in ends if e >= offset + chunk]
        if past or offset + len(buf) >= size:
            break
        if len(buf) > chunk + MAX_RECORD_BYTES:
            out.bad.append((path, offset, f"CSV record longer than {MAX_RECORD_BYTES >> 20} MiB"))
            out.next_offset = offset + len(buf)
            return out
        buf.extend(read_at(path, offset + len(buf), min(size - offset - len(buf), 1 << 20)))
    if past:
        stop = past[0]
    else:
        stop = size
        if not ends or ends[-1] != size:
            ends.append(size)          # last record without a trailing newline
    out.nbytes = stop - offset
    prev = offset
    for e in ends:
        if e > stop:
            break
        raw = bytes(buf[prev - offset:e - offset])
        rec_off = prev
        prev = e
        if not raw.strip():
            continue
        text, rep = decode(raw, encoding)
        out.replaced += rep
        try:
            row = next(csv.reader(io.StringIO(text), delimiter=delim))
        except (csv.Error, StopIteration) as ex:
            out.bad.append((path, rec_off, f"not a CSV record ({ex})"))
            continue
        if len(row) != len(header):
            out.bad.append((path, rec_off, f"{len(row)} columns, header has {len(header)}"))
            continue
        out.add(dict(zip(header, row)), doc_hash(raw), True, (path, rec_off))
    out.next_offset = stop if stop < size else None
    return out


# ---------------------------------------------------------------- sources

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


# ---------------------------------------------------------------- resolving --data

@dataclass
class Resolved:
    sources: list[Source]
    problems: list[str]


def parse_weight(entry: str) -> tuple[str, float | None, str | None]:
    """'path@3' -> ('path', 3.0, None). A path that exists with its '@' is taken as a path."""
    if "@" not in entry or os.path.exists(entry):
        return entry, None, None
    head, tail = entry.rsplit("@", 1)
    try:
        w = float(tail)
    except ValueError:
        return entry, None, None
    if not (w > 0 and math.isfinite(w)):
        return head, None, f"{entry!r}: the weight after '@' must be a positive number"
    return head, w, None


def _fmt_of(path: str) -> str:
    ext = Path(path).suffix.lower()
    if ext in JSONL_EXT:
        return "jsonl"
    if ext in CSV_EXT:
        return "csv"
    if ext in PARQUET_EXT:
        return "parquet"
    if ext in COMPRESSED_EXT:
        return "compressed"
    return "text"


def _is_hf_saved(d: Path) -> bool:
    return any((d / f).exists() for f in ("dataset_info.json", "state.json", "dataset_dict.json"))


def _walk(d: Path) -> list[str]:
    out = []
    for root, dirs, files in os.walk(d):
        dirs[:] = sorted(x for x in dirs if not x.startswith("."))
        for f in sorted(files):
            if f.startswith("."):
                continue
            p = os.path.join(root, f)
            ext = Path(f).suffix.lower()
            if ext in TEXT_EXT | JSONL_EXT | CSV_EXT | PARQUET_EXT and ext != "":
                out.append(p)
    return out


def _have(module: str) -> bool:
    import importlib.util
    return importlib.util.find_spec(module) is not None


def resolve_entry(entry: str, dcfg, chunk: int = CHUNK_BYTES, opt: str = "--data") -> Resolved:
    """One ``--data`` entry -> its sources (one per file format found) or the problems with it."""
    from memfit.data import corpora
    target, weight, wp = parse_weight(entry)
    problems = [f"{opt} {wp}"] if wp else []
    text_unit = getattr(dcfg, "text_split", "file") if dcfg is not None else "file"
    enc = getattr(dcfg, "encoding", None) if dcfg is not None else None

    if corpora.is_corpus(target) and not os.path.exists(target):
        try:
            if target == "kjv":
                return Resolved([DocsSource("kjv", weight, corpora.kjv_documents())], problems)
            files = corpora.corpus_files(target)
            sizes = [os.path.getsize(f) for f in files]
            return Resolved([FileSource(target, weight, "text", files, sizes, chunk, "file", enc)], problems)
        except corpora.CorpusMissing as e:
            return Resolved([], problems + [f"{opt} {target}: {e}"])

    if target.startswith("hf:"):
        if not _have("datasets"):
            return Resolved([], problems + [(f"{opt} {target}: streaming a hub dataset needs the "
                                             "'datasets' package (pip install datasets) and a network")])
        rest = target[3:]
        rest, _, split = rest.partition("#")
        dsid, _, config = rest.partition(":")
        return Resolved([HubSource(target, weight, dsid, config or None, split or "train")], problems)

    p = Path(target).expanduser()
    if any(c in target for c in "*?["):
        matched = sorted(globmod.glob(str(p), recursive=True))
        files = []
        for m in matched:
            files.extend(_walk(Path(m)) if os.path.isdir(m) else [m])
        if not files:
            return Resolved([], problems + [f"{opt} {target}: the glob matches no file"])
    elif p.is_dir():
        if _is_hf_saved(p):
            if not _have("datasets"):
                return Resolved([], problems + [(f"{opt} {target}: a saved Hugging Face dataset needs "
                                                 "the 'datasets' package (pip install datasets)")])
            try:
                return Resolved([HFDiskSource(target, weight, str(p))], problems)
            except Exception as e:  # noqa: BLE001 - report whatever datasets says
                return Resolved([], problems + [f"{opt} {target}: cannot load the saved dataset ({e})"])
        files = _walk(p)
        if not files:
            return Resolved([], problems + [(f"{opt} {target}: the directory holds no .txt/.jsonl/"
                                             ".csv/.parquet file")])
    elif p.is_file():
        files = [str(p)]
    else:
        if "/" not in target and "." not in target:
            close = difflib.get_close_matches(target, list(corpora.CORPORA), n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            return Resolved([], problems + [(
                f"{opt} {target}: unknown corpus and no such file or directory (embedded corpora: "
                f"{', '.join(corpora.CORPORA)}).{hint}")])
        return Resolved([], problems + [f"{opt} {target}: no such file or directory"])

    groups: dict[str, list[str]] = {}
    for f in files:
        groups.setdefault(_fmt_of(f), []).append(f)
    if "compressed" in groups:
        problems.append(f"{opt} {target}: compressed files are not read ({groups['compressed'][0]}"
                        f"{' ...' if len(groups['compressed']) > 1 else ''}); decompress them first")
        del groups["compressed"]
    sources: list[Source] = []
    for fmt, fs in groups.items():
        sizes = []
        for f in fs:
            try:
                sizes.append(os.path.getsize(f))
            except OSError as e:
                problems.append(f"{opt} {f}: cannot read ({e.strerror})")
                sizes.append(0)
        name = target if len(groups) == 1 else f"{target}[{fmt}]"
        if sum(sizes) == 0:
            problems.append(f"{opt} {target}: " + ("the file is empty" if len(fs) == 1 else
                                                  f"all {len(fs)} {fmt} files are empty"))
            continue
        if fmt == "parquet":
            if not _have("pyarrow"):
                problems.append(f"{opt} {target}: reading Parquet needs pyarrow (pip install pyarrow)")
                continue
            sources.append(ParquetSource(name, weight, fs, sizes))
        elif fmt == "csv":
            sources.append(CsvSource(name, weight, fs, sizes, chunk, enc))
        else:
            if fmt == "jsonl" and any(f.lower().endswith(".json") for f in fs):
                for f in fs:
                    if f.lower().endswith(".json"):
                        head = read_at(f, 0, 256).lstrip()
                        if head.startswith(b"["):
                            problems.append(f"{opt} {f}: a JSON array is not streamed; convert it to "
                                            "JSON Lines (one object per line, .jsonl)")
            sources.append(FileSource(name, weight, fmt, fs, sizes, chunk, text_unit, enc))
    if len(sources) > 1:                 # one entry, several formats: split its weight by size
        total = sum(s.nbytes for s in sources) or 1
        for s in sources:
            if weight is not None:
                s.weight = weight * s.nbytes / total
    return Resolved(sources, problems)


def resolve_sources(entries, dcfg, chunk: int = CHUNK_BYTES, opt: str = "--data") -> Resolved:
    """Every entry of --data (or --val-data); weights filled in (see the module docstring)."""
    sources: list[Source] = []
    problems: list[str] = []
    for e in entries:
        r = resolve_entry(e, dcfg, chunk, opt)
        sources.extend(r.sources)
        problems.extend(r.problems)
    explicit = any(s.weight is not None for s in sources)
    for s in sources:
        if s.weight is None:
            s.weight = 1.0 if explicit else float(max(1, s.nbytes))
    return Resolved(sources, problems)


def shares(sources: list[Source]) -> list[float]:
    total = sum(s.weight for s in sources) or 1.0
    return [s.weight / total for s in sources]


def split_filter(dcfg, role: str) -> SplitFilter:
    sep = bool(dcfg.val_data)
    if role == "val":
        return SplitFilter("val", dcfg.val_fraction, None, sep)
    return SplitFilter("train", dcfg.val_fraction, dcfg.subset_ratio, sep)


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


def iter_source_docs(source: Source, filt: SplitFilter, chunk: int = CHUNK_BYTES,
                     max_bytes: int | None = None, stats: dict | None = None) -> Iterator[tuple[Any, bool, tuple]]:
    """(doc, ends_doc, loc) of one source in canonical order, filtered; stops after ~max_bytes."""
    read = 0
    if source.sequential:
        for u in range(source.num_units):
            off = 0
            while off is not None:
                raw = run_task(source.task([u], off))
                off = raw.next_offset
                read += raw.nbytes
                yield from _filtered(raw, filt, stats)
                if max_bytes is not None and read >= max_bytes:
                    return
        return
    order = range(source.num_units)
    pos = 0
    while pos < source.num_units:
        units, pos = take_units(source, order, pos, chunk)
        raw = run_task(source.task(units))
        read += raw.nbytes or sum(source.unit_bytes(u) for u in units)
        yield from _filtered(raw, filt, stats)
        if max_bytes is not None and read >= max_bytes:
            return


def _filtered(raw: RawChunk, filt: SplitFilter, stats: dict | None):
    if stats is not None:
        stats["bad_records"] = stats.get("bad_records", 0) + len(raw.bad)
        stats["replaced_chars"] = stats.get("replaced_chars", 0) + raw.replaced
        stats["bytes"] = stats.get("bytes", 0) + raw.nbytes
    for d, h, e, loc in zip(raw.docs, raw.hashes, raw.ends, raw.locs):
        if filt.keep(h):
            yield d, e, loc


def iter_split_texts(cfg, role: str = "train", max_bytes: int | None = None) -> Iterator[str]:
    """Texts of the train (or val) split of ``cfg.data.data`` in canonical order, each source
    contributing its share of ``max_bytes``. Records without the text field are skipped."""
    from memfit.data.tokenizer import doc_text
    d = cfg.data
    res = resolve_sources(d.data, d)
    if res.problems:
        raise DataError(res.problems)
    filt = split_filter(d, role)
    for src, share in zip(res.sources, shares(res.sources)):
        budget = None if max_bytes is None else max(1, int(max_bytes * share))
        got = 0
        for doc, _, _ in iter_source_docs(src, filt):
            try:
                t = doc_text(doc, d.text_field)
            except ValueError:
                continue
            yield t
            got += len(t)
            if budget is not None and got >= budget:
                break


# ---------------------------------------------------------------- pre-flight checks

SMALL_DATA_BYTES = 64_000_000


def check_data(cfg) -> list[str]:
    """Every problem with ``--data`` / ``--val-data`` / ``--tokenizer``, found before any model is
    built: missing paths, globs that match nothing, unknown corpora (with a suggestion), empty files,
    formats that need a missing package, JSONL whose first records lack ``--text-field``, and, for data
    small enough to scan (<= 64 MB), a split that leaves no training or no validation document."""
    from memfit.data.tokenizer import doc_text, tokenizer_problems
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
                p = _field_problem(s, d.text_field, doc_text)
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
        from memfit.data.precheck import bad_record_problem
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
    for raw in _raw_chunks(s):
        for h in raw.hashes:
            n_tr += tr.keep(h)
            n_va += va.keep(h)
    return n_tr, n_va


def _raw_chunks(s: Source, chunk: int = CHUNK_BYTES) -> Iterator[RawChunk]:
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


def _field_problem(s: Source, text_field: str, doc_text) -> str | None:
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
