"""The token stream: sources -> tokenize on the fly -> shuffle buffer -> pack (or pad) -> batches.

::

    units of each source ─► read + split filter + tokenize (inline, or in worker processes)
        │  (pass order reshuffled per pass from seed+pass; chunks of ~1 MiB)
        ▼
    per-source pending pieces ─► mixer (deterministic token-deficit schedule over PATH@WEIGHT)
        ▼
    shuffle buffer (--shuffle-buffer-size pieces, at most BUFFER_MAX_TOKENS tokens; counter-based RNG)
        ▼
    pack: EOS after each document, cut --seq-len blocks every --stride tokens      (pretraining)
    pad : truncate to --max-seq-len, group by length in a window, pad, labels -100 (fine-tuning)
        ▼
    effective batches {input_ids, attention_mask, labels}: int64 [rows, T] on CPU

Exact resume: :meth:`TokenStream.state_dict` holds each source's cursor (pass, unit position, byte
offset for sequential formats), the already-tokenized pieces that were read but not yet delivered
(pending + shuffle buffer + the length-grouping window), the packer's carry-over tokens, the mixer's
token counters and the RNG counter. Loading it reads at most one chunk per source before the next
batch, and never re-reads or re-tokenizes what was consumed. Worker processes only read and tokenize
chunks that the main process planned (they hold no state), so the stream is identical for any
``--num-workers``; chunks they prefetched are simply dropped on save/restore.

Workers (``--num-workers``): measured on the 2-core CPU machine (512 MB bench corpus, 45 s windows,
shared machine): 0 workers 162k tokens/s, 2 workers 114k tokens/s. The fast tokenizer already uses
both cores inside one batch encode, so worker processes only add transfer and scheduling cost there;
they pay off where tokenization can overlap GPU compute on a machine with spare cores (Kaggle/Colab
GPU boxes), and cost memory (a forked copy of the parent's pages, shared until written).

Epochs: each source makes its own passes (pass ``p`` reads its units in an order drawn from
``seed``, source and ``p``). A pass barrier keeps pass ``p+1`` of a source out of the shuffle buffer
until every piece of its pass ``p`` has left it, so ``epoch`` (completed passes, the minimum over
sources) is exact: every training document of the epoch has been delivered exactly once.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import math
import os
import signal
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from memfit.data.readers import CHUNK_BYTES, DataError, where
from memfit.data.sources import SplitFilter, resolve_sources, shares, split_filter
from memfit.data.units import Source, raw_chunks, run_task, take_units

log = logging.getLogger("memfit.data")

BUFFER_MAX_TOKENS = 2_000_000     # shuffle buffer cap in tokens (whole shakespeare fits: full shuffle)
GROUP_WINDOW_BATCHES = 32         # pad mode: examples of this many batches are sorted by length
EXACT_SCAN_BYTES = 16_000_000     # estimate_tokens: tokenize everything up to this size
SAMPLE_SCAN_BYTES = 4_000_000     # ... else extrapolate from this many bytes spread over the data
STATE_VERSION = 1

_M64 = (1 << 64) - 1


def _mix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _M64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _M64
    return x ^ (x >> 31)


# ---------------------------------------------------------------- chunk processing (worker side)

@dataclass
class ChunkOut:
    pieces: list                  # (ids int32, labels int32 | None, ends_doc)
    bad: list                     # first few (path, offset, message)
    n_bad: int
    replaced: int
    nbytes: int
    next_offset: int | None


def process_task(task: tuple, filt: SplitFilter, encoder, on_bad: str) -> ChunkOut:
    """Read one planned chunk, keep this stream's documents, tokenize them in one batch."""
    raw = run_task(task)
    keep = [i for i, h in enumerate(raw.hashes) if filt.keep(h)]
    enc = encoder([raw.docs[i] for i in keep]) if keep else []
    pieces = []
    bad = list(raw.bad)
    for (ids, lab, err), i in zip(enc, keep):
        if err is not None:
            path, off = raw.locs[i]
            bad.append((path, off, err))
            continue
        if ids.size == 0:
            continue
        pieces.append((ids, lab, raw.ends[i]))
    if bad and on_bad == "fail":
        path, off, msg = bad[0]
        raise DataError(f"{where(path, off)}: {msg} (--on-bad-record fail; use skip to count and skip "
                          "bad records)")
    return ChunkOut(pieces, bad[:5], len(bad), raw.replaced, raw.nbytes, raw.next_offset)


