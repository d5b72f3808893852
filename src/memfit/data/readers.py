"""Readers: the bytes of one read unit -> records (text documents, JSON objects, CSV rows).

Reading is by *units*: a file of at most one chunk (``CHUNK_BYTES``, 1 MiB) is one unit; a larger file
is cut on a fixed byte grid whose boundaries are moved to the next newline (text, JSONL), so any unit can
be read on its own, in any order, by any process, and always gives the same documents. A document that
spans several units becomes several *pieces*; only the last ends the document (gets EOS). CSV is read
sequentially (a quoted field may hold newlines), one chunk after another from a byte offset.

Nothing here imports torch. Every byte read from a file goes through :func:`read_at` (counted in
:data:`IO`, which the resume tests use).
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import re
from dataclasses import dataclass, field
from typing import Any

from memfit.data.encoding import decode_bytes, is_utf8

CHUNK_BYTES = 1 << 20            # one read unit
LOOKAHEAD = 1 << 12              # read past a unit's end to find the next newline in the same read
MAX_RECORD_BYTES = 64 << 20      # a JSONL/CSV record longer than this is a bad record, not an OOM


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


# ---------------------------------------------------------------- hashing

def doc_hash(b: bytes) -> int:
    return int.from_bytes(hashlib.blake2b(b, digest_size=8).digest(), "little")



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


# ---------------------------------------------------------------- a record's text

def doc_text(doc: Any, text_field: str) -> str:
    """The text of one document: a string as is; a record's ``text_field`` (or a ``{field}`` template).

    Raises ``ValueError`` with a short reason when the record does not have it.
    """
    if isinstance(doc, str):
        return doc
    if isinstance(doc, dict):
        if "{" in text_field:
            try:
                return text_field.format_map(doc)
            except KeyError as e:
                raise ValueError(f"lacks field {e.args[0]!r} used by the template "
                                 f"(fields: {', '.join(map(str, list(doc)[:8]))})") from None
            except (ValueError, IndexError) as e:
                raise ValueError(f"text template {text_field!r} does not apply: {e}") from None
        if text_field not in doc:
            raise ValueError(f"lacks field {text_field!r} (fields: {', '.join(map(str, list(doc)[:8]))})")
        v = doc[text_field]
        if isinstance(v, str):
            return v
        if v is None:
            raise ValueError(f"field {text_field!r} is null")
        if isinstance(v, (int, float)):
            return str(v)
        raise ValueError(f"field {text_field!r} is a {type(v).__name__}, not text")
    raise ValueError(f"record is a JSON {type(doc).__name__}, not an object or string")
