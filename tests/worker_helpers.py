"""Encoders for the worker-pool tests: importable by a fresh worker interpreter (tests/ is on its path)."""

from __future__ import annotations

import os
import threading
import time

import numpy as np

LOCK = threading.Lock()       # a module lock the encoder takes: held by another thread at fork time


class LockedEncoder:
    """Each document -> its UTF-8 bytes as ids, under LOCK (as a tokenizer takes its own lock)."""
    has_labels = False

    def __call__(self, docs):
        with LOCK:
            return [(np.frombuffer(d.encode(), np.uint8).astype(np.int32), None, None) for d in docs]


class FaultyEncoder(LockedEncoder):
    """A document 'die' kills the worker (SIGKILL, as the OOM killer does); 'hang' blocks it forever;
    'bad' is a bad record."""

    def __call__(self, docs):
        if "bad" in docs:
            return [(None, None, "a bad record") for _ in docs]
        if "die" in docs:
            os.kill(os.getpid(), 9)
        if "hang" in docs:
            time.sleep(3600)
        return super().__call__(docs)
