"""Issue 10 items 5 and 6: throughput is non-padding input tokens / s for every job kind (loss tokens and
examples/s beside it), measured on an injected clock and checked against the test's own attention_mask
sums; the bar's counter equals the step at every step (a SIGINT included) and its tok/s moves every step
while loss and memory refresh at --log-every."""

import json
import signal

import pytest
import torch
from test_api_fit import new_model, ns
from run_helpers import tiny_bert_folder, tiny_lm_folder
from test_train_e2e import small_corpus

import memfit
import memfit.train.loop as loop
import memfit.train.meter as meter
from memfit.cli import main

DT = 0.5


@pytest.fixture
def counted(monkeypatch):
    """A clock that moves DT per reading, and the test's own count of every trained effective batch."""
    t = [0.0]

    def fake_clock():
        t[0] += DT
        return t[0]
    monkeypatch.setattr(meter, "clock", fake_clock, raising=False)
    seen: list[dict] = []
    real = loop.accumulate

    def counting(model, batch, *a, **k):
        lab = batch["labels"]
        seen.append({"tokens": int(batch["attention_mask"].sum()), "rows": lab.shape[0],
                     "loss_tokens": int((lab[:, 1:] != -100).sum()) if lab.dim() == 2 else lab.shape[0]})
        return real(model, batch, *a, **k)
    monkeypatch.setattr(loop, "accumulate", counting)
    return seen


def _train_rows(run):
    return [r for r in map(json.loads, (run / "history.jsonl").read_text().splitlines()) if r["kind"] == "train"]


def _check(rows, seen, lm: bool):
    assert [r["step"] for r in rows] == list(range(1, len(seen) + 1))
    total = 0
    for r, s in zip(rows, seen):
        total += s["tokens"]
        assert r["tokens_per_s"] == s["tokens"] / DT and r["tokens"] == total
        assert r["examples_per_s"] == s["rows"] / DT
        if lm:
            assert r["loss_tokens_per_s"] == s["loss_tokens"] / DT and s["loss_tokens"] < s["tokens"]
        else:
            assert "loss_tokens_per_s" not in r and r["tokens_per_s"] > r["examples_per_s"]


def test_pretrain_tokens_per_s(tmp_path, counted):
    data = small_corpus(tmp_path / "data")
    run = tmp_path / "run"
    assert main(["train", "--data", str(data), "--target-params", "150k", "--vocab-size", "512", "--seq-len", "16",
                 "--batch-size", "4", "--max-steps", "3", "--log-every", "1", "--eval-every", "0", "--quiet",
                 "--output-dir", str(run)]) == 0
    _check(_train_rows(run), counted, lm=True)
    assert counted[0]["tokens"] == 4 * 16


def test_finetune_counts_input_tokens_not_only_loss_tokens(tmp_path, counted):
    rows = [{"instruction": f"Add {a} and {a + 3}.", "input": "", "output": f"{a} plus {a + 3} is {2 * a + 3}."}
            for a in range(10, 40)]
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    model = tiny_lm_folder(tmp_path / "lm")
    run = tmp_path / "run"
    assert main(["finetune", "--model", str(model), "--data", str(data), "--batch-size", "4", "--max-steps", "3",
                 "--log-every", "1", "--eval-every", "0", "--sample-tokens", "0", "--precision", "fp32",
                 "--quiet", "--output-dir", str(run)]) == 0
    _check(_train_rows(run), counted, lm=True)


def test_classify_counts_tokens_not_rows(tmp_path, counted):
    words = ["alpha", "beta gamma", "delta epsilon zeta eta", "theta"]
    lines = ["text,label"] + [f"{' '.join([words[i % 4]] * (1 + i % 5))},{'ab'[i % 2]}" for i in range(40)]
    (tmp_path / "d.csv").write_text("\n".join(lines) + "\n")
    run = tmp_path / "run"
    assert main(["classify", "--model", str(tiny_bert_folder(tmp_path / "bert")), "--data", str(tmp_path / "d.csv"),
                 "--batch-size", "4", "--max-steps", "3", "--log-every", "1", "--eval-every", "0",
                 "--precision", "fp32", "--quiet", "--output-dir", str(run)]) == 0
    _check(_train_rows(run), counted, lm=False)


def test_fit_counts_non_padding_tokens(tmp_path, counted, tiny_gpt2):
    g = torch.Generator().manual_seed(0)
    data = []
    for i in range(24):
        n = 6 + i % 9
        ids = torch.randint(0, 256, (16,), generator=g)
        mask = (torch.arange(16) < n).long()
        data.append({"input_ids": ids * mask, "attention_mask": mask, "labels": torch.where(mask.bool(), ids, -100)})
    res = memfit.fit(tiny_gpt2, data, output_dir=tmp_path / "run", batch_size=4, max_steps=3, log_every=1,
                     precision="fp32", quiet=True)
    _check([r for r in res.history if r["kind"] == "train"], counted, lm=True)


def test_bar_counter_is_the_step_every_step_and_at_a_sigint(tmp_path, monkeypatch):
    from tqdm.std import tqdm
    c = [-1]

    def square_clock():          # readings 0, 1, 4, 9, ...: every window has its own rate
        c[0] += 1
        return float(c[0] ** 2)
    monkeypatch.setattr(meter, "clock", square_clock, raising=False)
    seen = []

    def on_step(step, row):
        bar = next(b for b in list(tqdm._instances) if b.desc == "train")
        seen.append((step, bar.n, dict(kv.split("=") for kv in bar.postfix.split(", ")), bar))
        if step == 5:
            signal.raise_signal(signal.SIGINT)
    opts = {**ns["OPTIONS"], "inject_oom_above_tokens": None, "log_every": 3, "eval_every": 0, "quiet": False}
    res = memfit.fit(new_model(), ns["make_data"](96), loss_fn=ns["loss_fn"], output_dir=tmp_path / "run",
                     on_step=on_step, **opts)
    assert res.status == "stopped" and res.step == 5
    assert [(s, n) for s, n, _, _ in seen] == [(s, s) for s in range(1, 6)]
    assert seen[-1][3].n == 5                                   # the closed bar still says 5/10
    # 16 rows per step; windows restart at the logged steps 1 and 3: 16/1, 16/3, 32/8, 16/7, 32/16
    assert [p["tok/s"] for _, _, p, _ in seen] == ["16", "5", "4", "2", "2"]
    loss = [p["loss"] for _, _, p, _ in seen]
    assert loss[1] == loss[0] and loss[3] == loss[4] == loss[2]   # loss refreshes at log steps only
    rows = {r["step"]: r for r in res.history if r["kind"] == "train"}
    assert loss[2] == f"{rows[3]['loss']:.3f}"
