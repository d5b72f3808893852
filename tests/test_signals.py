"""GracefulInterrupt with real signals: first one sets a flag, second aborts, handlers restored."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

import pytest

from memfit.train.signals import AbortTraining, GracefulInterrupt


def _deliver(sig: int) -> None:
    os.kill(os.getpid(), sig)
    for _ in range(100):          # Python runs the handler at the next bytecode boundary
        time.sleep(0.001)


def test_sigterm_sets_flag_and_handlers_are_restored():
    before = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    logs = []
    with GracefulInterrupt(log=logs.append) as gi:
        assert gi.installed and not gi.requested
        _deliver(signal.SIGTERM)
        assert gi.requested and gi.signal_name == "SIGTERM"
        assert "finishing this step" in logs[0]
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == before


def test_sigint_is_not_a_keyboard_interrupt_inside():
    with GracefulInterrupt(log=lambda s: None) as gi:
        _deliver(signal.SIGINT)           # would raise KeyboardInterrupt without the handler
        assert gi.signal_name == "SIGINT"
    with pytest.raises(KeyboardInterrupt):
        _deliver(signal.SIGINT)           # default behaviour is back


def test_second_signal_aborts_without_saving():
    with GracefulInterrupt(log=lambda s: None, hard_abort=False) as gi:
        _deliver(signal.SIGTERM)
        with pytest.raises(AbortTraining):
            _deliver(signal.SIGTERM)
        assert gi.count == 2
    assert not issubclass(AbortTraining, KeyboardInterrupt)   # a loop's `except KeyboardInterrupt` won't save


def test_second_signal_hard_exit_in_a_script():
    code = ("import os, signal, time\n"
            "from memfit.train.signals import GracefulInterrupt\n"
            "with GracefulInterrupt(log=print) as gi:\n"
            "    os.kill(os.getpid(), signal.SIGTERM); time.sleep(0.05)\n"
            "    assert gi.requested\n"
            "    os.kill(os.getpid(), signal.SIGTERM); time.sleep(5)\n"
            "print('not reached')\n")
    proc = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 128 + signal.SIGTERM, proc.stderr
    assert "aborting now" in proc.stdout and "not reached" not in proc.stdout


def test_off_main_thread_installs_nothing():
    result = {}

    def worker():
        with GracefulInterrupt(log=lambda s: None) as gi:
            result["installed"] = gi.installed
            gi.trigger()
            result["requested"] = gi.requested

    t = threading.Thread(target=worker)
    t.start()
    t.join()
    assert result == {"installed": False, "requested": True}


def test_ignored_signal_stays_ignored():
    prev = signal.signal(signal.SIGTERM, signal.SIG_IGN)
    try:
        with GracefulInterrupt(log=lambda s: None) as gi:
            assert signal.getsignal(signal.SIGTERM) is signal.SIG_IGN
            assert signal.getsignal(signal.SIGINT) == gi._handle
        assert signal.getsignal(signal.SIGTERM) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGTERM, prev)
