"""Issue 10 item 1: generation never runs past the model's context (gpt2 and llama, any --seq-len >= 8: the
eval sample and `memfit generate`), and an unexpected exception leaves an emergency checkpoint when the
state is consistent, the traceback in memfit.log and one readable line on the console (exit 1)."""

import pytest
import torch
from test_api_fit import new_model, ns
from test_train_e2e import small_corpus

import memfit
from memfit.cli import main
from memfit.models import build_causal_lm, make_shape


def _positions_seen(model, arch: str) -> list[int]:
    """Record the largest position index each forward uses (GPT-2's position table; Llama's rotary)."""
    seen: list[int] = []
    if arch == "gpt2":
        model.transformer.wpe.register_forward_pre_hook(lambda m, args: seen.append(int(args[0].max())))
    else:
        model.model.rotary_emb.register_forward_pre_hook(
            lambda m, args, kw: seen.append(int((args[1] if len(args) > 1 else kw["position_ids"]).max())),
            with_kwargs=True)
    return seen


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
@pytest.mark.parametrize("ctx", [8, 32])
@pytest.mark.parametrize("prompt_len", [3, "ctx", "ctx+5"])
def test_generation_stays_inside_the_context(arch, ctx, prompt_len):
    from memfit.train.evaluate import generate_in_context
    torch.manual_seed(0)
    model = build_causal_lm(make_shape(arch, 2, 32, 64, ctx)).eval()
    seen = _positions_seen(model, arch)
    n = {3: 3, "ctx": ctx, "ctx+5": ctx + 5}[prompt_len]
    prompt = torch.randint(0, 64, (1, n), generator=torch.Generator().manual_seed(1))
    new, note = generate_in_context(model, prompt, 3 * ctx, do_sample=False, pad_token_id=0)
    assert new.shape == (1, 3 * ctx)                 # every asked-for token, by sliding the window
    assert max(seen) == ctx - 1                       # the last position, never past it
    assert "context" in note
    # the first window is exactly stock greedy generation of the (fitting) prompt
    if n == 3:
        ref = model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), do_sample=False,
                             max_new_tokens=ctx - 3, pad_token_id=0)[:, 3:]
        assert torch.equal(new[:, :ctx - 3], ref)


@pytest.mark.parametrize("arch,seq_len", [("gpt2", 32), ("llama", 8)])
def test_short_context_training_and_generate(tmp_path, capsys, arch, seq_len):
    """The issue's command (--seq-len 32 with the default 40-token eval sample), a llama at --seq-len 8,
    then `memfit generate` asking for more tokens than the context holds."""
    import json
    data = small_corpus(tmp_path / "data")
    run = tmp_path / "run"
    assert main(["train", "--data", str(data), "--arch", arch, "--target-params", "150k", "--vocab-size", "512",
                 "--seq-len", str(seq_len), "--batch-size", "8", "--max-steps", "4", "--eval-every", "2",
                 "--eval-batches", "1", "--quiet", "--output-dir", str(run)]) == 0
    rows = [json.loads(x) for x in (run / "history.jsonl").read_text().splitlines()]
    samples = [r["sample"] for r in rows if r.get("kind") == "eval"]
    assert len(samples) == 2 and all(isinstance(s, str) for s in samples)
    capsys.readouterr()
    assert main(["generate", "--model", str(run / "final_model"), "--prompt", "ROMEO:",
                 "--max-new-tokens", "60"]) == 0
    out = capsys.readouterr()
    assert out.out.startswith("ROMEO:") and f"context ({seq_len} tokens)" in out.err


def test_unexpected_exception_in_the_cli_saves_and_prints_one_line(tmp_path, monkeypatch, capsys):
    """A failure while evaluating (the state is consistent): step-2 is saved although --save-every is 100,
    the traceback is in memfit.log, the console has one line, exit 1; --resume auto continues from it."""
    import memfit.train.evaluate as ev
    data = small_corpus(tmp_path / "data")
    run = tmp_path / "run"
    args = ["train", "--data", str(data), "--target-params", "150k", "--vocab-size", "512", "--seq-len", "16",
            "--batch-size", "4", "--max-steps", "4", "--eval-every", "2", "--eval-batches", "1",
            "--sample-tokens", "0", "--save-every", "100", "--quiet", "--output-dir", str(run)]

    def broken(*a, **k):
        raise RuntimeError("disk controller on fire")
    monkeypatch.setattr(ev, "evaluate_loss", broken)
    assert main(args) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("memfit: error: RuntimeError: disk controller on fire")
    assert "while evaluating at step 2" in err[0] and "step-2" in err[0] and "memfit.log" in err[0]
    log = (run / "memfit.log").read_text()
    assert "Traceback (most recent call last)" in log and "disk controller on fire" in log
    assert (run / "checkpoints" / "step-2" / "state.pt").exists()
    monkeypatch.undo()
    assert main(args + ["--resume", "auto"]) == 0
    assert "resumed at step 2" in (run / "memfit.log").read_text()


def _fit(tmp_path, name, **kw):
    model = new_model()
    opts = {**ns["OPTIONS"], "inject_oom_above_tokens": None, "eval_every": 4, "save_every": 100, **kw}
    return model, memfit.fit(model, ns["make_data"](96), loss_fn=ns["loss_fn"], output_dir=tmp_path / name,
                             **opts)


def test_fit_crash_while_evaluating_resumes_bit_identically(tmp_path):
    ref_model, ref = _fit(tmp_path, "ref", eval_fn=lambda m: {"score": 1.0})
    calls = []

    def flaky(model):
        calls.append(1)
        if len(calls) == 1:
            raise ValueError("the user's metric broke")
        return {"score": 1.0}
    with pytest.raises(ValueError, match="metric broke") as info:
        _fit(tmp_path, "cut", eval_fn=flaky)
    assert any("emergency checkpoint step-4 saved" in n for n in info.value.__notes__)
    assert (tmp_path / "cut" / "checkpoints" / "step-4" / "state.pt").exists()
    assert "Traceback" in (tmp_path / "cut" / "memfit.log").read_text()
    model, second = _fit(tmp_path, "cut", eval_fn=flaky, resume="auto")
    assert second.status == "finished" and second.step == 10
    a, b = ref_model.state_dict(), model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_fit_crash_while_computing_gradients_keeps_no_half_state(tmp_path):
    def bad_loss(model, batch):
        if bad_loss.calls == 5:       # the 3rd step's first micro-batch (2 per step)
            raise FloatingPointError("loss exploded")
        bad_loss.calls += 1
        return ns["loss_fn"](model, batch)
    bad_loss.calls = 0
    with pytest.raises(FloatingPointError) as info:
        memfit.fit(new_model(), ns["make_data"](96), loss_fn=bad_loss, output_dir=tmp_path / "run",
            **{**ns["OPTIONS"], "inject_oom_above_tokens": None, "save_every": 100})
    assert any("no emergency checkpoint" in n for n in info.value.__notes__)
    assert not list((tmp_path / "run" / "checkpoints").glob("step-*"))
