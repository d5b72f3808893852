"""Pieces: sources -> read + split filter + tokenize -> per-source pending pieces -> mixer -> shuffle buffer.

::

    units of each source ─► read + split filter + tokenize (inline, or in worker processes)
        │  (pass order reshuffled per pass from seed+pass; chunks of ~1 MiB)
        ▼
    per-source pending pieces ─► mixer (deterministic token-deficit schedule over PATH@WEIGHT)
        ▼
    shuffle buffer (--shuffle-buffer-size pieces, at most BUFFER_MAX_TOKENS tokens; counter-based RNG)

A piece is ``(ids int32, labels int32 | None, ends_doc, source index, pass)``. :class:`PieceReader`
holds every cursor the exact resume needs (the state itself is written by
:class:`~memfit.data.stream.TokenStream`, which packs the pieces into batches).

Epochs: each source makes its own passes (pass ``p`` reads its units in an order drawn from
``seed``, source and ``p``). A pass barrier keeps pass ``p+1`` of a source out of the shuffle buffer
until every piece of its pass ``p`` has left it, so ``epoch`` (completed passes, the minimum over
sources) is exact: every training document of the epoch has been delivered exactly once.
"""

from __future__ import annotations

import collections
import contextlib
import logging
from dataclasses import dataclass
from typing import Any

import numpy as np

from memfit.data.readers import CHUNK_BYTES, DataError, where
from memfit.data.sources import SplitFilter
from memfit.data.units import Source, take_units
from memfit.data.workers import ChunkOut, WorkerPool, process_task

log = logging.getLogger("memfit.data")

BUFFER_MAX_TOKENS = 2_000_000     # shuffle buffer cap in tokens (whole shakespeare fits: full shuffle)

_M64 = (1 << 64) - 1


def _mix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _M64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _M64
    return x ^ (x >> 31)




@dataclass(frozen=True)
class ReadOptions:
    """How a stream reads its sources: --seed, --shuffle-buffer-size (and its token cap),
    --max-examples (documents per source per pass), --num-workers, the chunk size, --on-bad-record."""
    seed: int = 0
    shuffle_buffer_size: int = 0
    buffer_max_tokens: int = BUFFER_MAX_TOKENS
    max_docs: list[int] | None = None
    num_workers: int = 0
    chunk_bytes: int = CHUNK_BYTES
    on_bad_record: str = "skip"


@dataclass(frozen=True)
class Shard:
    """Data parallel: this rank reads every ``world_size``-th unit of each pass order."""
    rank: int = 0
    world_size: int = 1


class _Src:
    __slots__ = (
        "docs",
        "done",
        "inflight",
        "offset",
        "pass_",
        "pending",
        "pieces",
        "plan_pass",
        "plan_pos",
        "pos",
    )

    def __init__(self):
        self.pass_ = 0          # pass of the next unit to read
        self.pos = 0            # index (into that pass's unit order) of the next unit to read
        self.offset = 0         # sequential sources: byte offset / row within the unit
        self.docs = 0           # documents read in this pass (--max-examples)
        self.pieces = 0         # pieces read in this pass (an empty pass is an error)
        self.pending: collections.deque = collections.deque()   # (ids, labels, end, src, pass)
        self.done = False       # finite streams: source exhausted
        self.inflight: collections.deque = collections.deque()  # ((pass, pos), (pass, pos_after), handle)
        self.plan_pass = 0
        self.plan_pos = 0



