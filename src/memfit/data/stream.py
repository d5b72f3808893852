"""The token stream: pieces (:mod:`memfit.data.pieces`) -> pack -> batches, with exact resume.

::

    pieces (read, split, tokenized, mixed, shuffled: memfit.data.pieces)
        ▼
    pack: EOS after each document, cut --seq-len blocks every --stride tokens
        ▼
    effective batches {input_ids, attention_mask, labels}: int64 [rows, T] on CPU

Map-style fine-tuning data (examples held in memory) is batched by
:class:`memfit.data.batches.PaddedBatches`, not here.

Exact resume: :meth:`TokenStream.state_dict` holds each source's cursor (pass, unit position, byte
offset for sequential formats), the already-tokenized pieces that were read but not yet delivered
(pending + shuffle buffer), the packer's carry-over tokens, the mixer's token counters and the RNG
counter. Loading it reads at most one chunk per source before the next batch, and never re-reads or
re-tokenizes what was consumed. Worker processes only read and tokenize chunks that the main process
planned (they hold no state), so the stream is identical for any ``--num-workers``.
"""

from __future__ import annotations

import collections
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from memfit.data.pieces import PieceReader, ReadOptions, Shard
from memfit.data.sources import SplitFilter
from memfit.data.units import Source

STATE_VERSION = 1


@dataclass(frozen=True)
class BatchShape:
    """What one effective batch looks like: ``rows`` blocks of ``seq_len`` tokens cut every ``stride``
    tokens (default: ``seq_len``), ``eos_id`` after each document, ``pad_id`` in a short last block."""
    rows: int
    seq_len: int
    stride: int | None = None
    eos_id: int | None = None
    pad_id: int = 0


class TokenStream(PieceReader):
    """An iterable of effective batches with exact ``state_dict()`` / ``load_state_dict()``.

    Train streams (``finite=False``) loop forever over epochs; iterating continues from the current
    position. Validation streams (``finite=True``) restart from the beginning on every ``iter()``
    and make one deterministic pass (no shuffle); their last batch may have fewer rows, and the last
    partial block is padded (attention_mask 0, labels -100).
    """

    def __init__(self, sources: list[Source], encoder, *, role: str, filt: SplitFilter, shape: BatchShape,
                 read: ReadOptions | None = None, shard: Shard | None = None, pin_memory: bool = False,
                 fingerprint: str = ""):
        if shape.rows < 1:
            raise ValueError(f"rows per batch must be >= 1 (got {shape.rows})")
        super().__init__(sources, encoder, role=role, filt=filt, read=read or ReadOptions(),
                         shard=shard or Shard(), eos_id=shape.eos_id)
        self.rows = int(shape.rows)
        self.seq_len = int(shape.seq_len)
        self.stride = int(shape.stride or shape.seq_len)
        self.pad_id = int(shape.pad_id)
        self.pin_memory = pin_memory
        ws = self.world_size
        self._fp = fingerprint + (f"|rank={self.rank}/{ws}" if ws > 1 else "")
        self.with_labels = bool(getattr(encoder, "has_labels", False))
        self._reset()

    # ------------------------------------------------------------ state
    def _reset(self) -> None:
        self._reset_pieces()
        self._carry = np.zeros(0, np.int32)
        self._carry_lab = np.zeros(0, np.int32) if self.with_labels else None
        self._skip = 0
        self._exhausted = False
        self._finished = False
        self.batches = 0             # batches yielded since the start (train) / this pass (val)

    @property
    def epoch(self) -> int:
        """Completed passes over the training data (the minimum over mixed sources); for a
        validation stream, 1 once its pass has ended."""
        if self.finite:
            return int(self._finished)
        return self._pieces_epoch()

    def state_dict(self) -> dict:
        """Plain python types and tensors only (loads with ``torch.load(weights_only=True)``)."""
        srcs = []
        for st in self._src:
            srcs.append({"pass": st.pass_, "pos": st.pos, "offset": st.offset, "docs": st.docs,
                         "pieces": st.pieces, "done": st.done, "pending": _pack(list(st.pending))})
        stats = dict(self.stats)
        stats["bad_examples"] = list(stats["bad_examples"])
        return {
            "version": STATE_VERSION, "role": self.role, "mode": "pack", "fingerprint": self._fp,
            "sources": srcs, "mix": list(self._mix), "buffer": _pack(self._buf), "rng": self._rng,
            "carry": _tensor(self._carry),
            "carry_labels": None if self._carry_lab is None else _tensor(self._carry_lab),
            "skip": self._skip, "cur": self._cur,
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
        # "mode" is always "pack" now; a "pad" state came from the padding mode that older memfit had
        # (map-style data is batched by PaddedBatches, whose state is not this one)
        if len(d["sources"]) != len(self.sources) or d.get("mode", "pack") != "pack":
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

    # ------------------------------------------------------------ batching
    def _next_batch(self) -> dict | None:
        if self._finished:
            return None
        b = self._pack_batch()
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
