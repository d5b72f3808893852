"""final_model/ loads with stock transformers and reproduces the trained model exactly."""

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast

from memfit.export import export_hf
from memfit.models import build_causal_lm, make_shape


def _tokenizer():
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(["to be or not to be, that is the question"] * 20, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>",
                                   bos_token="<|endoftext|>", pad_token="<|endoftext|>")


def test_exported_model_loads_with_stock_transformers_and_logits_match(tmp_path):
    tok = _tokenizer()
    torch.manual_seed(0)
    for arch in ("gpt2", "llama"):
        model = build_causal_lm(make_shape(arch, 2, 64, len(tok), 32), eos_token_id=tok.eos_token_id)
        with torch.no_grad():  # make the weights differ from any fresh init
            for p in model.parameters():
                p.add_(torch.randn_like(p) * 0.01)
        out = export_hf(model, tok, tmp_path / arch)
        assert (out / "model.safetensors").exists() and (out / "config.json").exists()
        loaded = AutoModelForCausalLM.from_pretrained(out)
        tok2 = AutoTokenizer.from_pretrained(out)
        ids = tok2("to be or not", return_tensors="pt")["input_ids"]
        assert ids.tolist() == tok("to be or not", return_tensors="pt")["input_ids"].tolist()
        model.eval()
        with torch.no_grad():
            assert torch.equal(model(ids).logits, loaded(ids).logits)
        gen = loaded.generate(ids, max_new_tokens=5, do_sample=False, pad_token_id=tok2.eos_token_id)
        assert gen.shape[1] == ids.shape[1] + 5
        assert not list(tmp_path.glob(f"{arch}.tmp-*"))  # the temporary folder was renamed away


def _run_with_checkpoint(run, max_shard_bytes):
    """A run directory as `memfit train` leaves it (config.yaml, tokenizer/, checkpoints/step-1) whose
    model weights are split into shards of at most `max_shard_bytes`."""
    from memfit import config as C
    from memfit.ckpt.checkpointer import Checkpointer
    from memfit.ckpt.state import StateRegistry
    from memfit.jobs.pretrain import build_pretrain_model

    tok = _tokenizer()
    cfg = C.Config().replace(model={"arch": "gpt2", "target_params": 150_000}, data={"seq_len": 32})
    run.mkdir()
    C.save_yaml(cfg, run / "config.yaml")
    tok.save_pretrained(run / "tokenizer")
    torch.manual_seed(0)
    model, _ = build_pretrain_model(cfg, len(tok), tok)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    reg = StateRegistry()
    reg.register("model", model)
    ck = Checkpointer(run, cfg, reg, model, log=lambda _m: None, tokenizer=tok)
    ck.max_shard_bytes = max_shard_bytes
    return model, tok, ck.save(1, kind="light")


def test_memfit_export_of_a_sharded_checkpoint_loads_with_stock_transformers(tmp_path):
    from memfit.cli import main
    model, _, step = _run_with_checkpoint(tmp_path / "run", 64 << 10)
    shards = sorted(p.name for p in step.glob("model-*-of-*.safetensors"))
    assert len(shards) >= 2 and not (step / "model.safetensors").exists()
    assert main(["export", "--run", str(tmp_path / "run"), "--out", str(tmp_path / "out")]) == 0
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    ids = AutoTokenizer.from_pretrained(tmp_path / "out")("to be or not", return_tensors="pt")["input_ids"]
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(ids).logits, loaded(ids).logits)     # every shard's tensors arrived


def test_memfit_export_refuses_a_corrupted_checkpoint_file_and_writes_nothing(tmp_path, capsys):
    from memfit.cli import main
    *_, step = _run_with_checkpoint(tmp_path / "run", 64 << 10)
    shard = sorted(step.glob("model-*-of-*.safetensors"))[1]
    data = bytearray(shard.read_bytes())
    data[-5] ^= 0xFF                        # one flipped byte in a tensor: same size, other sha256
    shard.write_bytes(bytes(data))
    capsys.readouterr()
    assert main(["export", "--run", str(tmp_path / "run"), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert shard.name in err and "damaged" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]        # no out/, no out.tmp-*
