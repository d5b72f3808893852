"""memfit.fit's contract as a user meets it: help() shows the real signature and docstring, and a
configuration that cannot apply to the module is refused (ConfigError, every problem listed) before
anything is written to the run directory."""

import inspect
import pydoc

import pytest
import torch

import memfit
from memfit import config as C


def test_help_shows_real_signature_and_docstring():
    sig = inspect.signature(memfit.fit)
    assert list(sig.parameters)[:6] == ["model", "train_data", "loss_fn", "eval_fn", "config", "output_dir"]
    assert "on_step" in sig.parameters and sig.parameters["on_step"].kind is inspect.Parameter.KEYWORD_ONLY
    text = pydoc.render_doc(memfit.fit, renderer=pydoc.plaintext)
    assert "fit(model" in text and "Train `model` in place" in text
    from memfit.api import fit
    assert memfit.fit is fit


def test_gradient_checkpointing_on_plain_module_refused_before_writing(tmp_path):
    out = tmp_path / "run"
    data = [{"x": torch.randn(4), "y": torch.tensor(1)} for _ in range(8)]

    def loss_fn(model, batch):
        return torch.nn.functional.cross_entropy(model(batch["x"]), batch["y"], reduction="sum"), 8

    with pytest.raises(C.ConfigError) as e:
        memfit.fit(torch.nn.Linear(4, 2), data, loss_fn=loss_fn, output_dir=out, max_steps=2,
                   gradient_checkpointing=True, lr=-1.0, quiet=True)
    problems = e.value.problems
    # Both problems in one message: the bad lr and the checkpointing that cannot apply to a Linear.
    assert any("--lr must be > 0" in p for p in problems)
    assert any("gradient_checkpointing=True needs a model with gradient_checkpointing_enable()" in p
               and "Linear" in p for p in problems)
    assert str(e.value).startswith("memfit: 2 problem(s) with this configuration:")
    assert not out.exists()          # no config.yaml, no run directory at all
    # Alone, too: a ConfigError (not a raw ValueError from deep in the job), still nothing written.
    with pytest.raises(C.ConfigError) as e:
        memfit.fit(torch.nn.Linear(4, 2), data, loss_fn=loss_fn, output_dir=out, max_steps=2,
                   gradient_checkpointing=True, quiet=True)
    assert len(e.value.problems) == 1 and not out.exists()
