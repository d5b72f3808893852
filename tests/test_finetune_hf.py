"""Fine-tuning from Hugging Face datasets (data/hfrecords.py, the `hf` extra): a save_to_disk folder and a
Parquet file train packed on a tiny GPT-2 folder, and a resume from a mid-run checkpoint ends with the
uninterrupted run's weights and history. Skipped where `datasets` is not installed (pip install 'memfit[hf]')."""

import json
import random

import pytest

from memfit import config as C
from run_helpers import tiny_lm_folder

datasets = pytest.importorskip("datasets")


def make_cfg(model, data, out, **checkpoint):
    return C.Config(task="finetune").replace(
        model={"model": str(model)}, data={"data": (data,), "val_fraction": 0.1, "max_seq_len": 64},
        train={"batch_size": 2, "effective_batch": 4, "max_steps": 6, "eval_every": 0, "eval_batches": 2,
               "sample_tokens": 0, "precision": "fp32", "log_every": 1},
        optim={"lr": 3e-3, "warmup_steps": 0}, checkpoint={"save_every": 3, **checkpoint},
        run={"output_dir": str(out), "quiet": True})


@pytest.mark.slow     # ~20 s each: two fine-tuning runs on 2 shared cores
@pytest.mark.parametrize("kind", ["saved", "parquet"])
def test_a_hf_dataset_trains_and_resumes_exactly(tmp_path, monkeypatch, kind):
    from conftest import _chaos
    from memfit.jobs.finetune import run_causal_lm
    chaos = _chaos()
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf-cache"))
    rng = random.Random(0)
    rows = [{"prompt": f"Repeat {i}: {w}\n", "completion": f"{w}."}
            for i, w in enumerate(" ".join(rng.choice(["red", "sky", "cat"]) for _ in range(rng.randint(1, 6)))
                                  for _ in range(300))]
    ds = datasets.Dataset.from_list(rows)
    if kind == "saved":
        ds.save_to_disk(str(tmp_path / "ds"))
        data = str(tmp_path / "ds")
    else:
        ds.to_parquet(str(tmp_path / "d.parquet"))
        data = "hf:" + str(tmp_path / "d.parquet")
    model = tiny_lm_folder(tmp_path / "gpt2")
    a = run_causal_lm(make_cfg(model, data, tmp_path / "a"))
    assert a.status == "finished" and a.step == 6
    log = (tmp_path / "a" / "memfit.log").read_text()
    assert "streamed from 1 source(s)" in log and "val_loss" in json.dumps(a.metrics)
    b = run_causal_lm(make_cfg(model, data, tmp_path / "b", resume=str(tmp_path / "a" / "checkpoints" / "step-3")))
    assert b.status == "finished" and b.step == 6
    assert chaos.same_weights(tmp_path / "a" / "final_model" / "model.safetensors",
                              tmp_path / "b" / "final_model" / "model.safetensors") is None
    ha = [r for r in chaos.history(tmp_path / "a") if r["kind"] == "train"]
    hb = [r for r in chaos.history(tmp_path / "b") if r["kind"] == "train"]
    assert len(ha) == 6 and ha[3:] == hb
