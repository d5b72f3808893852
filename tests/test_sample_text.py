"""Samples are readable text: drawn (temperature 0.8, top-k 40), not greedy, without touching the training
RNG, the same text for the same weights and step, and printed as text rather than a Python repr."""
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from memfit.train.evaluate import generate_text
from memfit.train.finish import _as_text
from run_helpers import tiny_lm_folder


def test_eval_sample_is_drawn_reproducibly_and_leaves_the_training_rng_alone(tmp_path):
    folder = tiny_lm_folder(tmp_path / "m")
    model, tok = AutoModelForCausalLM.from_pretrained(folder), AutoTokenizer.from_pretrained(folder)
    torch.manual_seed(123)
    before = torch.random.get_rng_state()
    a = generate_text(model, tok, "ROMEO:", 20, step=10)
    assert torch.equal(torch.random.get_rng_state(), before)      # training RNG untouched: resume exact
    assert generate_text(model, tok, "ROMEO:", 20, step=10) == a   # same weights, same step: same text
    greedy = tok.decode(model.generate(**tok("ROMEO:", return_tensors="pt"), max_new_tokens=20,
                                       do_sample=False, repetition_penalty=1.3,
                                       pad_token_id=tok.eos_token_id)[0, 2:], skip_special_tokens=True)
    assert a != greedy                                             # drawn, not the greedy continuation
    assert generate_text(model, tok, "ROMEO:", 20, step=11) != a   # a new draw at every evaluation


def test_sample_is_printed_as_text_with_blank_runs_folded():
    assert _as_text("a\n\n\n\n\nb\n\n\n") == "a\n\n          b"
    assert _as_text("\n\n\n") == "(empty: the model produced only whitespace)"
    assert "\\n" not in _as_text("x\ny")
