"""Fine-tuning records from Hugging Face datasets: a `save_to_disk` folder, a Parquet file, or `hf:ID`.

Each is opened as a map-style `datasets.Dataset` (memory-mapped Arrow: rows are read when asked for, so
host RAM stays bounded) and read by row index, which is what makes the stream's resume a seek to a
record position rather than a replay (data/sftstream.py). `hf:ID[:CONFIG][#SPLIT]` goes through
`datasets.load_dataset` (a network, or a warm cache); `hf:` before a local folder or .parquet reads that.
`datasets` and `pyarrow` are the optional extra `memfit[hf]`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from memfit.data.units import _hf_load_disk


def _have(module: str) -> bool:
    import importlib.util
    return importlib.util.find_spec(module) is not None


def is_hf_entry(spec: str) -> bool:
    """A --data entry this module reads (and not formats.expand_paths)."""
    if spec.startswith("hf:"):
        return True
    p = Path(spec).expanduser()
    return (p.is_file() and p.suffix == ".parquet") or (p.is_dir() and _saved(p))


def _saved(d: Path) -> bool:
    return any((d / f).exists() for f in ("dataset_info.json", "state.json", "dataset_dict.json"))


def open_table(spec: str):
    """The entry as a datasets.Dataset (its train split; #SPLIT chooses another). Raises ValueError."""
    if not _have("datasets"):
        raise ValueError(f"--data {spec}: needs the 'datasets' package (pip install 'memfit[hf]')")
    import datasets
    target = spec[3:] if spec.startswith("hf:") else spec
    target, _, split = target.partition("#")
    p = Path(target).expanduser()
    try:
        if p.is_dir():
            return _hf_load_disk(str(p), split or None)
        if p.suffix == ".parquet":
            if not p.is_file():
                raise ValueError(f"--data {spec}: no such file")
            return datasets.load_dataset("parquet", data_files=str(p), split=split or "train")
        dsid, _, config = target.partition(":")
        return datasets.load_dataset(dsid, config or None, split=split or "train")
    except ValueError:
        raise
    except Exception as e:  # noqa: BLE001 - offline, no such dataset, unreadable files: say what datasets said
        raise ValueError(f"--data {spec}: datasets could not open it ({type(e).__name__}: "
                         f"{str(e).splitlines()[0][:200] if str(e) else ''})") from None


def table_problems(specs) -> list[str]:
    problems = []
    for spec in specs:
        if is_hf_entry(spec):
            try:
                open_table(spec)
            except ValueError as e:
                problems.append(str(e))
    return problems


class ArrowTable:
    """Rows of one dataset by index: the stream's `size` (rows) and `window` (rows from an index)."""

    def __init__(self, spec: str) -> None:
        self.name, self.ds = spec, open_table(spec)
        self.size = len(self.ds)

    def window(self, offset: int, n: int) -> tuple[list[dict[str, Any]], int]:
        end = min(self.size, offset + n)
        batch = self.ds[offset:end]
        cols = list(batch)
        return [{c: batch[c][i] for c in cols} for i in range(end - offset)], end

    def rows(self):
        for i in range(0, self.size, 1024):
            yield from self.window(i, 1024)[0]
