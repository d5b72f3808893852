"""LoRA on the offline SmolLM2-135M (GGUF): validation loss drops, the adapter loads with stock peft,
a resumed run is bit-identical, and merged folders load with stock transformers and match the adapter.

One module-scoped run (4 steps, fp32, 4 rows of <= 64 tokens) feeds every test here: the model is
135M parameters on 2 shared cores, so each extra run costs ~10 s.
"""

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from memfit import config as C

PROMPT = ("<|im_start|>user\nAdd 12 and 30.<|im_end|>\n<|im_start|>assistant\n12 plus 30 equals 42. Done!"
          "<|im_end|>\n<|im_start|>user\nAdd 5 and 71.<|im_end|>\n")


def make_cfg(data, out, **train):
    return C.Config(task="finetune").replace(
        model={"model": "smollm2"},
        data={"data": (str(data),), "val_fraction": 0.15, "max_seq_len": 64},
        lora={"lora": True},
        train={"batch_size": 4, "max_steps": 4, "eval_every": 0, "sample_tokens": 0, "precision": "fp32",
               "log_every": 1, **train},
        optim={"lr": 2e-3, "warmup_steps": 0},
        checkpoint={"save_every": 2},
        run={"output_dir": str(out), "quiet": True})


@pytest.fixture(scope="module")
def run_a(tmp_path_factory):
    import random

    from memfit.jobs.finetune import run_causal_lm
    tmp = tmp_path_factory.mktemp("lora")
    rng = random.Random(0)
    rows = []
    for _ in range(48):
        a, b = rng.randint(10, 99), rng.randint(10, 99)
        rows.append({"instruction": f"Add {a} and {b}.", "input": "",
                     "output": f"{a} plus {b} equals {a + b}. Done!"})
    data = tmp / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    result = run_causal_lm(make_cfg(data, tmp / "a"))
    return tmp, data, result


@pytest.fixture(scope="module")
def base():
    from memfit.models.load import load_causal_lm, load_tokenizer, resolve_source
    src = resolve_source("smollm2")
    return load_causal_lm(src), load_tokenizer(src)


def test_lora_lowers_validation_loss(run_a):
    _, _, result = run_a
    before, after = result.metrics["val_loss_before"], result.metrics["val_loss_after"]
    print(f"SmolLM2-135M LoRA, 4 steps: val_loss {before:.4f} -> {after:.4f}")
    assert result.status == "finished" and after < 0.6 * before


def test_checkpoint_holds_adapter_and_base_fingerprint_only(run_a):
    tmp, _, _ = run_a
    ck = tmp / "a" / "checkpoints" / "step-2"
    with safe_open(ck / "model.safetensors", "pt") as f:
        keys = list(f.keys())
        meta = f.metadata()
    assert keys and all(".lora_A." in k or ".lora_B." in k for k in keys)
    assert "memfit_base_fingerprint" in meta["memfit_extras"]
    assert (ck / "model.safetensors").stat().st_size < 8e6          # not the 540 MB base


def test_resume_is_bit_identical(run_a):
    """Continue run A's step-2 checkpoint in a new directory: the final adapter equals run A's bit for bit."""
    from memfit.jobs.finetune import run_causal_lm
    tmp, data, _ = run_a
    cfg = make_cfg(data, tmp / "b").replace(checkpoint={"resume": str(tmp / "a" / "checkpoints" / "step-2")})
    result = run_causal_lm(cfg)
    assert result.status == "finished" and result.step == 4
    a = load_file(tmp / "a" / "final_model" / "adapter_model.safetensors")
    b = load_file(tmp / "b" / "final_model" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    def rows(d):
        rows = [json.loads(line) for line in open(d / "history.jsonl")]
        return [(r["step"], r["loss"], r["lr"], r["tokens"]) for r in rows if r["kind"] == "train"]
    assert rows(tmp / "a")[2:] == rows(tmp / "b") and [r[0] for r in rows(tmp / "b")] == [3, 4]


def test_adapter_loads_with_stock_peft_and_merges(run_a, base, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from memfit.cli import main
    from memfit.jobs.merge import merge_adapter
    tmp, _, _ = run_a
    adapter = tmp / "a" / "final_model"
    model, tok = base
    ids = tok(PROMPT, return_tensors="pt")["input_ids"]
    peft_model = PeftModel.from_pretrained(model, str(adapter)).eval()
    with torch.no_grad():
        ref = peft_model(input_ids=ids).logits
    # The adapter names the dequantized base: <MEMFIT_CACHE>/gguf/<sha256 fingerprint>/, a stock HF folder
    import os
    from pathlib import Path

    from peft import AutoPeftModelForCausalLM

    from memfit.models.load import fingerprint_files, resolve_source
    named = Path(json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"])
    assert named == Path(os.environ["MEMFIT_CACHE"]).resolve() / "gguf" / fingerprint_files(
        [resolve_source("smollm2").path])
    assert {"config.json", "model.safetensors", "tokenizer.json", "memfit_source.json"} <= {
        p.name for p in named.iterdir()}
    assert not [p for p in named.parent.iterdir() if ".tmp-" in p.name]       # nothing half-written left
    stock = AutoPeftModelForCausalLM.from_pretrained(str(adapter)).eval()     # offline (conftest), stock
    with torch.no_grad():
        assert torch.equal(stock(input_ids=ids).logits, ref)
    del stock

    merge_adapter("smollm2", adapter, tmp_path / "m32", dtype="fp32")
    # Without --base: the adapter's own base_model_name_or_path
    assert main(["merge", "--adapter", str(adapter), "--out", str(tmp_path / "m16"), "--dtype", "fp16"]) == 0
    diffs = {}
    for name in ("m32", "m16"):
        merged = AutoModelForCausalLM.from_pretrained(tmp_path / name).eval()   # stock loading
        assert merged.dtype == (torch.float32 if name == "m32" else torch.float16)
        with torch.no_grad():
            logits = merged.float()(input_ids=ids).logits
        diffs[name] = float((logits - ref).abs().max())
        del merged
    scale = float(ref.abs().max())
    print(f"merged vs adapter logits: fp32 max|diff| {diffs['m32']:.2e}; fp16 max|diff| {diffs['m16']:.2e} "
          f"(logits up to {scale:.1f})")
    assert diffs["m32"] < 1e-4
    # fp16 rounds each merged weight to 2^-11 relative; through 30 layers that moved the logits by 3.9e-2 to
    # 4.6e-2 (about 1e-3 of the largest logit) in our runs: allow 2.5e-3 of it.
    assert diffs["m16"] < 2.5e-3 * scale


def test_merge_refuses_bad_arguments(tmp_path):
    from memfit.jobs.merge import merge_adapter
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "x").write_text("x")
    with pytest.raises(C.ConfigError) as e:
        merge_adapter(str(tmp_path / "nope"), tmp_path, tmp_path / "out", dtype="fp8")
    text = str(e.value)
    assert "--base" in text and "adapter_config.json" in text and "not empty" in text and "--dtype" in text
