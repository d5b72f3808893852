"""Building the (train, val) token streams for a Config: sources, encoder, fingerprint, batch shape."""

from __future__ import annotations

from collections.abc import Callable

from memfit.data.pieces import ReadOptions, Shard
from memfit.data.readers import CHUNK_BYTES, DataError
from memfit.data.sources import resolve_sources, shares, split_filter
from memfit.data.stream import BatchShape, TokenStream
from memfit.data.tokenizer import FunctionEncoder, PackEncoder, special_ids, tokenizer_fingerprint


def resolve_data(cfg, chunk: int):
    """(train sources, val sources or None) of ``cfg.data``; DataError lists every problem."""
    d = cfg.data
    res = resolve_sources(d.data, d, chunk)
    problems = list(res.problems)
    vres = resolve_sources(d.val_data, d, chunk, opt="--val-data") if d.val_data else None
    if vres is not None:
        problems += vres.problems
    if not res.sources and not problems:
        problems.append("--data names no readable source")
    if problems:
        raise DataError(problems)
    return res.sources, (vres.sources if vres is not None else None)


def max_docs_per_source(cfg, sources) -> list[int] | None:
    """--max-examples split over the mixed sources by their shares (None: no cap)."""
    n = cfg.data.max_examples
    if n is None:
        return None
    return [max(1, round(n * sh)) for sh in shares(sources)]


def make_encoder(cfg, tokenizer, encode: Callable | None):
    """A user ``encode(doc)`` (labels taken from it) or plain text tokenization of --text-field."""
    if encode is not None:
        return FunctionEncoder(encode)
    return PackEncoder(tokenizer, cfg.data.text_field)


def _fingerprint(cfg, sources, tokenizer, role, chunk, seed) -> str:
    d = cfg.data
    parts = [role, ",".join(s.fingerprint() for s in sources), f"vf={d.val_fraction}",
             f"sub={d.subset_ratio}", f"max={d.max_examples}", f"seed={seed}",
             f"buf={d.shuffle_buffer_size}", f"chunk={chunk}", f"field={d.text_field}",
             f"tok={tokenizer_fingerprint(tokenizer)}"]
    return "|".join(parts)


def build_streams(cfg, tokenizer, rows_per_batch: int, seed: int, *, encode: Callable | None = None,
                  num_workers: int | None = None, chunk_bytes: int | None = None, rank: int = 0,
                  world_size: int = 1) -> tuple[TokenStream, TokenStream]:
    """(train, val) packed streams for ``cfg.data`` with ``rows_per_batch`` rows per effective batch.

    ``encode(doc) -> {"input_ids": [...], "labels": [...]}`` replaces plain text tokenization (the doc
    is a str for text files, a dict for JSONL/CSV records); the packer still adds EOS after each
    document. ``rank``/``world_size`` (data parallel) give each rank a disjoint share of the read units
    (files or 1 MiB units; a source with fewer units than ranks leaves some ranks without it). Raises
    :class:`memfit.data.readers.DataError` (``.problems``) when the data cannot be used.
    """
    d = cfg.data
    chunk = int(chunk_bytes or CHUNK_BYTES)
    train_sources, val_sources = resolve_data(cfg, chunk)
    eos, pad = special_ids(tokenizer)
    encoder = make_encoder(cfg, tokenizer, encode)
    try:
        import torch
        pin = torch.cuda.is_available()
    except Exception:  # noqa: BLE001
        pin = False
    shape = BatchShape(rows_per_batch, d.seq_len, d.stride, eos, pad)
    shard = Shard(rank, world_size)
    train_read = ReadOptions(seed=seed, shuffle_buffer_size=d.shuffle_buffer_size,
                             max_docs=max_docs_per_source(cfg, train_sources),
                             num_workers=d.num_workers if num_workers is None else num_workers,
                             chunk_bytes=chunk, on_bad_record=d.on_bad_record)
    train = TokenStream(train_sources, encoder, role="train", filt=split_filter(d, "train"), shape=shape,
                        read=train_read, shard=shard, pin_memory=pin,
                        fingerprint=_fingerprint(cfg, train_sources, tokenizer, "train", chunk, seed))
    vs = val_sources if val_sources is not None else train_sources
    val_read = ReadOptions(seed=seed, chunk_bytes=chunk, on_bad_record=d.on_bad_record)
    val = TokenStream(vs, encoder, role="val", filt=split_filter(d, "val"), shape=shape, read=val_read,
                      shard=shard, pin_memory=pin,
                      fingerprint=_fingerprint(cfg, vs, tokenizer, "val", chunk, seed))
    return train, val
