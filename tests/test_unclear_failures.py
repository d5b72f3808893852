"""Issue 18: failures that used to be a traceback (exit 1) or a silent 143 are one readable line with the
documented exit code, found before anything is written. Real files, a real read-only mount, real
signals to a real `memfit train` process."""

from __future__ import annotations

import random
import signal
import sys
import time
from pathlib import Path

import pytest
from run_helpers import tmpfs

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
import chaos as H  # noqa: E402

from memfit import cli  # noqa: E402


def train(args, capsys) -> tuple[int, str]:
    rc = cli.main(["train", *args])
    out = capsys.readouterr()
    return rc, out.err + out.out


def test_malformed_yaml_is_one_line_listed_with_the_other_problems(tmp_path, corpus, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("data: [unclosed\n  x: :\n")
    out = tmp_path / "run"
    rc, err = train(["--config", str(bad), "--batch-size", "0", "--output-dir", str(out)], capsys)
    assert rc == 2, err
    assert f"{bad}: not valid YAML at line 2" in err and "--batch-size" in err and "Traceback" not in err, err
    assert not out.exists()


def test_output_dir_under_a_file_and_an_impossible_seq_len_are_exit_2_before_writing(tmp_path, corpus, capsys):
    f = tmp_path / "afile"
    f.write_text("x")
    rc, err = train(H.train_args(f / "sub", corpus, 2), capsys)
    assert rc == 2 and f"{f} is a file, not a directory" in err and "Traceback" not in err, err
    out = tmp_path / "run"
    rc, err = train(H.train_args(out, corpus, 2, extra=["--seq-len", "1000000"]), capsys)
    assert rc == 2 and "--seq-len 1,000,000" in err and "Traceback" not in err, err
    assert not out.exists()


def test_a_read_only_output_dir_is_exit_2(tmp_path, corpus, capsys):
    # a read-only mount denies even root (chmod does not): the honest test of "cannot write here"
    with tmpfs(tmp_path / "ro", "ro,size=1m") as ro:
        for out in (ro, ro / "run"):
            rc, err = train(H.train_args(out, corpus, 2), capsys)
            assert rc == 2 and "is not writable" in err and "Traceback" not in err, err


def test_on_bad_record_fail_stops_before_writing_so_the_fixed_rerun_is_not_refused(tmp_path, capsys):
    data = tmp_path / "data.jsonl"
    lines = [f'{{"text": "line {i} of a small corpus for the on-bad-record check"}}' for i in range(400)]
    lines[7] = '{"text": broken'
    data.write_text("\n".join(lines) + "\n")
    out = tmp_path / "run"
    args = ["--data", str(data), "--target-params", "120k", "--vocab-size", "300", "--seq-len", "16",
            "--batch-size", "2", "--max-steps", "1", "--eval-every", "0", "--eval-batches", "1",
            "--sample-tokens", "0", "--quiet", "--preflight", "off", "--on-bad-record", "fail",
            "--output-dir", str(out)]
    rc, err = train(args, capsys)
    assert rc == 2 and f"{data}:8: not valid JSON" in err and "Traceback" not in err, err
    assert not out.exists()
    lines[7] = '{"text": "fixed"}'
    data.write_text("\n".join(lines) + "\n")
    rc, err = train(args, capsys)
    assert rc == 0, err


# Both signals: BPE training runs off the main thread (data/tokenizer.py), so the handler runs at once even
# while the Rust trainer is busy (SIGINT used to wait for the tokenizer to finish on a loaded box).
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_during_tokenizer_training_says_nothing_was_saved(tmp_path, corpus, sig):
    rng = random.Random(0)
    words = (corpus / "train.txt").read_text().split()
    big = tmp_path / "big.txt"
    with open(big, "w") as f:            # ~12 MB of distinct words: BPE training takes seconds
        for _ in range(12_000):
            f.write(" ".join(f"{rng.choice(words)}{rng.randrange(997)}" for _ in range(100)) + "\n\n")
    out = tmp_path / "run"
    proc = H.start(["--data", str(big), "--text-split", "paragraph", "--target-params", "3M", "--max-steps",
                    "1", "--quiet", "--output-dir", str(out)], tmp_path / "out.txt")
    try:
        deadline = time.monotonic() + 240
        while "run directory:" not in H.log_since(out, 0):     # logged just before the tokenizer starts
            assert proc.poll() is None and time.monotonic() < deadline, (tmp_path / "out.txt").read_text()
            time.sleep(0.05)
        proc.send_signal(sig)
        rc = proc.wait(240)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    text = (tmp_path / "out.txt").read_text()
    assert "tokenizer:" not in (out / "memfit.log").read_text(), "the tokenizer finished before the signal"
    assert rc == 1, text                      # neither 75 (nothing is resumable) nor a silent 143
    assert f"stopped by {sig.name} during start-up" in text and "nothing was saved yet" in text, text
    assert "Traceback" not in text and "resumably" not in text, text
    assert not (out / "checkpoints").exists()
