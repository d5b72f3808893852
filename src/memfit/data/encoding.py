"""Text encodings: decoding with the one the user names (`--encoding`, default UTF-8), and the pre-flight
scan that counts undecodable bytes per file.

Undecodable bytes become U+FFFD, which the model would then learn as text: a binary file or a Latin-1
file read as UTF-8 trains silently on garbage. Before anything is written, every local text/JSONL/CSV
file of --data/--val-data is decoded once (the first SCAN_BYTES of a larger file) and its replacements
counted: any at all is a warning with the count; more than MAX_BAD_FRACTION of its characters refuses
the file (exit 2) with the remedy (`--encoding NAME`, or leave the file out).
"""

from __future__ import annotations

import codecs
import os

DEFAULT = "utf-8"
MAX_BAD_FRACTION = 0.01            # issue 18: above 1% undecodable characters a file is refused
SCAN_BYTES = 64_000_000            # per file: a 64 MB prefix is a fair sample and decodes in ~0.1 s
_CHUNK = 1 << 20
_cache: dict[tuple, tuple[int, int]] = {}


def is_utf8(encoding: str | None) -> bool:
    return not encoding or codecs.lookup(encoding).name == "utf-8"


def encoding_problem(encoding: str) -> str | None:
    """Why --encoding NAME cannot be used (None: fine). The readers split files at newline bytes, so the
    encoding must write '\\n' as the byte 0x0A (ASCII-compatible: not UTF-16/32)."""
    try:
        codecs.lookup(encoding)
    except LookupError:
        return f"--encoding {encoding}: unknown encoding (examples: utf-8, latin-1, cp1252, shift_jis)"
    if "\n".encode(encoding, errors="replace") != b"\n" or "a\n".encode(encoding) != b"a\n":
        return (f"--encoding {encoding}: not supported (files are split at newline bytes, so the encoding "
                "must be ASCII-compatible); convert the file to UTF-8, e.g. iconv -f UTF-16 -t UTF-8")
    return None


def decode_bytes(b: bytes, encoding: str | None = None) -> tuple[str, int]:
    """(text, number of undecodable sequences replaced by U+FFFD)."""
    enc = encoding or DEFAULT
    try:
        return b.decode(enc), 0
    except UnicodeDecodeError:
        s = b.decode(enc, errors="replace")
        literal = b.count(b"\xef\xbf\xbd") if is_utf8(enc) else 0    # a real U+FFFD in UTF-8 text
        return s, s.count("\ufffd") - literal


def scan_file(path: str, encoding: str | None = None) -> tuple[int, int]:
    """(characters decoded, undecodable sequences) of the file's first SCAN_BYTES."""
    st = os.stat(path)
    key = (path, st.st_size, st.st_mtime_ns, encoding or DEFAULT)
    if key in _cache:
        return _cache[key]
    dec = codecs.getincrementaldecoder(encoding or DEFAULT)(errors="replace")
    chars = bad = 0
    literal = is_utf8(encoding)
    with open(path, "rb") as f:
        left = SCAN_BYTES
        while left > 0:
            b = f.read(min(_CHUNK, left))
            if not b:
                break
            left -= len(b)
            s = dec.decode(b, final=len(b) < _CHUNK or left <= 0)
            chars += len(s)
            bad += s.count("\ufffd")
            if literal:
                bad -= b.count(b"\xef\xbf\xbd")     # (a literal split across chunks is counted: negligible)
    _cache[key] = (chars, max(bad, 0))
    return _cache[key]


def scan_sources(sources, encoding: str | None, opt: str) -> tuple[list[str], list[str]]:
    """(problems, warnings) for the local files of these sources (text, JSONL, CSV)."""
    problems: list[str] = []
    warnings: list[str] = []
    enc = encoding or DEFAULT
    for s in sources:
        if getattr(s, "kind", None) not in ("text", "jsonl", "csv"):
            continue
        for f in getattr(s, "files", []):
            chars, bad = scan_file(f, enc)
            if not bad:
                continue
            frac = bad / max(chars, 1)
            what = (f"{opt} {f}: {bad:,} undecodable byte sequence(s) as {enc} ({100 * frac:.2f}% of its "
                    f"{chars:,} characters)")
            if frac > MAX_BAD_FRACTION:
                problems.append(f"{what}: more than {100 * MAX_BAD_FRACTION:g}% cannot be text in {enc} "
                                "(a binary file, or another encoding): name its encoding with --encoding "
                                "(e.g. --encoding latin-1) or leave the file out")
            else:
                warnings.append(f"{what}: they are read as U+FFFD (pass --encoding NAME if the file is in "
                                "another encoding)")
    return problems, warnings
