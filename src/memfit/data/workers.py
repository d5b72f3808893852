"""Worker side of the token stream: read one planned chunk, keep the stream's documents, tokenize them.

Workers (``--num-workers``) hold no state: they run the chunks the main process planned, so the stream
is identical for any number of workers, and chunks they prefetched are simply dropped on save/restore.
Measured on the 2-core CPU machine (512 MB bench corpus, 45 s windows, shared machine): 0 workers 162k
tokens/s, 2 workers 114k tokens/s. The fast tokenizer already uses both cores inside one batch encode,
so worker processes only add transfer and scheduling cost there; they pay off where tokenization can
overlap GPU compute on a machine with spare cores (Kaggle/Colab GPU boxes), and cost memory (each is a
fresh interpreter holding its own copy of the tokenizer) and about a second to start.
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


RESULT_TIMEOUT_S = 600.0     # a worker that gives no chunk for this long is reported hung (a chunk is ~1 MiB)


def serve(fd: int) -> None:
    """A worker's main loop (a fresh interpreter started by :class:`WorkerPool`): read (encoder, filter,
    on_bad) once, then answer each ``(seq, task)`` with ``(seq, ChunkOut | exception)``, until EOF."""
    from multiprocessing.connection import Connection
    signal.signal(signal.SIGINT, signal.SIG_IGN)      # the parent handles Ctrl-C and terminates us
    conn = Connection(fd)
    failed = None
    try:
        encoder, filt, on_bad = conn.recv()
    except Exception as e:  # noqa: BLE001 - e.g. an encode function defined in the user's __main__
        failed = DataError(f"a --num-workers worker could not load the encoder ({type(e).__name__}: {e}); "
                           "define encode in an importable module (not __main__), or use --num-workers 0")
    while True:
        try:
            seq, task = conn.recv()
        except (EOFError, OSError):                   # the parent closed the pool (or died)
            return
        try:
            out: object = failed or process_task(task, filt, encoder, on_bad)
        except Exception as e:  # noqa: BLE001 - handed to the parent, which raises it
            out = e
        try:
            conn.send((seq, out))
        except OSError:                               # the parent closed the pool mid-chunk
            return


class _Handle:
    """One submitted chunk; ``get()`` waits for it (bounded) and re-raises the worker's error."""

    def __init__(self, pool: WorkerPool, worker: int, seq: int):
        self.pool, self.worker, self.seq = pool, worker, seq
        self.done, self.value = False, None

    def get(self):
        self.pool._wait(self)
        if isinstance(self.value, BaseException):
            raise self.value
        return self.value


class WorkerPool:
    """Stateless reader/tokenizer processes, each a fresh interpreter (``python -c``) that imports only
    this module (and what unpickling the encoder needs): never forked, so no lock another thread of
    the parent held (tokenizer training, torch, tokenizers' pool) is inherited locked, and never
    re-importing the user's ``__main__`` as spawn / forkserver do. A worker that dies (EOF on its
    socket) or gives no result within ``timeout_s`` is a :class:`DataError` naming it, never a hang.

    Chunks go to the workers round robin; each answers its own in order. A handle dropped unread
    (the stream moved on) has its result discarded when it arrives.
    """

    def __init__(self, n: int, encoder, filt, on_bad, timeout_s: float = RESULT_TIMEOUT_S):
        import pickle
        import socket
        import subprocess
        import sys
        import weakref
        from multiprocessing.connection import Connection
        self.timeout_s = float(timeout_s)
        self._seq = 0
        self._pending: list[weakref.WeakValueDictionary] = []
        self.procs, self.conns = [], []
        init = pickle.dumps((encoder, filt, on_bad))        # unpicklable encoder: fails here, in the parent
        env = dict(os.environ, TOKENIZERS_PARALLELISM="false",
                   PYTHONPATH=os.pathsep.join(p for p in sys.path if p))   # the parent's imports resolve
        for _ in range(n):
            mine, theirs = socket.socketpair()
            cmd = [sys.executable, "-c", f"from memfit.data.workers import serve; serve({theirs.fileno()})"]
            self.procs.append(subprocess.Popen(cmd, pass_fds=(theirs.fileno(),), env=env,
                                               stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL))
            theirs.close()
            conn = Connection(mine.detach())
            conn.send_bytes(init)
            self.conns.append(conn)
            self._pending.append(weakref.WeakValueDictionary())

    def submit(self, task) -> _Handle:
        self._seq += 1
        k = self._seq % len(self.conns)
        h = _Handle(self, k, self._seq)
        self._pending[k][self._seq] = h
        try:
            self.conns[k].send((self._seq, task))
        except OSError:                # a dead worker: reported by get(), with its exit status
            pass
        return h

    def _wait(self, h: _Handle) -> None:
        import time
        conn, proc = self.conns[h.worker], self.procs[h.worker]
        end = time.monotonic() + self.timeout_s
        while not h.done:
            left = end - time.monotonic()
            try:
                ready = left > 0 and conn.poll(left)
                if ready:
                    seq, out = conn.recv()
            except (EOFError, OSError):
                ready = None
            if ready is None:
                code = proc.wait()
                how = f"was killed by signal {-code}" if code < 0 else f"exited with code {code}"
                self.close()
                raise DataError(f"data worker {h.worker} (pid {proc.pid}) {how} while reading a chunk "
                                "(out of host memory?); rerun with fewer --num-workers, or 0 to read in "
                                "the main process")
            if not ready:
                self.close()
                raise DataError(f"data worker {h.worker} (pid {proc.pid}) gave no result in "
                                f"{self.timeout_s:.0f} s (hung); rerun with --num-workers 0 to read in "
                                "the main process")
            other = self._pending[h.worker].pop(seq, None)
            if other is not None:
                other.value, other.done = out, True

    def close(self):
        for conn in self.conns:
            with contextlib.suppress(OSError):
                conn.close()
        for p in self.procs:
            with contextlib.suppress(Exception):      # best effort at shutdown
                p.kill()
                p.wait()