_W: dict = {}


def _worker_init(encoder, filt, on_bad):
    signal.signal(signal.SIGINT, signal.SIG_IGN)      # the parent handles Ctrl-C and terminates us
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    _W.update(encoder=encoder, filt=filt, on_bad=on_bad)


def _worker_run(task):
    return process_task(task, _W["filt"], _W["encoder"], _W["on_bad"])


class _Pool:
    """Stateless reader/tokenizer processes. Fork where available (like DataLoader), else spawn."""

    def __init__(self, n: int, encoder, filt, on_bad):
        import multiprocessing as mp
        ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
        prev = os.environ.get("TOKENIZERS_PARALLELISM")
        os.environ["TOKENIZERS_PARALLELISM"] = "false"     # set at fork time: no warning, no deadlock
        try:
            self.pool = ctx.Pool(n, initializer=_worker_init, initargs=(encoder, filt, on_bad))
        finally:
            if prev is None:
                os.environ.pop("TOKENIZERS_PARALLELISM", None)
            else:
                os.environ["TOKENIZERS_PARALLELISM"] = prev

    def submit(self, task):
        return self.pool.apply_async(_worker_run, (task,))

    def close(self):
        with contextlib.suppress(Exception):      # best effort at shutdown
            self.pool.terminate()
            self.pool.join()


# ---------------------------------------------------------------- the stream

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


