"""Data: readers -> units -> sources -> on-the-fly tokenization -> shuffle buffer -> packing -> batches.

Public API (imported lazily so ``import memfit.data`` stays light):

- :func:`build_tokenizer` (``tokenizer.py``), :func:`build_streams` (``build.py``), :class:`TokenStream`
  (``stream.py``), :func:`estimate_tokens`, :func:`iter_split_tokens` (``count.py``),
  :func:`check_data` (``check.py``), :class:`DataError` (``readers.py``), :func:`inspect_data`,
  :func:`inspect_main` (``inspect.py``), :func:`bbc_examples` (``corpora.py``).
"""

from __future__ import annotations

_EXPORTS = {
    "build_tokenizer": "memfit.data.tokenizer",
    "TokenStream": "memfit.data.stream",
    "build_streams": "memfit.data.build",
    "estimate_tokens": "memfit.data.count",
    "iter_split_tokens": "memfit.data.count",
    "check_data": "memfit.data.check",
    "DataError": "memfit.data.readers",
    "inspect_data": "memfit.data.inspect",
    "inspect_main": "memfit.data.inspect",
    "format_report": "memfit.data.inspect",
    "bbc_examples": "memfit.data.corpora",
    "CORPORA": "memfit.data.corpora",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str):
    mod = _EXPORTS.get(name)
    if mod is None:
        raise AttributeError(f"module 'memfit.data' has no attribute {name!r}")
    import importlib
    return getattr(importlib.import_module(mod), name)
