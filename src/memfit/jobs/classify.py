"""`memfit classify`: fine-tune an encoder (BERT-style) for sequence classification.

    memfit classify --model minilm --data bbc --val-fraction 0.2 --max-seq-len 128 --lr 1e-4

Data: CSV / JSONL / JSON records with a text field (--text-field) and a `label` field (or `category`,
`class`, `target`), a folder with one sub-folder of .txt files per label, or the embedded `bbc` corpus.
The validation split is stratified and fixed (by content hash within each class; --val-fraction), so
every evaluation — and every rerun — scores the same articles. Only training is reduced by
--max-examples / --subset-ratio. The loss can weight classes by inverse frequency (--class-weights
balanced, normalised so the average training example weighs 1). Each evaluation reports val_loss,
accuracy and macro-F1, writes the confusion matrix (memfit.log table, confusion_matrix.json,
plots/confusion_matrix.png); best/ keeps the best macro-F1 (the default --metric-for-best here).
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from pathlib import Path

import torch
import torch.nn.functional as F

from memfit import config as C
from memfit.jobs.common import assemble_job, pretrained_problems, run_job, run_length, start_run
from memfit.jobs.preflight import run_preflight
from memfit.runfiles import record
from memfit.train.evaluate import job_scores
from memfit.train.job import TrainResult

log = logging.getLogger("memfit")
LABEL_FIELDS = ("label", "category", "class", "target")
# Below this many validation texts, accuracy moves in steps of > 2% per text and macro-F1 more: warn.
TINY_VALIDATION = 50


def tiny_validation_warning(n_val: int, n_all: int, fraction: float) -> str | None:
    if n_val >= TINY_VALIDATION:
        return None
    return (f"validation has only {n_val} examples ({fraction:.0%} of {n_all}): accuracy moves in steps of "
            f"{1 / max(n_val, 1):.0%} per text and best/ is chosen on noise; raise --val-fraction "
            f"(e.g. {min(0.5, fraction * TINY_VALIDATION / max(n_val, 1)):.2f}) or add data")


def check_classify(cfg: C.Config, run_dir: Path) -> list[str]:
    """Problems beyond memfit.jobs.common.common_problems, found without loading a model."""
    return pretrained_problems(cfg) + data_problems(cfg)


def data_problems(cfg: C.Config) -> list[str]:
    problems = []
    for spec in cfg.data.data:
        if spec == "bbc":
            continue
        p = Path(spec)
        if not p.exists():
            problems.append(f"--data {spec}: no such file or folder (give CSV/JSONL with text and label, a "
                            "folder with one sub-folder per label, or bbc)")
        elif p.is_file() and p.suffix not in (".csv", ".jsonl", ".json"):
            problems.append(f"--data {spec}: use .csv, .jsonl or .json records (text + label)")
    return problems


def read_labelled(specs, text_field: str, on_bad_record: str = "skip") -> tuple[list[tuple[str, str]], int]:
    """(text, label) pairs from every --data entry, and the number of records skipped."""
    from memfit.data.formats import read_records
    pairs, skipped = [], 0
    for spec in specs:
        if spec == "bbc":
            from memfit.data.corpora import bbc_examples
            pairs += bbc_examples()
            continue
        p = Path(spec)
        if p.is_dir():
            for sub in sorted(q for q in p.iterdir() if q.is_dir()):
                pairs += [(f.read_text(errors="replace"), sub.name) for f in sorted(sub.glob("*.txt"))]
            continue
        for where, rec in read_records([p], on_bad_record):
            label = next((rec[k] for k in LABEL_FIELDS if isinstance(rec, dict) and k in rec), None)
            text = rec.get(text_field) if isinstance(rec, dict) else None
            if not isinstance(text, str) or not text.strip() or label is None or str(label) == "":
                if on_bad_record == "fail":
                    raise C.ConfigError([f"{where}: needs a {text_field!r} text and a label field "
                                         f"({'/'.join(LABEL_FIELDS)})"])
                skipped += 1
                continue
            pairs.append((text, str(label)))
    return pairs, skipped


def class_metrics(preds: list[int], golds: list[int], k: int) -> dict:
    """Accuracy, macro-F1 (each class's F1 averaged, so small classes count as much as big ones), and the
    confusion matrix (rows: true class, columns: predicted)."""
    cm = [[0] * k for _ in range(k)]
    for p, g in zip(preds, golds):
        cm[g][p] += 1
    f1s = []
    for c in range(k):
        tp = cm[c][c]
        fp = sum(cm[r][c] for r in range(k)) - tp
        fn = sum(cm[c]) - tp
        f1s.append(2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 1.0)
    n = max(len(golds), 1)
    return {"accuracy": sum(cm[c][c] for c in range(k)) / n, "f1": sum(f1s) / k, "per_class_f1": f1s,
            "confusion": cm}


def confusion_table(cm: list[list[int]], names: list[str]) -> str:
    w = max(6, *(len(n) for n in names))
    head = "true \\ pred".ljust(w) + " " + " ".join(n[:w].rjust(w) for n in names)
    rows = [names[i].ljust(w) + " " + " ".join(str(v).rjust(w) for v in row) for i, row in enumerate(cm)]
    return "\n".join([head] + rows)


def plot_confusion(cm: list[list[int]], names: list[str], path: Path, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    k = len(names)
    fig, ax = plt.subplots(figsize=(1.2 * k + 2.5, 1.1 * k + 2), constrained_layout=True)
    ax.imshow(cm, cmap="Blues")
    top = max(max(r) for r in cm) or 1
    for i in range(k):
        for j in range(k):
            ax.text(j, i, str(cm[i][j]), ha="center", va="center",
                    color="white" if cm[i][j] > top / 2 else "black")
    ax.set(xticks=range(k), yticks=range(k), xticklabels=names, yticklabels=names, xlabel="predicted",
           ylabel="true", title=title)
    plt.setp(ax.get_xticklabels(), rotation=30, ha="right")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)


def score_classes(model: torch.nn.Module, mb: dict[str, torch.Tensor]) -> dict:
    """One micro-batch of validation: the unweighted loss sum and the predicted / true classes."""
    logits = model(input_ids=mb["input_ids"], attention_mask=mb["attention_mask"]).logits.float()
    return {"loss_sum": float(F.cross_entropy(logits, mb["labels"], reduction="sum")),
            "preds": logits.argmax(-1).tolist(), "golds": mb["labels"].tolist()}


def run_classify(cfg: C.Config) -> TrainResult:
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from memfit.data.batches import PaddedBatches
    from memfit.data.examples import cap_stratified, limit, record_hash, stratified_split
    from memfit.export import export_hf
    from memfit.models.load import local_folder, resolve_source
    from memfit.models.loss import classification_loss

    start = start_run(cfg, check_classify)   # (--metric-for-best defaults to f1 here; a given one stays)
    cfg, run_dir = start.cfg, start.run_dir

    pairs, skipped = read_labelled(cfg.data.data, cfg.data.text_field, cfg.data.on_bad_record)
    names = sorted({lab for _, lab in pairs})
    if len(names) < 2:
        raise C.ConfigError([f"--data {' '.join(cfg.data.data)}: found {len(pairs)} examples with "
                             f"{len(names)} label(s); classification needs at least 2"])
    train_pairs, val_pairs = stratified_split(pairs, cfg.data.val_fraction)
    warning = tiny_validation_warning(len(val_pairs), len(pairs), cfg.data.val_fraction)
    split_size = len(val_pairs)
    if cfg.data.max_val_examples is not None:      # the rest of the split stays out of training too
        val_pairs = cap_stratified(val_pairs, cfg.data.max_val_examples)
    # Scored in content-hash order, not grouped by label: the first --eval-batches hold every class.
    val_pairs = sorted(val_pairs, key=lambda p: record_hash(p[0]))
    train_pairs = limit(train_pairs, cfg.data)
    counts = Counter(lab for _, lab in train_pairs)
    per_class = ", ".join(f"{n} {counts[n]}" for n in names)
    capped = f", {len(val_pairs)} scored (--max-val-examples)" if len(val_pairs) < split_size else ""
    log.info(f"data: {len(pairs)} examples, {len(names)} classes ({per_class} in training); "
             f"validation {split_size} (stratified {cfg.data.val_fraction:.0%}{capped}); "
             f"training {len(train_pairs)}" + (f"; {skipped} records skipped" if skipped else ""))
    if warning:
        log.warning(f"memfit: {warning}")

    folder = local_folder(resolve_source(cfg.model.model))
    tokenizer = AutoTokenizer.from_pretrained(folder)
    max_len = min(cfg.data.max_seq_len or 256, tokenizer.model_max_length or 512)
    model = AutoModelForSequenceClassification.from_pretrained(
        folder, num_labels=len(names), id2label=dict(enumerate(names)),
        label2id={n: i for i, n in enumerate(names)}, attn_implementation=cfg.model.attn_implementation)
    n_params = sum(p.numel() for p in model.parameters())
    log.info(f"model: {cfg.model.model} ({type(model).__name__}, {n_params:,} parameters), "
             f"max {max_len} tokens per text")

    label_id = {n: i for i, n in enumerate(names)}

    def encode(ps):
        enc = tokenizer([t for t, _ in ps], truncation=True, max_length=max_len)["input_ids"]
        return [{"input_ids": ids, "labels": label_id[lab]} for ids, (_, lab) in zip(enc, ps)]

    train_ex, val_ex = encode(train_pairs), encode(val_pairs)
    weights = None
    if cfg.train.class_weights == "balanced":
        n, k = len(train_pairs), len(names)
        weights = torch.tensor([n / (k * max(counts[c], 1)) for c in names])
        log.info("class weights: " + ", ".join(f"{c} {w:.2f}" for c, w in zip(names, weights.tolist())))

    loss_fn = classification_loss(weights)
    from memfit.dist.env import global_batch
    eff = global_batch(cfg)      # micro x accumulation x ranks
    pad = tokenizer.pad_token_id or 0
    train_batches = PaddedBatches(train_ex, eff, pad, cfg.train.seed)
    cfg, total_steps = run_length(cfg, len(train_batches))
    job = assemble_job(cfg, model, train_batches, total_steps, start.device, run_dir, loss_fn=loss_fn,
                       tokenizer=tokenizer)
    run_preflight(job, start.plan)     # before train() reads a batch: no data, no RNG

    def evaluate(max_batches: int = cfg.train.eval_batches) -> dict:
        """The first max_batches validation batches (0 = all): the same texts at every evaluation."""
        val = PaddedBatches(val_ex, eff, pad, shuffle=False, loop=False)
        t, _ = job_scores(job, val, score_classes, max_batches)
        preds, golds, loss_sum = t.get("preds", []), t.get("golds", []), t.get("loss_sum", 0.0)
        m = class_metrics(preds, golds, len(names))
        record(run_dir, "confusion_matrix.json", "plots")
        (run_dir / "confusion_matrix.json").write_text(json.dumps(
            {"labels": names, "confusion": m["confusion"],
             "per_class_f1": dict(zip(names, m["per_class_f1"])), "accuracy": m["accuracy"],
             "macro_f1": m["f1"]}, indent=1))
        plot_confusion(m["confusion"], names, run_dir / "plots" / "confusion_matrix.png",
                       f"validation: accuracy {m['accuracy']:.3f}, macro-F1 {m['f1']:.3f}")
        log.info("confusion matrix (validation):\n" + confusion_table(m["confusion"], names))
        return {"val_loss": loss_sum / max(len(golds), 1), "accuracy": m["accuracy"], "f1": m["f1"],
                "val_examples": len(golds)}

    job.hooks.evaluate = evaluate
    job.hooks.export = lambda: export_hf(model, tokenizer, run_dir / "final_model")
    result = run_job(job)
    if not job.world.is_main:     # (N ranks: rank 0 alone evaluates and writes)
        return result
    if result.status != "stopped" and result.metrics and result.metrics["val_examples"] < len(val_ex):
        # --eval-batches kept each evaluation short; the result (and confusion_matrix.json) is all of it
        result.metrics.update(evaluate(0))
        for event in job.eval_oom.drain():     # (an OOM here shrank the eval micro-batch)
            job.history.append(event)
    if result.metrics:
        log.info(f"validation: accuracy {result.metrics['accuracy']:.4f}, "
                 f"macro-F1 {result.metrics['f1']:.4f} "
                 f"on {len(val_ex)} texts; best/ holds the best macro-F1")
    return result
