"""memfit classify: metrics, data sources, and the reference run — MiniLM on BBC news, macro-F1 >= 0.90 on a
fixed stratified 20% validation split, best/ holding the best-F1 weights."""

import json

import pytest
import torch

from memfit import config as C
from memfit.data.examples import stratified_split
from memfit.jobs.classify import class_metrics, confusion_table, read_labelled


def test_metrics_and_confusion_matrix():
    m = class_metrics(preds=[0, 0, 1, 1, 2, 0], golds=[0, 0, 1, 2, 2, 2], k=3)
    assert m["confusion"] == [[2, 0, 0], [0, 1, 0], [1, 1, 1]]
    assert m["accuracy"] == pytest.approx(4 / 6)
    assert m["f1"] == pytest.approx((0.8 + 2 / 3 + 0.5) / 3)      # per-class F1 averaged (macro)
    table = confusion_table(m["confusion"], ["a", "b", "c"])
    assert table.splitlines()[3].split() == ["c", "1", "1", "1"]


def test_sources_folder_per_label_csv_jsonl(tmp_path):
    for label in ("ham", "spam"):
        (tmp_path / "tree" / label).mkdir(parents=True)
        for i in range(5):
            (tmp_path / "tree" / label / f"{i}.txt").write_text(f"{label} text {i}")
    (tmp_path / "d.csv").write_text("text,label\nhello,greet\nbye,leave\n,empty\n")
    (tmp_path / "d.jsonl").write_text(json.dumps({"text": "hi", "category": "greet"}) + "\n{broken\n")
    sources = [str(tmp_path / "tree"), str(tmp_path / "d.csv"), str(tmp_path / "d.jsonl")]
    pairs, skipped = read_labelled(sources, "text")
    assert len(pairs) == 13 and skipped == 2
    assert ("hi", "greet") in pairs and ("spam text 3", "spam") in pairs
    train, val = stratified_split(pairs[:10], 0.2)
    assert sorted(lab for _, lab in val) == ["ham", "spam"] and len(train) == 8


@pytest.mark.slow
def test_minilm_on_bbc_reaches_macro_f1(tmp_path):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from memfit.jobs.classify import run_classify
    from memfit.models.load import local_folder, resolve_source
    # Half the training articles (subset_ratio) keeps this under ~100 s on 2 cores; validation stays whole.
    cfg = C.Config(task="classify").replace(
        model={"model": "minilm"},
        data={"data": ("bbc",), "val_fraction": 0.2, "max_seq_len": 128, "subset_ratio": 0.5},
        train={"batch_size": 16, "epochs": 1.0, "eval_every": 28, "precision": "fp32", "log_every": 10},
        optim={"lr": 1.5e-4, "warmup_steps": 5, "weight_decay": 0.01},
        run={"output_dir": str(tmp_path / "run"), "quiet": True})
    result = run_classify(cfg)
    evals = [json.loads(line) for line in open(tmp_path / "run" / "history.jsonl")]
    evals = [r for r in evals if r["kind"] == "eval"]
    print(f"MiniLM on BBC: macro-F1 {result.metrics['f1']:.4f}, accuracy {result.metrics['accuracy']:.4f} "
          f"after {result.step} steps; evals {[round(r['f1'], 4) for r in evals]}")
    assert result.status == "finished" and len(evals) == 2
    assert result.metrics["f1"] >= 0.90
    conf = json.loads((tmp_path / "run" / "confusion_matrix.json").read_text())
    assert sum(map(sum, conf["confusion"])) == 448 >= 0.2 * 2225     # ceil(20%) of every class
    assert (tmp_path / "run" / "plots" / "confusion_matrix.png").stat().st_size > 1000

    best = json.loads((tmp_path / "run" / "best" / "metrics.json").read_text())
    assert best["metric"] == "f1" and best["value"] == max(r["f1"] for r in evals)
    # best/ loads with stock transformers and scores what it recorded on the same validation texts
    from memfit.data.corpora import bbc_examples
    _, val = stratified_split(bbc_examples(), 0.2)
    tok = AutoTokenizer.from_pretrained(local_folder(resolve_source("minilm")))
    model = AutoModelForSequenceClassification.from_pretrained(tmp_path / "run" / "best").eval()
    names = [model.config.id2label[i] for i in range(len(model.config.id2label))]
    preds = []
    with torch.no_grad():
        for i in range(0, len(val), 64):
            enc = tok([t for t, _ in val[i:i + 64]], truncation=True, max_length=128, padding=True,
                      return_tensors="pt")
            preds += model(**enc).logits.argmax(-1).tolist()
    f1 = class_metrics(preds, [names.index(lab) for _, lab in val], len(names))["f1"]
    assert f1 == pytest.approx(best["value"], abs=0.005)
