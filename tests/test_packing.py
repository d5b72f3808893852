"""SFT packing: per example, a packed batch gives the loss and logits of that example run alone (GPT-2,
Llama, LoRA via peft); a packing that lets tokens attend across examples fails the same comparison;
the packed stream resumes bit-exactly mid-epoch."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from memfit.data.packing import PackedBatches, first_fit, packing_works
from memfit.models.loss import causal_lm_loss

VOCAB = 97


def gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel
    return GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=VOCAB, n_positions=64,
                                      bos_token_id=0, eos_token_id=0))


def llama():
    from transformers import LlamaConfig, LlamaForCausalLM
    return LlamaForCausalLM(LlamaConfig(num_hidden_layers=2, hidden_size=32, num_attention_heads=4,
                                        num_key_value_heads=2, intermediate_size=64, vocab_size=VOCAB,
                                        max_position_embeddings=64, bos_token_id=0, eos_token_id=0,
                                        pad_token_id=0))


def llama_lora():
    from memfit.models.lora import apply_lora
    model = apply_lora(llama(), 4, 8, 0.0)
    for name, p in model.named_parameters():
        if "lora_B" in name:        # B starts at zero: give the adapters a say in the logits
            torch.nn.init.normal_(p, std=0.5)
    return model


def examples(n=12, seed=0):
    """Prompt (labels -100) + response, lengths 2..19."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        p, r = int(rng.integers(0, 8)), int(rng.integers(2, 13))   # p == 0: loss on every token
        ids = rng.integers(1, VOCAB, p + r).tolist()
        out.append({"input_ids": ids, "labels": [-100] * p + ids[p:]})
    return out


def alone(model, ex):
    ids = torch.tensor([ex["input_ids"]])
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": torch.tensor([ex["labels"]])}
    with torch.no_grad():
        loss, n = causal_lm_loss(model, batch)
        return model(input_ids=ids).logits[0], float(loss), int(n)


def compare(model, exs, batch, placed, kwargs):
    """Per example of the packed batch: (logits allclose, loss equal) against the example alone."""
    with torch.no_grad():
        logits = model(**kwargs).logits
    results = []
    for r, row in enumerate(placed):
        at = 0
        for i in row:
            ex, n = exs[i], len(exs[i]["input_ids"])
            want, want_loss, want_n = alone(model, ex)
            got = logits[r, at:at + n]
            lab = batch["labels"][r, at + 1:at + n]
            got_loss = F.cross_entropy(got[:-1].float(), lab, reduction="sum", ignore_index=-100)
            assert int((lab != -100).sum()) == want_n      # the same tokens carry the loss
            results.append(torch.allclose(got, want, atol=1e-5, rtol=1e-4)
                           and abs(float(got_loss) - want_loss) <= 1e-4 * max(1.0, abs(want_loss)))
            at += n
    return results


@pytest.mark.parametrize("make", [gpt2, llama, llama_lora], ids=["gpt2", "llama", "llama-lora"])
def test_packed_example_equals_example_alone(make):
    torch.manual_seed(0)
    model = make().eval()
    exs = examples()
    pb = PackedBatches(exs, rows=2, pad_id=0, seq_len=40, shuffle=False)
    placed, _ = first_fit(pb.lengths, pb.order(0), 0, 2, 40)
    assert max(len(r) for r in placed) >= 3                  # really several examples per row
    batch = pb.collate_rows(placed)
    from memfit.models.loss import lm_inputs
    assert all(compare(model, exs, batch, placed, lm_inputs(batch)))
    # The whole packed batch's loss is the sum of the examples' own losses.
    with torch.no_grad():
        total, count = causal_lm_loss(model, batch)
    parts = [alone(model, exs[i]) for row in placed for i in row]
    assert int(count) == sum(p[2] for p in parts)
    assert float(total) == pytest.approx(sum(p[1] for p in parts), rel=1e-5)
    # The same rows with plain causal attention (tokens see the examples before them) must fail.
    leaky = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    assert not all(compare(model, exs, batch, placed, leaky))
    assert packing_works(model, VOCAB)


def test_packing_probe_rejects_a_model_that_ignores_positions():
    class Leaky(torch.nn.Module):      # a causal LM whose attention spans the whole row (no position_ids)
        def __init__(self):
            super().__init__()
            self.inner = llama()

        def forward(self, input_ids, position_ids=None, use_cache=None, attention_mask=None):
            return self.inner(input_ids=input_ids, use_cache=False)

    torch.manual_seed(0)
    assert packing_works(llama(), VOCAB) and not packing_works(Leaky(), VOCAB)


def test_first_fit_fills_rows_in_order_and_stops_at_the_first_misfit():
    lengths = np.array([6, 5, 4, 3, 9, 2])
    placed, pos = first_fit(lengths, np.arange(6), 0, rows=2, seq_len=10)
    assert placed == [[0, 2], [1, 3]] and pos == 4          # 9 fits neither row: the next batch starts there


def test_packed_stream_resumes_bit_exactly_mid_epoch():
    exs = examples(200, seed=1)
    a = PackedBatches(exs, rows=3, pad_id=0, seq_len=48, seed=7)
    it = iter(a)
    for _ in range(len(a) // 2 + 1):                           # mid-epoch
        next(it)
    state = a.state_dict()
    want = [next(it) for _ in range(16)]                       # crosses into the next epoch
    b = PackedBatches(exs, rows=3, pad_id=0, seq_len=48, seed=7)
    b.load_state_dict(state)
    got = iter(b)
    for w in want:
        g = next(got)
        assert g.keys() == w.keys() and all(torch.equal(g[k], w[k]) for k in w)
    per_epoch = a.epoch_layout(0)
    assert sum(per_epoch) == 200 and len(per_epoch) == len(a)  # every example once per epoch
