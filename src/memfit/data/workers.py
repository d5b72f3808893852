"""Worker side of the token stream: read one planned chunk, keep the stream's documents, tokenize them.

Workers (``--num-workers``) hold no state: they run the chunks the main process planned, so the stream
is identical for any number of workers, and chunks they prefetched are simply dropped on save/restore.
Measured on the 2-core CPU machine (512 MB bench corpus, 45 s windows, shared machine): 0 workers 162k
tokens/s, 2 workers 114k tokens/s. The fast tokenizer already uses both cores inside one batch encode,
so worker processes only add transfer and scheduling cost there; they pay off where tokenization can
overlap GPU compute on a machine with spare cores (Kaggle/Colab GPU boxes), and cost memory (a forked
copy of the parent's pages, shared until written).
"""

from __future__ import annotations

import contextlib
import os
import signal
from dataclasses import dataclass

from memfit.data.readers import DataError, where
from memfit.data.sources import SplitFilter
from memfit.data.units import run_task


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


class WorkerPool:
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
