"""Fine-tuning data: formats -> labels masked on prompts, deterministic splits, resumable padded batches."""

import json

import pytest
import torch

from memfit import config as C
from memfit.data.batches import PaddedBatches
from memfit.data.examples import build_lm_data, hash_split, stratified_split
from memfit.data.formats import detect_format, encode_record


@pytest.fixture(scope="module")
def tok():
    """SmolLM2's tokenizer (chat template, EOS <|im_end|>) from the dequantized-GGUF cache."""
    from memfit.models.load import load_tokenizer, resolve_source
    return load_tokenizer(resolve_source("smollm2"))


def learned(tok, ex):
    return tok.decode([t for t in ex["labels"] if t != -100])


def test_formats_are_recognised_by_their_fields():
    assert detect_format({"messages": []}) == "chat"
    assert detect_format({"instruction": "a", "input": "", "output": "b"}) == "alpaca"
    assert detect_format({"prompt": "a", "completion": "b"}) == "prompt_completion"
    assert detect_format({"body": "a"}, text_field="body") == "text"
    assert detect_format({"question": "a"}) is None
    from memfit.data.formats import expand_paths
    files, problems = expand_paths(["kjv", "nowhere.jsonl"])          # embedded corpora read as plain text
    assert files[0].name == "kjv.jsonl" and problems == ["--data nowhere.jsonl: no such file (or no "
                                                         ".jsonl/.json/.csv/.txt files in it)"]


def test_loss_only_on_responses(tok):
    alpaca = encode_record({"instruction": "Add 1 and 2.", "input": "", "output": "3"}, tok, "alpaca", 200)[0]
    assert learned(tok, alpaca) == "3<|im_end|>\n"          # rendered with the model's chat template
    pc = encode_record({"prompt": "Q: 1+2=", "completion": " 3"}, tok, "prompt_completion", 200)[0]
    assert learned(tok, pc) == " 3<|im_end|>"               # EOS appended: the model learns to stop
    chat = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "Hello!"},
                         {"role": "user", "content": "bye"}, {"role": "assistant", "content": "Bye now."}]}
    ex = encode_record(chat, tok, "chat", 200)[0]
    assert learned(tok, ex) == "Hello!<|im_end|>\nBye now.<|im_end|>\n"   # both assistant turns, no user turn
    everything = encode_record(chat, tok, "chat", 200, train_on_prompt=True)[0]
    assert everything["labels"] == everything["input_ids"]
    cut = encode_record(chat, tok, "chat", 20)[0]
    assert len(cut["input_ids"]) == 20 and len(cut["labels"]) == 20


def test_plain_text_is_chunked_not_dropped(tok):
    ids = tok("word " * 300)["input_ids"] + [tok.eos_token_id]
    chunks = encode_record({"text": "word " * 300}, tok, "text", 64)
    assert [t for c in chunks for t in c["input_ids"]] == ids
    assert all(c["labels"] == c["input_ids"] for c in chunks)


def test_hash_split_is_fixed_and_order_free():
    items = [{"i": i} for i in range(50)]
    tr, va = hash_split(items, 0.2)
    _, va2 = hash_split(list(reversed(items)), 0.2)
    assert len(va) == 10 and sorted(map(str, va)) == sorted(map(str, va2))
    assert not set(map(str, tr)) & set(map(str, va))
    pairs = [(f"text {i}", "ab"[i % 2] if i < 40 else "c") for i in range(60)]
    tr, va = stratified_split(pairs, 0.25)
    per = {lab: sum(1 for _, x in va if x == lab) for lab in "abc"}
    assert per == {"a": 5, "b": 5, "c": 5}