class PieceReader:
    """Pieces from mixed, shuffled sources, with exact cursors (see the module docstring).

    Train readers (``role='train'``) loop over passes forever; validation readers are finite, read
    their sources one after the other in canonical order, and never shuffle or use workers.
    """

    def __init__(self, sources: list[Source], encoder, *, role: str, filt: SplitFilter,
                 read: ReadOptions, shard: Shard, eos_id: int | None):
        self.sources = list(sources)
        if not self.sources:
            raise DataError(f"no {role} data source")
        self.encoder = encoder
        self.role = role
        self.finite = role != "train"
        self.filt = filt
        self.seed = int(read.seed)
        self.buf_size = 0 if self.finite else int(read.shuffle_buffer_size)
        self.buf_max_tokens = int(read.buffer_max_tokens)
        self.max_docs = read.max_docs
        self.num_workers = 0 if self.finite else int(read.num_workers)
        self.chunk = int(read.chunk_bytes)
        self.on_bad = read.on_bad_record
        self.rank, self.world_size = int(shard.rank), int(shard.world_size)
        self.eos_id = eos_id
        w = [float(s.weight or 1.0) for s in self.sources]
        self.weights = [x / sum(w) for x in w]
        self._pool: WorkerPool | None = None
        self._orders: dict[int, dict[int, Any]] = {}
        self._eos = None if eos_id is None else np.array([eos_id], dtype=np.int32)

    def _reset_pieces(self) -> None:
        self._src = [_Src() for _ in self.sources]
        self._mix = [0] * len(self.sources)
        self._buf: list = []
        self._buf_tokens = 0
        self._buf_count: dict[tuple[int, int], int] = {}
        self._rng = 0
        self._cur = 0                # finite: source being read
        self.stats = {"docs": 0, "pieces": 0, "tokens": 0, "bytes_read": 0, "bad_records": 0,
                      "replaced_chars": 0, "bad_examples": []}

    def _pieces_epoch(self) -> int:
        """Completed passes of a train reader: the minimum over sources of the pass of the oldest
        piece not yet delivered (pending or in the shuffle buffer)."""
        e = None
        for i, st in enumerate(self._src):
            c = st.pass_ + (1 if st.pos >= len(self._order(i, st.pass_)) else 0)
            if st.pending:
                c = min(c, st.pending[0][4])
            for (si, p), n in self._buf_count.items():
                if si == i and n > 0:
                    c = min(c, p)
            e = c if e is None else min(e, c)
        return int(e or 0)

    def close(self) -> None:
        """Stop worker processes (also done at garbage collection)."""
        if self._pool is not None:
            self._pool.close()
            self._pool = None

    def __del__(self):
        with contextlib.suppress(Exception):
            self.close()

    def __getstate__(self):
        raise TypeError("a TokenStream is not picklable: save state_dict() instead")

    # ------------------------------------------------------------ sources
    def _order(self, i: int, p: int):
        """Unit order of pass p of source i: a permutation drawn from (seed, source, pass) for a
        shuffled train stream, else canonical. Cached for the (at most two) passes in use."""
        cache = self._orders.setdefault(i, {})
        if p in cache:
            return cache[p]
        n = self.sources[i].num_units
        if self.finite or self.buf_size == 0 or n <= 1:
            order: Any = range(n)
        else:
            q = 0 if self.max_docs is not None else p      # --max-examples: one fixed subset
            order = np.random.Generator(np.random.PCG64([self.seed, i, q])).permutation(n)
        if self.world_size > 1:                 # data parallel: each rank reads its own units
            order = np.asarray(order)[self.rank::self.world_size]
        for old in [k for k in cache if k < p - 1]:
            del cache[old]
        cache[p] = order
        return order

    def _drop_inflight(self) -> None:
        for st in getattr(self, "_src", []):
            st.inflight.clear()

    def _end_pass(self, i: int) -> None:
        st = self._src[i]
        if self.finite:
            st.done = True
            return
        if st.pieces == 0:
            src = self.sources[i]
            raise DataError(f"{src.name}: a whole pass gave no training document (all held out for "
                              "validation, filtered by --subset-ratio, or unreadable)")
        st.pass_ += 1
        st.pos = st.offset = st.docs = st.pieces = 0

    def _read_chunk(self, i: int) -> ChunkOut | None:
        src, st = self.sources[i], self._src[i]
        if st.done:
            return None
        if st.pos >= len(self._order(i, st.pass_)):
            self._end_pass(i)
            if st.done:
                return None
        order = self._order(i, st.pass_)
        if src.sequential:
            out = process_task(src.task([int(order[st.pos])], st.offset), self.filt, self.encoder,
                               self.on_bad)
            if out.next_offset is None:
                st.pos += 1
                st.offset = 0
            else:
                st.offset = out.next_offset
            return out
        if self.num_workers > 0:
            return self._read_prefetched(i, order)
        units, nxt = take_units(src, order, st.pos, self.chunk)
        out = process_task(src.task(units), self.filt, self.encoder, self.on_bad)
        st.pos = nxt
        return out

    def _read_prefetched(self, i: int, order) -> ChunkOut:
        src, st = self.sources[i], self._src[i]
        if self._pool is None:
            self._pool = WorkerPool(self.num_workers, self.encoder, self.filt, self.on_bad)
        if st.inflight and st.inflight[0][0] != (st.pass_, st.pos):
            st.inflight.clear()
        if not st.inflight:
            st.plan_pass, st.plan_pos = st.pass_, st.pos
        depth = 2 * self.num_workers
        while len(st.inflight) < depth:
            if st.plan_pos >= len(self._order(i, st.plan_pass)):
                st.plan_pass += 1
                st.plan_pos = 0
            units, nxt = take_units(src, self._order(i, st.plan_pass), st.plan_pos, self.chunk)
            handle = self._pool.submit(src.task(units))
            st.inflight.append(((st.plan_pass, st.plan_pos), (st.plan_pass, nxt), handle))
            st.plan_pos = nxt
        _, (_, after), handle = st.inflight.popleft()
        out = handle.get()
        st.pos = after
        return out

    def _fill(self, i: int) -> bool:
        """Read chunks of source i until it has pending pieces; False when (finite and) exhausted."""
        st = self._src[i]
        while not st.pending:
            out = self._read_chunk(i)
            if out is None:
                return False
            if st.pass_ == 0:          # bad records / replacements are counted once, on the first pass
                self._note(out)
            else:
                self.stats["bytes_read"] += out.nbytes
            pieces = out.pieces
            limit = None if self.max_docs is None else self.max_docs[i]
            for k, (ids, lab, end) in enumerate(pieces):
                st.pending.append((ids, lab, end, i, st.pass_))
                st.pieces += 1
                if end:
                    st.docs += 1
                    if limit is not None and st.docs >= limit:
                        st.pos = len(self._order(i, st.pass_))      # end this pass here
                        st.inflight.clear()
                        break
        return True

    def _note(self, out: ChunkOut) -> None:
        s = self.stats
        s["bytes_read"] += out.nbytes
        s["replaced_chars"] += out.replaced
        if out.n_bad:
            s["bad_records"] += out.n_bad
            for path, off, msg in out.bad:
                if len(s["bad_examples"]) >= 5:
                    break
                text = f"{where(path, off)}: {msg}"
                s["bad_examples"].append(text)
                log.warning("skipped bad record %s (--on-bad-record skip)", text)

    # ------------------------------------------------------------ mixing + shuffle buffer
    def _choose(self) -> int:
        if len(self.sources) == 1:
            return 0
        best, bv = 0, None
        for i, w in enumerate(self.weights):
            v = self._mix[i] / w
            if bv is None or v < bv:
                best, bv = i, v
        return best

    def _take(self, i: int):
        p = self._src[i].pending.popleft()
        self._mix[i] += len(p[0]) + (1 if p[2] and self._eos is not None else 0)
        return p

    def _buf_push(self, p) -> None:
        self._buf.append(p)
        self._buf_tokens += len(p[0])
        k = (p[3], p[4])
        self._buf_count[k] = self._buf_count.get(k, 0) + 1

    def _buf_pop(self):
        n = len(self._buf)
        j = _mix64((self.seed * 0x9E3779B1) ^ _mix64(self._rng)) % n
        self._rng += 1
        p = self._buf[j]
        self._buf[j] = self._buf[-1]
        self._buf.pop()
        self._buf_tokens -= len(p[0])
        k = (p[3], p[4])
        self._buf_count[k] -= 1
        if not self._buf_count[k]:
            del self._buf_count[k]
        return p

    def _blocked(self, i: int, pass_: int) -> bool:
        for (si, p), n in self._buf_count.items():
            if si == i and p < pass_ and n > 0:
                return True
        return False

    def _next_piece(self):
        """The next piece for the packer, or None at the end of a finite stream."""
        if self.finite:
            while self._cur < len(self.sources):
                st = self._src[self._cur]
                if st.pending or self._fill(self._cur):
                    return st.pending.popleft()
                self._cur += 1
            return None
        while True:
            i = self._choose()
            st = self._src[i]
            if not st.pending:
                self._fill(i)
            p = st.pending[0]
            if self.buf_size <= 0:
                return self._take(i)
            if self._blocked(i, p[4]):              # pass barrier: drain the old pass first
                return self._buf_pop()
            if len(self._buf) < self.buf_size and self._buf_tokens < self.buf_max_tokens:
                self._buf_push(self._take(i))
                continue
            return self._buf_pop()

    def _delivered(self, p) -> None:
        s = self.stats
        s["pieces"] += 1
        s["docs"] += bool(p[2])
