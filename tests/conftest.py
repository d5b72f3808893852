"""Shared test set-up: offline always, small deterministic models."""

import atexit
import os
import shutil
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("MPLBACKEND", "Agg")

# The dequantized-GGUF cache (finetune/load.py) of this test session: a temporary folder, never the user's
# ~/.cache; spawned memfit processes inherit it. SmolLM2 is dequantized into it once per session.
if "MEMFIT_CACHE" not in os.environ:
    _cache = tempfile.mkdtemp(prefix="memfit-test-cache-")
    os.environ["MEMFIT_CACHE"] = _cache
    atexit.register(shutil.rmtree, _cache, True)

import pytest  # noqa: E402


@pytest.fixture
def tiny_gpt2():
    """A 2-layer, 64-wide GPT-2 with a 256-token vocabulary, built from config (seeded)."""
    import torch

    from memfit.models import build_causal_lm, make_shape
    torch.manual_seed(0)
    return build_causal_lm(make_shape("gpt2", 2, 64, 256, 64))


@pytest.fixture(scope="session")
def corpus(tmp_path_factory) -> Path:
    """train.txt / val.txt of the chaos harness (bench/chaos.py), made once and only read (a module with
    other text defines its own `corpus`)."""
    return _chaos().make_corpus(tmp_path_factory.mktemp("corpus"))


@pytest.fixture(scope="session")
def finished_run(tmp_path_factory, corpus) -> Path:
    """A real 4-step `memfit train` run: checkpoints step-2 and step-4 (both full), an evaluation at 4.
    Made once for the session; tests read it or damage a copy (run_helpers.copy_run), never the run."""
    H = _chaos()
    d = tmp_path_factory.mktemp("runs") / "done"
    rc = H.run(H.train_args(d, corpus, 4, save_every=2, eval_every=4, log_every=1), d.parent / "done.out")
    assert rc == 0, (d.parent / "done.out").read_text()[-3000:]
    return d


def _chaos():
    """The harness shared with bench/chaos.py (bench may not import tests, so tests import bench)."""
    bench = str(Path(__file__).resolve().parents[1] / "bench")
    if bench not in sys.path:
        sys.path.insert(0, bench)
    import chaos
    return chaos
