"""Generated corpora for tests and benchmarks (deterministic, private RNG, no download).

- :func:`make_text_files` / :func:`make_jsonl`: small synthetic corpora of numbered documents.
- :func:`make_big_corpus`: a large corpus of *real* English recombined from the embedded corpora
  (paragraphs of Shakespeare, the KJV and BBC news drawn at random), so tokenizer speed is realistic.
- :class:`IndexedBatches`: an endless, resumable stream of generated effective batches (batch i is a pure
  function of i), for driving the loop without a corpus.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

import numpy as np

_SYLLABLES = ("ka", "lo", "mi", "ne", "su", "ta", "ri", "po", "the", "and", "ing", "er", "on", "at",
              "st", "qu", "ve", "ly", "ex", "un")


@functools.lru_cache(maxsize=8)
def _lexicon(n: int, seed: int) -> list[str]:
    rng = np.random.default_rng([seed, 10**9])
    out = []
    for _ in range(n):
        k = int(rng.integers(1, 4))
        out.append("".join(_SYLLABLES[int(j)] for j in rng.integers(0, len(_SYLLABLES), k)))
    return out


def doc_text(i: int, n_words: int, seed: int = 0) -> str:
    """Document i: a header line 'doc <i>' and n_words Zipf-distributed pseudo-words in lines."""
    rng = np.random.default_rng([seed, i])
    lex = _lexicon(400, seed)
    idx = np.minimum(rng.zipf(1.3, n_words) - 1, len(lex) - 1)
    words = [lex[int(j)] for j in idx]
    lines = [" ".join(words[k:k + 12]) for k in range(0, len(words), 12)]
    return f"doc {i}\n" + "\n".join(lines) + "\n"


def make_text_files(root: Path | str, n_docs: int, words: int = 60, seed: int = 0,
                    big_every: int = 0, big_words: int = 4000) -> list[Path]:
    """One document per .txt file; every ``big_every``-th document is long (spans several units)."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n_docs):
        n = big_words if big_every and i % big_every == 0 else words
        p = root / f"doc{i:05d}.txt"
        p.write_text(doc_text(i, n, seed), encoding="utf-8")
        paths.append(p)
    return paths


def make_jsonl(path: Path | str, n_docs: int, words: int = 40, seed: int = 1, field: str = "text",
               start: int = 0) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(json.dumps({"id": i, field: doc_text(i, words, seed)}) + "\n" for i in range(start, start + n_docs))
    return path


def real_paragraphs() -> list[str]:
    """Paragraphs (blank-line blocks) of the three embedded corpora."""
    from memfit.data import corpora
    paras: list[str] = []
    for p in corpora.shakespeare_files():
        paras += [x for x in corpora.read_text_file(p).split("\n\n") if x.strip()]
    for p, _ in corpora.bbc_files():
        paras += [x for x in corpora.read_text_file(p).split("\n\n") if x.strip()]
    paras += corpora.kjv_documents()
    return paras


def make_big_corpus(root: Path | str, total_bytes: int, n_files: int = 8, seed: int = 0) -> list[Path]:
    """``n_files`` text files adding up to ``total_bytes`` of real English, paragraphs drawn at
    random (one document per file, so the reader streams each file in 1 MiB units). Reuses files
    that already have the right size."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    per = total_bytes // n_files
    paths = [root / f"part{i:03d}.txt" for i in range(n_files)]
    if all(p.exists() and abs(p.stat().st_size - per) < (1 << 20) for p in paths):
        return paths
    paras = [p.encode("utf-8") for p in real_paragraphs()]
    rng = np.random.default_rng(seed)
    for path in paths:
        with open(path, "wb") as f:
            written = 0
            while written < per:
                idx = rng.integers(0, len(paras), 2048)
                block = b"\n\n".join(paras[int(j)] for j in idx) + b"\n\n"
                if written + len(block) > per:
                    block = block[: per - written]
                    cut = block.rfind(b"\n")
                    block = block[: cut + 1] if cut > 0 else block
                    f.write(block)
                    break
                f.write(block)
                written += len(block)
    return paths


class IndexedBatches:
    """Endless effective batches made by `batch(i)` (a subclass defines it, deterministic in i); the
    resumable state is just the position, so a resumed run sees exactly the batches it would have seen.
    Generated data has no epochs (`epoch` stays 0)."""

    pos = 0
    epoch = 0

    def batch(self, i: int) -> dict:
        raise NotImplementedError

    def __iter__(self):
        while True:
            b = self.batch(self.pos)
            self.pos += 1           # the state names the NEXT batch: a checkpoint after this step resumes
            yield b                 # with the batch after it

    def state_dict(self) -> dict:
        return {"pos": self.pos}

    def load_state_dict(self, d: dict) -> None:
        self.pos = d["pos"]
