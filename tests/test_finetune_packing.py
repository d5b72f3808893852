"""`memfit finetune --packing`: a packed run on a real tiny GPT-2 folder trains, its plan's steps per
epoch are the run's packed steps (not examples / effective batch), a resume mid-epoch continues bit for
bit, and --packing on a model whose attention mixes packed examples (OPT) exits 2 writing nothing.

One module-scoped packed run (1-layer, 32-wide GPT-2, GPT-2 tokenizer, one epoch of ~9 steps) feeds
the first three tests (~4 s); the resumed run another ~3 s.
"""

import json
import random

import pytest
import yaml

from memfit import config as C
from run_helpers import snapshot, tiny_lm_folder

MAX_LEN = 64


def records(n=120, seed=0):
    """Prompt/completion records of 4-20 GPT-2 tokens: several fit a 64-token row."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        words = " ".join(rng.choice(["red", "blue", "cat", "sky", "runs", "fast"]) for _ in range(rng.randint(1, 8)))
        rows.append({"prompt": f"Repeat: {words}\n", "completion": f"{words}."})
    return rows


def make_cfg(model, data, out, **train):
    return C.Config(task="finetune").replace(
        model={"model": str(model)},
        data={"data": (str(data),), "val_fraction": 0.1, "max_seq_len": MAX_LEN, "packing": "on"},
        train={"batch_size": 2, "effective_batch": 4, "epochs": 1.0, "eval_every": 0, "sample_tokens": 0,
               "precision": "fp32", "log_every": 1, **train},
        optim={"lr": 3e-3, "warmup_steps": 0},
        checkpoint={"save_every": 4},
        run={"output_dir": str(out), "quiet": True})


@pytest.fixture(scope="module")
def packed(tmp_path_factory):
    from memfit.jobs.finetune import run_causal_lm
    tmp = tmp_path_factory.mktemp("packed")
    model = tiny_lm_folder(tmp / "gpt2")
    data = tmp / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records()))
    result = run_causal_lm(make_cfg(model, data, tmp / "a"))
    return tmp, model, data, result


def packed_layout(model, data):
    """The run's data, laid out independently of the job: (steps, rows, examples) of epoch 0."""
    from memfit.data.examples import build_lm_data
    from memfit.data.packing import PackedBatches
    from memfit.models.load import load_tokenizer, resolve_source
    tok = load_tokenizer(resolve_source(str(model)))
    cfg = make_cfg(model, data, "unused")
    train = build_lm_data(cfg, tok, MAX_LEN).train
    batches = PackedBatches(train, 4, tok.pad_token_id, MAX_LEN, cfg.train.seed).epoch_batches(0)
    return len(batches), sum(r for _, r in batches), len(train)


def test_packed_run_trains_and_its_plan_counts_packed_steps(packed):
    tmp, model, data, result = packed
    steps, rows, examples = packed_layout(model, data)
    plan = json.loads((tmp / "a" / "plan.json").read_text())
    assert result.status == "finished"
    assert plan["packing"] is True and plan["seq_len"] == MAX_LEN
    assert plan["epoch_steps"] == steps == result.step            # one epoch: the packed steps
    assert plan["epoch_rows"] == rows and plan["epoch_examples"] == examples
    assert examples > 2 * rows                                     # really several examples per row
    assert steps < -(-examples // 4)                               # fewer steps than padded batches
    saved = yaml.safe_load((tmp / "a" / "config.yaml").read_text())
    assert saved["data"]["packing"] == "on"
    losses = [json.loads(line)["loss"] for line in open(tmp / "a" / "history.jsonl")
              if json.loads(line)["kind"] == "train"]
    assert len(losses) == steps and losses[-1] < losses[0]
    log = (tmp / "a" / "memfit.log").read_text()
    assert f"packing: {examples} examples in {rows} rows of {MAX_LEN} tokens per epoch" in log


def test_packed_resume_mid_epoch_is_bit_exact(packed):
    """Continue the run's step-4 checkpoint (mid-epoch) in a new directory: final weights and every
    history row after step 4 equal the uninterrupted run's."""
    from conftest import _chaos
    from memfit.jobs.finetune import run_causal_lm
    chaos = _chaos()
    tmp, model, data, result = packed
    cfg = make_cfg(model, data, tmp / "b").replace(checkpoint={"resume": str(tmp / "a" / "checkpoints" / "step-4")})
    resumed = run_causal_lm(cfg)
    assert resumed.status == "finished" and resumed.step == result.step
    assert chaos.same_weights(tmp / "a" / "final_model" / "model.safetensors",
                              tmp / "b" / "final_model" / "model.safetensors") is None
    a = [r for r in chaos.history(tmp / "a") if r["kind"] == "train"]
    b = [r for r in chaos.history(tmp / "b") if r["kind"] == "train"]
    assert result.step > 5 and [r["step"] for r in b] == list(range(5, result.step + 1)) and a[4:] == b


def test_a_padded_checkpoint_does_not_continue_packed(packed):
    from memfit.data.batches import PaddedBatches
    from memfit.data.packing import PackedBatches
    from memfit.jobs.resumecheck import fixed_differences
    exs = [{"input_ids": [1, 2, 3], "labels": [1, 2, 3]}] * 8
    with pytest.raises(ValueError, match="packed in rows of 64 tokens; this run's are padded"):
        PaddedBatches(exs, 2, 0).load_state_dict(PackedBatches(exs, 2, 0, 64).state_dict())
    tmp, model, data, _ = packed
    old = make_cfg(model, data, tmp / "a").replace(data={"packing": "auto"})   # a config from before --packing
    assert fixed_differences(old, old.replace(data={"packing": "off"})) == []
    assert fixed_differences(old, old.replace(data={"packing": "on"})) == ["--packing: 'off' -> 'on'"]


def tiny_opt_folder(path):
    """A 1-layer OPT: its attention takes no position_ids, so packed examples see each other."""
    import torch
    from transformers import OPTConfig, OPTForCausalLM

    from memfit.data.tokenizer import gpt2_tokenizer
    tok = gpt2_tokenizer()
    torch.manual_seed(0)
    OPTForCausalLM(OPTConfig(vocab_size=len(tok), num_hidden_layers=1, hidden_size=32, ffn_dim=64,
                             num_attention_heads=2, max_position_embeddings=64, word_embed_proj_dim=32,
                             pad_token_id=tok.pad_token_id or 0, bos_token_id=0, eos_token_id=0)
                   ).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def test_packing_on_where_it_does_not_work_exits_2_and_auto_pads(tmp_path, capsys):
    from memfit.cli import main
    from memfit.jobs.finetune import resolve_packing
    model = tiny_opt_folder(tmp_path / "opt")
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records(8)))
    before = snapshot(tmp_path)
    code = main(["finetune", "--model", str(model), "--data", str(data), "--packing", "on", "--max-steps", "1",
                 "--output-dir", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert code == 2 and "--packing on: opt (default attention) does not keep packed examples apart" in err
    assert snapshot(tmp_path) == before and not (tmp_path / "run").exists()
    cfg, note = resolve_packing(make_cfg(model, data, tmp_path / "run").replace(data={"packing": "auto"}))
    assert cfg.data.packing == "off" and note.startswith("packing off: opt (default attention)")
    gpt2 = tiny_lm_folder(tmp_path / "gpt2")
    cfg, note = resolve_packing(make_cfg(gpt2, data, tmp_path / "run").replace(data={"packing": "auto"}))
    assert cfg.data.packing == "on" and note is None