class TokenStream:
    """An iterable of effective batches with exact ``state_dict()`` / ``load_state_dict()``.

    Train streams (``finite=False``) loop forever over epochs; iterating continues from the current
    position. Validation streams (``finite=True``) restart from the beginning on every ``iter()``
    and make one deterministic pass (no shuffle); their last batch may have fewer rows, and the last
    partial block is padded (attention_mask 0, labels -100).
    """

    def __init__(self, sources: list[Source], encoder, *, role: str, filt: SplitFilter,
                 rows: int, seq_len: int, stride: int | None = None, mode: str = "pack",
                 max_seq_len: int | None = None, seed: int = 0, shuffle_buffer_size: int = 0,
                 buffer_max_tokens: int = BUFFER_MAX_TOKENS, max_docs: list[int] | None = None,
                 num_workers: int = 0, chunk_bytes: int = CHUNK_BYTES, eos_id: int | None = None,
                 pad_id: int = 0, on_bad_record: str = "skip", pin_memory: bool = False,
                 fingerprint: str = "", rank: int = 0, world_size: int = 1):
        if rows < 1:
            raise ValueError(f"rows per batch must be >= 1 (got {rows})")
        if mode not in ("pack", "pad"):
            raise ValueError(f"mode must be 'pack' or 'pad' (got {mode!r})")
        self.sources = list(sources)
        if not self.sources:
            raise DataError(f"no {role} data source")
        self.encoder = encoder
        self.role = role
        self.finite = role != "train"
        self.filt = filt
        self.rows = int(rows)
        self.seq_len = int(seq_len)
        self.stride = int(stride or seq_len)
        self.mode = mode
        self.max_seq_len = max_seq_len or seq_len
        self.seed = int(seed)
        self.buf_size = 0 if self.finite else int(shuffle_buffer_size)
        self.buf_max_tokens = int(buffer_max_tokens)
        self.max_docs = max_docs
        self.num_workers = 0 if self.finite else int(num_workers)
        self.chunk = int(chunk_bytes)
        self.eos_id = eos_id
        self.pad_id = int(pad_id)
        self.on_bad = on_bad_record
        self.pin_memory = pin_memory
        self._fp = fingerprint + (f"|rank={rank}/{world_size}" if world_size > 1 else "")
        self.rank, self.world_size = int(rank), int(world_size)
        w = [float(s.weight or 1.0) for s in self.sources]
        self.weights = [x / sum(w) for x in w]
        self._pool: _Pool | None = None
        self._orders: dict[int, dict[int, Any]] = {}
        self._eos = None if eos_id is None else np.array([eos_id], dtype=np.int32)
        self.with_labels = bool(getattr(encoder, "has_labels", False))
        self._reset()

    # ------------------------------------------------------------ state
    def _reset(self) -> None:
        self._src = [_Src() for _ in self.sources]
        self._mix = [0] * len(self.sources)
        self._buf: list = []
        self._buf_tokens = 0
        self._buf_count: dict[tuple[int, int], int] = {}
        self._rng = 0
        self._carry = np.zeros(0, np.int32)
        self._carry_lab = np.zeros(0, np.int32) if self.with_labels else None
        self._skip = 0
        self._window: collections.deque = collections.deque()
        self._held = None            # pad mode: a piece of the next pass, kept out of this window
        self._cur = 0                # finite: source being read
        self._exhausted = False
        self._finished = False
        self.batches = 0             # batches yielded since the start (train) / this pass (val)
        self.stats = {"docs": 0, "pieces": 0, "tokens": 0, "bytes_read": 0, "bad_records": 0,
                      "replaced_chars": 0, "bad_examples": []}

    @property
    def epoch(self) -> int:
        """Completed passes over the training data (the minimum over mixed sources); for a
        validation stream, 1 once its pass has ended."""
        if self.finite:
            return int(self._finished)
        e = None
        for i, st in enumerate(self._src):
            c = st.pass_ + (1 if st.pos >= len(self._order(i, st.pass_)) else 0)
            if st.pending:
                c = min(c, st.pending[0][4])
            for (si, p), n in self._buf_count.items():
                if si == i and n > 0:
                    c = min(c, p)
            e = c if e is None else min(e, c)
        for batch in self._window:            # pad mode: read ahead but not yet yielded
            for x in batch:
                e = min(e, x[4])
        if self._held is not None:
            e = min(e, self._held[4])
        return int(e or 0)

    def state_dict(self) -> dict:
        """Plain python types and tensors only (loads with ``torch.load(weights_only=True)``)."""
        srcs = []
        for st in self._src:
            srcs.append({"pass": st.pass_, "pos": st.pos, "offset": st.offset, "docs": st.docs,
                         "pieces": st.pieces, "done": st.done, "pending": _pack(list(st.pending))})
        stats = dict(self.stats)
        stats["bad_examples"] = list(stats["bad_examples"])
        return {
            "version": STATE_VERSION, "role": self.role, "mode": self.mode, "fingerprint": self._fp,
            "sources": srcs, "mix": list(self._mix), "buffer": _pack(self._buf), "rng": self._rng,
            "carry": _tensor(self._carry),
            "carry_labels": None if self._carry_lab is None else _tensor(self._carry_lab),
            "skip": self._skip, "window": [_pack(b) for b in self._window], "cur": self._cur,
            "held": _pack([] if self._held is None else [self._held]),
            "exhausted": self._exhausted, "finished": self._finished, "batches": self.batches,
            "stats": stats,
        }

    def load_state_dict(self, d: dict, strict: bool = True) -> None:
        """Continue exactly where ``d`` was taken. ``strict`` refuses a state from other data
        (different files/sizes, split, seed, tokenizer, chunk size)."""
        if d.get("version") != STATE_VERSION:
            raise ValueError(f"data stream state version {d.get('version')} (this memfit reads "
                             f"{STATE_VERSION})")
        if strict and d.get("fingerprint") != self._fp:
            raise ValueError("the checkpoint's data stream was built from different data or settings:\n"
                             f"  checkpoint: {d.get('fingerprint')}\n  now:        {self._fp}\n"
                             "resume with the same --data/--val-fraction/--seed/--tokenizer/"
                             "--shuffle-buffer-size, or load_state_dict(strict=False)")
        if len(d["sources"]) != len(self.sources) or d.get("mode") != self.mode:
            raise ValueError("the checkpoint's data stream has a different number of sources or mode")
        self._drop_inflight()
        self._reset()
        for st, sd in zip(self._src, d["sources"]):
            st.pass_, st.pos, st.offset = int(sd["pass"]), int(sd["pos"]), int(sd["offset"])
            st.docs, st.pieces, st.done = int(sd["docs"]), int(sd["pieces"]), bool(sd["done"])
            st.pending = collections.deque(_unpack(sd["pending"]))
            st.plan_pass, st.plan_pos = st.pass_, st.pos
        self._mix = [int(x) for x in d["mix"]]
        self._buf = _unpack(d["buffer"])
        self._buf_tokens = sum(len(p[0]) for p in self._buf)
        for p in self._buf:
            k = (p[3], p[4])
            self._buf_count[k] = self._buf_count.get(k, 0) + 1
        self._rng = int(d["rng"])
        self._carry = _array(d["carry"])
        if self.with_labels:
            cl = d.get("carry_labels")
            self._carry_lab = _array(cl) if cl is not None else self._carry.copy()
        self._skip = int(d["skip"])
        self._window = collections.deque(_unpack(b) for b in d["window"])
        held = _unpack(d.get("held", {"n": 0}))
        self._held = held[0] if held else None
        self._cur = int(d["cur"])
        self._exhausted, self._finished = bool(d["exhausted"]), bool(d["finished"])
        self.batches = int(d["batches"])
        st = dict(d["stats"])
        st["bad_examples"] = list(st.get("bad_examples", []))
        self.stats.update(st)
        self._loaded = True

    # ------------------------------------------------------------ iteration
    def __iter__(self) -> Iterator[dict]:
        if self.finite and not getattr(self, "_loaded", False):
            self._drop_inflight()
            self._reset()
        self._loaded = False
        while True:
            b = self._next_batch()
            if b is None:
                return
            self.batches += 1
            yield b

    def __next__(self) -> dict:
        b = self._next_batch()
        if b is None:
            raise StopIteration
        self.batches += 1
        return b

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
            self._pool = _Pool(self.num_workers, self.encoder, self.filt, self.on_bad)
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
        """The next piece for the packer/padder, or None at the end of a finite stream."""
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

    # ------------------------------------------------------------ batching
    def _next_batch(self) -> dict | None:
        if self._finished:
            return None
        b = self._pack_batch() if self.mode == "pack" else self._pad_batch()
        if b is None:
            self._finished = True
        return b

    def _pack_batch(self) -> dict | None:
        L, St, R = self.seq_len, self.stride, self.rows
        need = (R - 1) * St + L
        if len(self._carry) < need and not self._exhausted:
            self._refill(need)
        carry = self._carry
        n = len(carry)
        if n >= need:
            r, partial = R, False
        else:                                   # the end of a finite stream
            r = 0 if n < L else min(R, (n - L) // St + 1)
            rem = n - r * St
            overlap = max(0, L - St) if (r > 0 or self.stats["tokens"] > 0) else 0
            partial = r < R and rem >= 2 and rem > overlap
            if r == 0 and not partial:
                return None
        ids = np.empty((r + partial, L), np.int64)
        lab = np.empty((r + partial, L), np.int64) if self.with_labels else None
        mask = np.ones((r + partial, L), np.int64)
        for k in range(r):
            ids[k] = carry[k * St:k * St + L]
            if lab is not None:
                lab[k] = self._carry_lab[k * St:k * St + L]
        if partial:
            tail = carry[r * St:r * St + L]
            m = len(tail)
            ids[r, :m] = tail
            ids[r, m:] = self.pad_id
            mask[r, m:] = 0
            if lab is not None:
                lab[r, :m] = self._carry_lab[r * St:r * St + m]
            self._carry = carry[:0]
            if self._carry_lab is not None:
                self._carry_lab = self._carry_lab[:0]
        else:
            drop = r * St
            if drop > n:
                self._skip = drop - n
                drop = n
            self._carry = carry[drop:]
            if self._carry_lab is not None:
                self._carry_lab = self._carry_lab[drop:]
        if lab is None:
            lab = ids.copy()
        if partial:
            lab[r, m:] = -100
        self.stats["tokens"] += int(mask.sum())
        return self._tensors(ids, mask, lab)

    def _refill(self, need: int) -> None:
        parts = [self._carry]
        lparts = [self._carry_lab] if self._carry_lab is not None else None
        have = len(self._carry)
        while have < need:
            p = self._next_piece()
            if p is None:
                self._exhausted = True
                break
            self._delivered(p)
            ids, lab, end = p[0], p[1], p[2]
            if lparts is not None and lab is None:
                lab = ids
            if end and self._eos is not None:
                ids = np.concatenate([ids, self._eos])
                if lparts is not None:
                    lab = np.concatenate([lab, self._eos])
            if self._skip:
                k = min(self._skip, len(ids))
                ids = ids[k:]
                if lparts is not None:
                    lab = lab[k:]
                self._skip -= k
            parts.append(ids)
            if lparts is not None:
                lparts.append(lab)
            have += len(ids)
        if len(parts) > 1:
            self._carry = np.concatenate(parts).astype(np.int32, copy=False)
            if lparts is not None:
                self._carry_lab = np.concatenate(lparts).astype(np.int32, copy=False)

    def _pad_batch(self) -> dict | None:
        if not self._window:
            W = self.rows * (1 if self.finite else GROUP_WINDOW_BATCHES)
            ex = []
            passes: dict[int, int] = {}
            while len(ex) < W:
                if self._held is not None:
                    p, self._held = self._held, None
                else:
                    p = self._next_piece()
                if p is None:
                    break
                if passes.get(p[3], p[4]) != p[4]:      # a new pass: keep it for the next window
                    self._held = p
                    break
                passes[p[3]] = p[4]
                self._delivered(p)
                ex.append(self._example(p))
            if not ex:
                return None
            if not self.finite:
                ex.sort(key=lambda e: len(e[0]))        # stable: ties keep arrival order
            batches = [ex[j:j + self.rows] for j in range(0, len(ex), self.rows)]
            if not self.finite:
                for j in range(len(batches) - 1, 0, -1):   # Fisher-Yates with the counter RNG
                    k = _mix64((self.seed * 0x9E3779B1) ^ _mix64(self._rng)) % (j + 1)
                    self._rng += 1
                    batches[j], batches[k] = batches[k], batches[j]
            self._window.extend(batches)
        batch = self._window.popleft()
        T = max(len(e[0]) for e in batch)
        n = len(batch)
        ids = np.full((n, T), self.pad_id, np.int64)
        lab = np.full((n, T), -100, np.int64)
        mask = np.zeros((n, T), np.int64)
        for k, e in enumerate(batch):
            m = len(e[0])
            ids[k, :m] = e[0]
            lab[k, :m] = e[1]
            mask[k, :m] = 1
        self.stats["tokens"] += int(mask.sum())
        return self._tensors(ids, mask, lab)

    def _example(self, p):
        """(ids, labels, end, src, pass) -> a truncated example (labels never None)."""
        ids, lab, end = p[0], p[1], p[2]
        if lab is None:
            lab = ids
            if end and self._eos is not None:
                ids = np.concatenate([ids, self._eos])
                lab = ids
        L = self.max_seq_len
        return (ids[:L], lab[:L], end, p[3], p[4])

    def _tensors(self, ids, mask, lab) -> dict:
        import torch
        b = {"input_ids": torch.from_numpy(ids), "attention_mask": torch.from_numpy(mask),
             "labels": torch.from_numpy(lab)}
        if self.pin_memory:
            b = {k: v.pin_memory() for k, v in b.items()}
        return b


# ---------------------------------------------------------------- state packing

def _tensor(a: np.ndarray):
    import torch
    return torch.from_numpy(np.ascontiguousarray(a, dtype=np.int32).copy())


def _array(t) -> np.ndarray:
    if t is None:
        return np.zeros(0, np.int32)
    if hasattr(t, "numpy"):
        return t.numpy().astype(np.int32, copy=True)
    return np.asarray(t, dtype=np.int32)


def _pack(pieces: list) -> dict:
    """Pieces (ids, labels, end, src, pass) -> a few flat tensors."""
    import torch
    if not pieces:
        return {"n": 0}
    lens = [len(p[0]) for p in pieces]
    has_lab = [p[1] is not None for p in pieces]
    out = {
        "n": len(pieces),
        "ids": _tensor(np.concatenate([p[0] for p in pieces])),
        "lens": torch.tensor(lens, dtype=torch.int64),
        "ends": torch.tensor([bool(p[2]) for p in pieces], dtype=torch.bool),
        "src": torch.tensor([int(p[3]) for p in pieces], dtype=torch.int64),
        "pass": torch.tensor([int(p[4]) for p in pieces], dtype=torch.int64),
        "has_labels": torch.tensor(has_lab, dtype=torch.bool),
    }
    if any(has_lab):
        out["labels"] = _tensor(np.concatenate([p[1] if p[1] is not None else p[0] for p in pieces]))
    return out


def _unpack(d: dict) -> list:
    n = int(d.get("n", 0))
    if not n:
        return []
    ids = _array(d["ids"])
    lab = _array(d["labels"]) if "labels" in d else None
    lens = d["lens"].tolist()
    ends = d["ends"].tolist()
    src = d["src"].tolist()
    pas = d["pass"].tolist()
    has = d["has_labels"].tolist()
    out, o = [], 0
    for k in range(n):
        m = lens[k]
        out.append((ids[o:o + m], lab[o:o + m] if (lab is not None and has[k]) else None,
                    bool(ends[k]), int(src[k]), int(pas[k])))
        o += m
    return out


# ---------------------------------------------------------------- building

def _resolve(cfg, chunk: int):
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


def _max_docs(cfg, sources) -> list[int] | None:
    n = cfg.data.max_examples
    if n is None:
        return None
    return [max(1, round(n * sh)) for sh in shares(sources)]


def make_encoder(cfg, tokenizer, encode: Callable | None, mode: str):
    from memfit.data.tokenizer import FunctionEncoder, PackEncoder
    if encode is not None:
        return FunctionEncoder(encode, (cfg.data.max_seq_len or cfg.data.seq_len) if mode == "pad" else None)
    return PackEncoder(tokenizer, cfg.data.text_field)


def _fingerprint(cfg, sources, tokenizer, role, chunk, seed) -> str:
    from memfit.data.tokenizer import tokenizer_fingerprint
    d = cfg.data
    parts = [role, ",".join(s.fingerprint() for s in sources), f"vf={d.val_fraction}",
             f"sub={d.subset_ratio}", f"max={d.max_examples}", f"seed={seed}",
             f"buf={d.shuffle_buffer_size}", f"chunk={chunk}", f"field={d.text_field}",
             f"tok={tokenizer_fingerprint(tokenizer)}"]
    return "|".join(parts)


def build_streams(cfg, tokenizer, rows_per_batch: int, seed: int, *, encode: Callable | None = None,
                  mode: str | None = None, num_workers: int | None = None,
                  chunk_bytes: int | None = None, rank: int = 0,
                  world_size: int = 1) -> tuple[TokenStream, TokenStream]:
    """(train, val) streams for ``cfg.data`` with ``rows_per_batch`` rows per effective batch.

    ``mode`` is 'pack' (pretraining; the default without ``encode``) or 'pad' (fine-tuning; the
    default with ``encode``). ``encode(doc) -> {"input_ids": [...], "labels": [...]}`` replaces plain
    text tokenization (the doc is a str for text files, a dict for JSONL/CSV records).
    ``rank``/``world_size`` (data parallel) give each rank a disjoint share of the read units (files or
    1 MiB units; a source with fewer units than ranks leaves some ranks without it). Raises
    :class:`memfit.data.sources.DataError` (``.problems``) when the data cannot be used.
    """
    from memfit.data.tokenizer import special_ids
    d = cfg.data
    chunk = int(chunk_bytes or CHUNK_BYTES)
    mode = mode or ("pad" if encode is not None else "pack")
    train_sources, val_sources = _resolve(cfg, chunk)
    eos, pad = special_ids(tokenizer)
    encoder = make_encoder(cfg, tokenizer, encode, mode)
    try:
        import torch
        pin = torch.cuda.is_available()
    except Exception:  # noqa: BLE001
        pin = False
    common: dict[str, Any] = {
        "rows": rows_per_batch, "seq_len": d.seq_len, "stride": d.stride, "mode": mode,
        "max_seq_len": d.max_seq_len, "seed": seed, "chunk_bytes": chunk, "eos_id": eos, "pad_id": pad,
        "on_bad_record": d.on_bad_record, "pin_memory": pin, "rank": rank, "world_size": world_size}
    train = TokenStream(train_sources, encoder, role="train", filt=split_filter(d, "train"),
                        shuffle_buffer_size=d.shuffle_buffer_size, max_docs=_max_docs(cfg, train_sources),
                        num_workers=d.num_workers if num_workers is None else num_workers,
                        fingerprint=_fingerprint(cfg, train_sources, tokenizer, "train", chunk, seed),
                        **common)
    vs = val_sources if val_sources is not None else train_sources
    val = TokenStream(vs, encoder, role="val", filt=split_filter(d, "val"), num_workers=0,
                      fingerprint=_fingerprint(cfg, vs, tokenizer, "val", chunk, seed), **common)
    return train, val


# ---------------------------------------------------------------- counting

def scan_source(source: Source, encoder, filters: dict[str, SplitFilter], eos: bool,
                exact_bytes: int = EXACT_SCAN_BYTES, sample_bytes: int = SAMPLE_SCAN_BYTES,
                chunk: int = CHUNK_BYTES) -> dict:
    """Documents and tokens of each named split of one source: exact when the source is at most
    ``exact_bytes`` (everything is read and tokenized), else extrapolated by bytes from
    ``sample_bytes`` read at evenly spaced units. Canonical order; no RNG."""
    if source.nbytes <= 0:
        raise DataError(f"{source.name}: its size is unknown, so tokens per epoch cannot be counted; "
                          "give --max-steps")
    exact = source.nbytes <= exact_bytes
    counts = {k: {"docs": 0, "pieces": 0, "tokens": 0} for k in filters}
    info = {"bad_records": 0, "replaced_chars": 0, "bytes_read": 0, "bad_examples": []}
    n = source.num_units
    if exact:
        raws: Any = raw_chunks(source, chunk)
    elif source.sequential:          # CSV: the first sample_bytes of each file, in order
        raws = _first_bytes(source, sample_bytes)
    else:
        k = max(1, min(n, math.ceil(sample_bytes / max(1, source.nbytes / max(1, n)))))
        picks = sorted({int(j * n / k) for j in range(k)})
        raws = (run_task(source.task([u])) for u in picks)
    read = 0
    for raw in raws:
        read += raw.nbytes
        info["bad_records"] += len(raw.bad)
        info["replaced_chars"] += raw.replaced
        for path, off, msg in raw.bad[: max(0, 3 - len(info["bad_examples"]))]:
            info["bad_examples"].append(f"{where(path, off)}: {msg}")
        keep = [i for i, h in enumerate(raw.hashes) if any(f.keep(h) for f in filters.values())]
        enc = encoder([raw.docs[i] for i in keep]) if keep else []
        for (ids, _, err), i in zip(enc, keep):
            if err is not None:
                info["bad_records"] += 1
                continue
            if ids.size == 0:
                continue
            for name, f in filters.items():
                if f.keep(raw.hashes[i]):
                    c = counts[name]
                    c["pieces"] += 1
                    c["docs"] += bool(raw.ends[i])
                    c["tokens"] += int(ids.size) + (1 if (eos and raw.ends[i]) else 0)
    info["bytes_read"] = read
    if not exact and read > 0:
        scale = source.nbytes / read
        for c in counts.values():
            for key in c:
                c[key] = round(c[key] * scale)
    info["exact"] = exact
    info.update(counts)
    return info


def _first_bytes(source: Source, budget: int):
    per_unit = max(1, budget // max(1, source.num_units))
    for u in range(source.num_units):
        off, got = 0, 0
        while off is not None and got < per_unit:
            raw = run_task(source.task([u], off))
            off = raw.next_offset
            got += raw.nbytes
            yield raw


def epoch_tokens(per_source_tokens: list[int], weights: list[float]) -> int:
    """Tokens until every mixed source has completed one pass: max_i T_i / share_i."""
    if len(per_source_tokens) == 1:
        return int(per_source_tokens[0])
    total = sum(weights) or 1.0
    return int(max(t / (w / total) for t, w in zip(per_source_tokens, weights)))


def estimate_tokens(cfg, tokenizer) -> int:
    """Training-split tokens per epoch (EOS separators included), for the LR schedule / --epochs.

    Exact (every document read and tokenized) for sources up to 16 MB; for larger sources an
    estimate extrapolated by bytes from ~4 MB read at evenly spaced units. ``--max-examples`` caps a
    source at its share of documents times the mean tokens per document. With several mixed sources
    one epoch lasts until every source has completed a pass (max over sources of tokens / share).
    Reads data but consumes no RNG and leaves no state behind.
    """
    from memfit.data.tokenizer import PackEncoder, special_ids
    srcs, _ = _resolve(cfg, CHUNK_BYTES)
    enc = PackEncoder(tokenizer, cfg.data.text_field)
    eos, _ = special_ids(tokenizer)
    filt = split_filter(cfg.data, "train")
    limits = _max_docs(cfg, srcs)
    toks = []
    for i, s in enumerate(srcs):
        c = scan_source(s, enc, {"train": filt}, eos is not None)["train"]
        t = c["tokens"]
        if limits is not None and c["docs"] > limits[i]:
            t = int(t * limits[i] / max(1, c["docs"]))
        toks.append(t)
    return epoch_tokens(toks, [s.weight for s in srcs])


def iter_split_tokens(cfg, tokenizer, role: str = "train") -> Iterator[np.ndarray]:
    """Token ids (int32 arrays, EOS appended where a document ends) of every training or validation
    document in canonical order, unshuffled and unpacked: for baselines (e.g. a unigram model fitted
    on the training split) and counts. Consumes no RNG."""
    from memfit.data.tokenizer import PackEncoder, special_ids
    train_srcs, val_srcs = _resolve(cfg, CHUNK_BYTES)
    srcs = val_srcs if (role == "val" and val_srcs is not None) else train_srcs
    filt = split_filter(cfg.data, role)
    enc = PackEncoder(tokenizer, cfg.data.text_field)
    eos, _ = special_ids(tokenizer)
    tail = None if eos is None else np.array([eos], np.int32)
    for s in srcs:
        for raw in raw_chunks(s):
            keep = [i for i, h in enumerate(raw.hashes) if filt.keep(h)]
            for (ids, _, err), i in zip(enc([raw.docs[i] for i in keep]), keep):
                if err is None and ids.size:
                    yield np.concatenate([ids, tail]) if (tail is not None and raw.ends[i]) else ids
