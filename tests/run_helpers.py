"""Helpers shared by tests (the fixtures `corpus` and `finished_run` are in conftest.py): a copy of a
finished run to damage, a snapshot to prove that a refused command changed nothing, a tiny pretrained
model folder (causal LM, classifier) to fine-tune."""

from __future__ import annotations

import contextlib
import hashlib
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path


def snapshot(d: Path) -> dict[str, str]:
    """sha256 of every file under d (and the empty directories), by relative path."""
    return {str(p.relative_to(d)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "<dir>"
            for p in sorted(d.rglob("*"))}


@contextlib.contextmanager
def tmpfs(path: Path, options: str) -> Iterator[Path]:
    """A real tmpfs mounted at `path` with mount `options` ("size=5m", "ro,size=1m"), unmounted afterwards.
    Mounting needs root: the test is skipped without it, and fails in CI, where it must run."""
    import pytest
    path.mkdir(exist_ok=True)
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True,
                       text=True, check=False)
    if r.returncode != 0:
        if os.environ.get("CI"):
            pytest.fail(f"cannot mount a tmpfs ({options}) in CI: {r.stderr.strip()}")
        pytest.skip(f"cannot mount a tmpfs ({options}) here (needs root): {r.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", str(path)], check=True)


def copy_run(src: Path, dst: Path) -> Path:
    """A copy with modes and times kept (cp -a), so a test can damage it without touching the original."""
    subprocess.run(["cp", "-a", str(src), str(dst)], check=True)
    return dst


def tiny_lm_folder(path: Path, dropout: float = 0.1) -> Path:
    """A 1-layer, 32-wide GPT-2 with the offline GPT-2 tokenizer saved as a stock HF folder (seeded);
    dropout 0: a run on N ranks can equal one on 1 rank (each rank draws its own dropout masks)."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    from memfit.data.tokenizer import gpt2_tokenizer
    tok = gpt2_tokenizer()
    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_positions=64, n_embd=32, n_layer=1, n_head=2,
                               resid_pdrop=dropout, embd_pdrop=dropout, attn_pdrop=dropout)
                    ).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def tiny_bert_folder(path: Path) -> Path:
    """A 1-layer, 32-wide BERT classifier with the offline MiniLM tokenizer as a stock HF folder (seeded)."""
    import torch
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    from memfit.models.load import local_folder, resolve_source
    tok = AutoTokenizer.from_pretrained(local_folder(resolve_source("minilm")))
    torch.manual_seed(0)
    BertForSequenceClassification(BertConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=1,
                                             num_attention_heads=2, intermediate_size=64)).save_pretrained(path)
    tok.save_pretrained(path)
    return path
