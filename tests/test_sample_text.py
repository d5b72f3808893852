"""Samples are readable text: drawn (temperature 0.8, top-k 40), not greedy, without touching the training
RNG, the same text for the same weights and step, and printed as text rather than a Python repr."""
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from memfit.train.evaluate import generate_text
from memfit.train.finish import as_text
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
    assert as_text("a\n\n\n\n\nb\n\n\n") == "a\n\n          b"
    assert as_text("\n\n\n") == "(empty: the model produced only whitespace)"
    assert "\\n" not in as_text("x\ny")


@pytest.mark.slow    # a LoRA fine-tune in-process (~8 s on 2 shared cores)
def test_finetune_samples_are_stored_and_printed_as_text(tmp_path):
    """A real LoRA fine-tune's held-out completions: '[i] <completion>' as text in memfit.log and history.jsonl
    (they were Python reprs: quotes and \\n escapes). Every held-out prompt is 'Q:'; before training the
    completion is the base model's (LoRA starts as the identity), at step 1 the saved adapter's."""
    import json

    from peft import PeftModel

    from memfit.cli import main
    from memfit.jobs.finetune import complete
    folder = tiny_lm_folder(tmp_path / "lm")
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"prompt": "Q:", "completion": f" A{i}."}) + "\n" for i in range(12)))
    run = tmp_path / "run"
    rc = main(["finetune", "--model", str(folder), "--data", str(data), "--lora", "--batch-size", "4",
               "--max-steps", "1", "--eval-every", "0", "--sample-tokens", "6", "--precision", "fp32",
               "--output-dir", str(run), "--quiet"])
    assert rc == 0
    model, tok = AutoModelForCausalLM.from_pretrained(folder), AutoTokenizer.from_pretrained(folder)

    def samples(m) -> str:
        return f"[0] {complete(m, tok, 'Q:', 6, 'cpu')}"     # one held-out example (val 1 of 12)
    log = (run / "memfit.log").read_text()
    assert "before training: val_loss=" in log and f"\n  sample: {as_text(samples(model))}\n" in log, log
    assert "held-out prompt: Q:\n  reference: A" in log, log
    tuned = PeftModel.from_pretrained(model, str(run / "final_model")).eval()
    final = [json.loads(x) for x in (run / "history.jsonl").read_text().splitlines() if '"sample"' in x][-1]
    assert final["sample"] == samples(tuned), final
    assert "step 1: val_loss=" in log and f"\n  sample: {as_text(samples(tuned))}\n" in log, log
