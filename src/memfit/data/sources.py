"""Which data: what ``--data`` / ``--val-data`` name (resolved to sources), and which documents a split keeps.

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

Reading (units, pieces, byte offsets) is described in :mod:`memfit.data.readers`.

A resolved entry is a list of :class:`~memfit.data.units.Source`; which of their documents a stream keeps
(train or validation, --subset-ratio) is a :class:`SplitFilter` on each document's content hash.
"""

from __future__ import annotations

import difflib
import glob as globmod
import math
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from memfit.data.readers import CHUNK_BYTES, DataError, RawChunk, doc_text, read_at
from memfit.data.units import (
    CsvSource,
    DocsSource,
    FileSource,
    HFDiskSource,
    HubSource,
    ParquetSource,
    Source,
    run_task,
    take_units,
)

TEXT_EXT = {".txt", ".text", ".md", ".rst", ".tex", ".py", ".log", ""}
JSONL_EXT = {".jsonl", ".ndjson", ".json"}
CSV_EXT = {".csv", ".tsv"}
PARQUET_EXT = {".parquet", ".pq"}
COMPRESSED_EXT = {".gz", ".bz2", ".xz", ".zst", ".zip", ".7z", ".tar", ".lz4"}


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
        from memfit.data.formats import hub_hint
        return Resolved([], problems + [f"{opt} {target}: no such file or directory" + hub_hint(target)])

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
            try:             # the footer is read now: a truncated or non-Parquet file is a listed problem
                sources.append(ParquetSource(name, weight, fs, sizes))
            except (OSError, ValueError) as e:     # pyarrow's ArrowInvalid is a ValueError, ArrowIOError an OSError
                problems.append(f"{opt} {target}: not a readable Parquet file ({e})")
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
