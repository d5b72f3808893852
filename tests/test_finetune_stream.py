"""Streamed fine-tuning data (data/sftstream.py): batches resume bit-exactly mid-epoch (packed and padded,
across windows and epochs), held-out records never train; and (slow) a 1 GB instruction JSONL fine-tunes
20 steps in a real `memfit finetune` process whose peak RSS is within 300 MB of the same run on a 2 MB
file, and a resume from its step-10 checkpoint ends bit-identical."""

import json
import os
import random
import subprocess

import pytest
import torch

from memfit import config as C
from memfit.data import sftstream
from memfit.data.sftstream import ExampleStream, StreamedBatches
from run_helpers import tiny_lm_folder

WORDS = ["red", "blue", "cat", "sky", "runs", "fast", "green", "tree", "sun", "moon"]


def write_records(path, n, seed=0, pad=0):
    """n instruction records; `pad` characters of a field no format reads make the file as large as a
    test needs while the examples stay short."""
    rng = random.Random(seed)
    filler = "x" * pad
    with open(path, "w") as f:
        for i in range(n):
            words = " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 8)))
            f.write(json.dumps({"instruction": f"Repeat {i}: {words}", "input": "", "output": words,
                                "source": filler}) + "\n")
    return path


def stream_cfg(**data):
    return C.Config(task="finetune").replace(data={"val_fraction": 0.1, **data}, train={"seed": 3})


@pytest.fixture(scope="module")
def tok():
    from memfit.data.tokenizer import gpt2_tokenizer
    t = gpt2_tokenizer()
    t.pad_token = t.eos_token
    return t


@pytest.mark.parametrize("seq_len", [48, None], ids=["packed", "padded"])
def test_streamed_batches_resume_bit_exactly(tmp_path, tok, monkeypatch, seq_len):
    monkeypatch.setattr(sftstream, "WINDOW", 16)        # windows, files and epochs are all crossed below
    files = [write_records(tmp_path / "a.jsonl", 50, 1), write_records(tmp_path / "b.jsonl", 30, 2)]
    cfg = stream_cfg()

    def batches():
        return StreamedBatches(ExampleStream(files, cfg, tok, 48), 3, tok.pad_token_id, seq_len)

    a = batches()
    it = iter(a)
    for _ in range(7):
        next(it)
    state = a.state_dict()
    want = [next(it) for _ in range(40)]                   # > one epoch of 72 training records
    assert a.epoch >= 1
    b = batches()
    b.load_state_dict(json.loads(json.dumps(state)))       # as a checkpoint stores it
    got = iter(b)
    for w in want:
        g = next(got)
        assert g.keys() == w.keys() and all(torch.equal(g[k], w[k]) for k in w)
    if seq_len:
        assert "position_ids" in want[0] and int((want[0]["position_ids"] == 0).sum()) > 3   # several per row


def test_held_out_records_never_train_and_are_the_validation(tmp_path, tok):
    f = write_records(tmp_path / "a.jsonl", 200, 5)
    s = ExampleStream([f], stream_cfg(), tok, 48)
    recs = [json.loads(x) for x in f.read_text().splitlines()]
    held = {r["instruction"] for r in recs if s.held_out(r)}
    assert 5 <= len(held) <= 40                                       # ~10%, by content hash
    val = s.validation([])
    texts = [tok.decode(ex["input_ids"]) for ex in val]
    assert len(val) == len(held) and all(any(h in t for h in held) for t in texts)
    trained = []
    for pos, ex in iter(s):
        if pos["epoch"] > 0:
            break
        trained.append(tok.decode(ex["input_ids"]))
    assert len(trained) == 200 - len(held)
    assert not any(h + "\n" in t or h in t.split("\n") for t in trained for h in held)


def peak_rss(cmd, env, out):
    """(exit code, peak RSS in bytes) of a real child process (wait4's rusage: its own peak, exactly)."""
    with open(out, "w") as fh:
        p = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env)
        _, status, usage = os.wait4(p.pid, 0)
    p.returncode = os.waitstatus_to_exitcode(status)
    return p.returncode, usage.ru_maxrss * 1024


@pytest.mark.slow
def test_a_1gb_jsonl_finetunes_in_bounded_memory_and_resumes_exactly(tmp_path):
    from conftest import _chaos
    chaos = _chaos()
    model = tiny_lm_folder(tmp_path / "gpt2")
    big = write_records(tmp_path / "big.jsonl", 1_100_000, 7, pad=900)        # ~1.1 GB
    small = write_records(tmp_path / "small.jsonl", 2_000, 7, pad=900)       # ~2 MB: loaded whole
    assert big.stat().st_size > 10**9 and small.stat().st_size < sftstream.STREAM_BYTES
    env = chaos.child_env()

    def args(data, out, *extra):
        return [*chaos.memfit_cmd(), "finetune", "--model", str(model), "--data", str(data), "--max-seq-len",
                "64", "--batch-size", "4", "--max-steps", "20", "--save-every", "10", "--eval-every", "0",
                "--eval-batches", "2", "--sample-tokens", "0", "--precision", "fp32", "--log-every", "1",
                "--quiet", "--output-dir", str(out), *extra]

    rc, rss_small = peak_rss(args(small, tmp_path / "s"), env, tmp_path / "s.out")
    assert rc == 0, (tmp_path / "s.out").read_text()[-3000:]
    rc, rss_big = peak_rss(args(big, tmp_path / "a"), env, tmp_path / "a.out")
    assert rc == 0, (tmp_path / "a.out").read_text()[-3000:]
    print(f"peak RSS: 2 MB file {rss_small / 2**20:.0f} MiB, 1.1 GB file {rss_big / 2**20:.0f} MiB")
    assert rss_big - rss_small < 300 * 2**20
    assert "streamed from 1 source(s)" in (tmp_path / "a" / "memfit.log").read_text()
    rc, _ = peak_rss(args(big, tmp_path / "b", "--resume", str(tmp_path / "a" / "checkpoints" / "step-10")),
                     env, tmp_path / "b.out")
    assert rc == 0, (tmp_path / "b.out").read_text()[-3000:]
    assert chaos.same_weights(tmp_path / "a" / "final_model" / "model.safetensors",
                              tmp_path / "b" / "final_model" / "model.safetensors") is None
    a = [r for r in chaos.history(tmp_path / "a") if r["kind"] == "train"]
    b = [r for r in chaos.history(tmp_path / "b") if r["kind"] == "train"]
    assert len(a) == 20 and a[10:] == b
