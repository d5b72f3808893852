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