def test_padded_batches_resume_exactly():
    torch.manual_seed(0)
    ex = [{"input_ids": list(range(1, 2 + i % 7)), "labels": list(range(1, 2 + i % 7))} for i in range(23)]
    ref = PaddedBatches(ex, 4, pad_id=0, seed=3)
    it = iter(ref)
    for _ in range(9):                      # into the second epoch (6 batches per epoch)
        next(it)
    state = json.loads(json.dumps(ref.state_dict()))
    expected = [next(it) for _ in range(8)]
    resumed = PaddedBatches(ex, 4, pad_id=0, seed=3)
    resumed.load_state_dict(state)
    got = iter(resumed)
    for e in expected:
        g = next(got)
        assert all(torch.equal(e[k], g[k]) for k in e)
    b = expected[0]
    lengths = b["attention_mask"].sum(1)
    assert torch.all(lengths[:-1] >= lengths[1:])            # longest first: micro-batches trim padding
    assert torch.all(b["labels"][b["attention_mask"] == 0] == -100)


def test_padded_batches_pad_with_the_pad_id_and_mask_it():
    """Rows padded to the longest one with pad_id, attention_mask 0 and labels -100 there; every batch
    has `rows` rows but the last of the pass (moved here from the stream's removed padding mode)."""
    ex = [{"input_ids": [5] * (1 + i % 9), "labels": [-100] + [5] * (i % 9)} for i in range(21)]
    batches = list(PaddedBatches(ex, 8, pad_id=99, seed=0, loop=False))
    assert [b["input_ids"].shape[0] for b in batches] == [8, 8, 5]
    for b in batches:
        ids, lab, m = b["input_ids"], b["labels"], b["attention_mask"]
        assert ids.shape[1] == int(m.sum(1).max())                 # no all-padding column
        assert torch.all(ids[m == 0] == 99) and torch.all(ids[m == 1] == 5)
        assert torch.all(lab[m == 0] == -100) and torch.all(lab[:, 0] == -100)   # prompt label kept
    assert sum(int(b["attention_mask"].sum()) for b in batches) == sum(len(e["input_ids"]) for e in ex)


def test_build_lm_data_counts_bad_records(tmp_path, tok):
    f = tmp_path / "d.jsonl"
    lines = [json.dumps({"prompt": f"Q{i}:", "completion": f" A{i}"}) for i in range(10)]
    lines += ["{not json", json.dumps({"question": "?"})]
    f.write_text("\n".join(lines) + "\n")
    cfg = C.Config(task="finetune").replace(data={"data": (str(f),), "val_fraction": 0.2})
    data = build_lm_data(cfg, tok, 32)
    assert (len(data.train), len(data.val)) == (8, 2)
    assert data.counts["bad"] == 1 and data.counts["unknown"] == 1
    assert data.prompts and data.prompts[0][0].startswith("Q")
    with pytest.raises(C.ConfigError, match="not a JSON object"):
        build_lm_data(cfg.replace(data={"on_bad_record": "fail"}), tok, 32)


def test_cli_lists_every_problem_and_exits_2(tmp_path, capsys):
    from memfit.cli import main
    code = main(["finetune", "--data", str(tmp_path / "nope.jsonl"), "--lora-r", "0", "--output-dir",
                 str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert code == 2
    assert "--model is required" in err and "nope.jsonl: no such file" in err and "--lora-r" in err
    code = main(["classify", "--model", str(tmp_path / "missing"), "--data", "bbc", "--output-dir",
                 str(tmp_path / "run2")])
    assert code == 2 and "missing: no such file or folder" in capsys.readouterr().err


def test_a_hub_looking_name_that_is_no_path_suggests_hf(tmp_path, monkeypatch):
    """`--data roneneldan/TinyStories` is no file here: the problem says how to name a hub dataset, for
    fine-tuning (formats.expand_paths) and pretraining (sources.resolve_sources) alike."""
    from memfit.data.formats import expand_paths
    from memfit.data.sources import resolve_sources
    monkeypatch.chdir(tmp_path)
    _, problems = expand_paths(["roneneldan/TinyStories", "nowhere.jsonl", "sub/x.jsonl"])
    assert problems[0].endswith("; did you mean hf:roneneldan/TinyStories? (a Hugging Face dataset is "
                                "--data hf:ID)")
    assert not any("hf:" in p for p in problems[1:])          # file names get no hub hint
    problems = resolve_sources(("roneneldan/TinyStories",), C.DataConfig()).problems
    assert problems and "did you mean hf:roneneldan/TinyStories?" in problems[0]
