"""--num-workers: the worker pool never hangs. A lock another thread holds when the pool starts (the old
forked pool inherited it locked and hung forever), a worker killed mid-chunk, a hung worker and a bad
record each end in a result or one clear DataError. (Exact resume with workers: test_data_stream.)"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from memfit.data.readers import DataError
from memfit.data.sources import SplitFilter
from memfit.data.workers import WorkerPool
from worker_helpers import FaultyEncoder, LockedEncoder

TESTS = Path(__file__).parent
SRC = TESTS.parent / "src"


def task(*docs):
    return ("docs", "d", list(enumerate(docs)))


def test_lock_held_by_a_thread_when_the_pool_starts_does_not_hang():
    """The forked pool hung here forever (its worker inherited LOCK held); run in a subprocess with a
    timeout so the old behaviour fails the test instead of hanging it."""
    script = textwrap.dedent(f"""
        import sys, threading, time
        sys.path[:0] = [{str(TESTS)!r}, {str(SRC)!r}]
        from worker_helpers import LOCK, LockedEncoder
        from memfit.data.sources import SplitFilter
        from memfit.data.workers import WorkerPool
        held = threading.Event()
        def hold():
            with LOCK:
                held.set()
                time.sleep(600)
        threading.Thread(target=hold, daemon=True).start()
        held.wait()
        pool = WorkerPool(2, LockedEncoder(), SplitFilter(), "skip")
        hs = [pool.submit(("docs", "d", [(i, "doc %d" % i)])) for i in range(4)]
        print([h.get().pieces[0][0].size for h in hs])
        pool.close()
    """)
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[5, 5, 5, 5]"


def test_results_in_order_and_a_dropped_handle_is_discarded():
    pool = WorkerPool(2, LockedEncoder(), SplitFilter(), "skip")
    try:
        hs = [pool.submit(task("a" * (k + 1), "bb")) for k in range(5)]
        del hs[1]                                    # dropped unread (the stream moved on)
        sizes = [[p[0].size for p in h.get().pieces] for h in reversed(hs)]
        assert sizes == [[5, 2], [4, 2], [3, 2], [1, 2]]
        assert all(len(p) == 0 for p in pool._pending)
    finally:
        pool.close()


def test_a_killed_worker_is_a_clear_error():
    pool = WorkerPool(1, FaultyEncoder(), SplitFilter(), "skip")
    with pytest.raises(DataError, match=r"data worker 0 \(pid \d+\) was killed by signal 9.*--num-workers"):
        pool.submit(task("die")).get()
    assert all(p.poll() is not None for p in pool.procs)


def test_a_hung_worker_times_out_and_is_stopped():
    pool = WorkerPool(1, FaultyEncoder(), SplitFilter(), "skip", timeout_s=1.5)
    with pytest.raises(DataError, match=r"gave no result in 2 s \(hung\); rerun with --num-workers 0"):
        pool.submit(task("hang")).get()
    assert pool.procs[0].poll() == -9                 # killed, not left behind


def test_a_bad_record_with_on_bad_fail_is_raised_in_the_parent():
    pool = WorkerPool(1, FaultyEncoder(), SplitFilter(), "fail")
    try:
        with pytest.raises(DataError, match=r"d\[0\]: a bad record \(--on-bad-record fail"):
            pool.submit(task("bad")).get()
        assert [p[0].size for p in pool.submit(task("fine")).get().pieces] == [4]   # still serving
    finally:
        pool.close()


def test_an_encode_function_of_main_is_a_clear_error():
    """A fresh worker cannot import the user's __main__: one clear error, not a dead worker."""
    script = textwrap.dedent(f"""
        import sys
        sys.path[:0] = [{str(SRC)!r}]
        from memfit.data.readers import DataError
        from memfit.data.sources import SplitFilter
        from memfit.data.tokenizer import FunctionEncoder
        from memfit.data.workers import WorkerPool
        def encode(doc):
            return {{"input_ids": [1, 2]}}
        pool = WorkerPool(1, FunctionEncoder(encode), SplitFilter(), "skip")
        try:
            pool.submit(("docs", "d", [(0, "x")])).get()
        except DataError as e:
            print(e)
        pool.close()
    """)
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert "could not load the encoder (AttributeError" in r.stdout
    assert "define encode in an importable module (not __main__), or use --num-workers 0" in r.stdout
