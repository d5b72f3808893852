"""classify's validation (issue 10 item 10): --eval-batches bounds each evaluation, --max-val-examples caps
the scored split (stratified, fixed), a tiny split is warned about, and the result scores all of it."""

import json

from memfit import cli
from memfit.data.examples import cap_stratified, stratified_split
from memfit.jobs.classify import tiny_validation_warning


def test_cap_stratified_keeps_class_shares_and_is_fixed():
    pairs = [(f"a text {i}", "a") for i in range(30)] + [(f"b text {i}", "b") for i in range(10)]
    capped = cap_stratified(pairs, 8)
    assert sorted(lab for _, lab in capped) == ["a"] * 6 + ["b"] * 2      # 30:10 -> 6:2
    assert set(capped) == set(cap_stratified(list(reversed(pairs)), 8))  # by content hash, not position
    assert cap_stratified(pairs, 100) == pairs
    three = pairs + [("c text", "c")]
    assert sorted(lab for _, lab in cap_stratified(three, 3)) == ["a", "b", "c"]   # every class while n allows


def test_tiny_validation_warning_names_the_fix():
    msg = tiny_validation_warning(4, 76, 0.05)
    assert "only 4 examples (5% of 76)" in msg and "steps of 25%" in msg and "--val-fraction" in msg
    assert tiny_validation_warning(50, 1000, 0.05) is None


def test_eval_batches_and_max_val_examples_on_a_real_run(tmp_path):
    rows = [{"text": f"the {w} {i} is {w}", "label": lab}
            for i in range(40) for w, lab in (("cat", "animal"), ("car", "vehicle"))]
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    _, val = stratified_split([(r["text"], r["label"]) for r in rows], 0.3)
    assert len(val) == 24                                                # 12 per class
    out = tmp_path / "run"
    code = cli.main(["classify", "--model", "minilm", "--data", str(data), "--val-fraction", "0.3",
                     "--max-val-examples", "20", "--eval-batches", "1", "--batch-size", "8", "--max-steps", "1",
                     "--eval-every", "1", "--max-seq-len", "16", "--precision", "fp32", "--quiet",
                     "--output-dir", str(out)])
    assert code == 0
    evals = [json.loads(line) for line in open(out / "history.jsonl")]
    evals = [r for r in evals if r["kind"] == "eval"]
    assert [r["val_examples"] for r in evals] == [8]                     # one batch of 8 per evaluation
    conf = json.loads((out / "confusion_matrix.json").read_text())
    assert [sum(r) for r in conf["confusion"]] == [10, 10]               # the result: all 20, 10 per class
    log = (out / "memfit.log").read_text()
    first = log.split("true \\ pred")[1].splitlines()[1:3]             # the first (one-batch) evaluation
    assert all(sum(map(int, row.split()[1:])) > 0 for row in first)     # both classes in its 8 texts
    assert "validation has only 24 examples (30% of 80)" in log
    assert "validation 24 (stratified 30%, 20 scored (--max-val-examples))" in log
