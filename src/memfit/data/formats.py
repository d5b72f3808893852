"""Fine-tuning records -> token ids + labels, with loss only on what the model should learn to write.

Formats, recognised per record by its fields:
  chat               {"messages": [{"role": ..., "content": ...}, ...]}  rendered with the tokenizer's chat
                     template; loss on the assistant turns (their end-of-turn marker included)
  alpaca             {"instruction", "input" (optional), "output"}   rendered as a one-turn chat when the
                     tokenizer has a chat template (an instruct model's own format), else the Alpaca template
  prompt_completion  {"prompt", "completion"}                        concatenated as given, loss on the
                     completion
  text               {--text-field: ...} or a .txt document          loss on everything; long documents are
                     cut into --max-seq-len chunks (nothing is dropped)
`labels` is -100 on prompt tokens unless --train-on-prompt. The response ends with the EOS token so the
model learns to stop.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any, Iterator

ALPACA = ("Below is an instruction that describes a task{ctx}. Write a response that appropriately "
          "completes the request.\n\n### Instruction:\n{instruction}\n\n{input_block}### Response:\n")
CHATML = ("{% for m in messages %}{{'<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n'}}"
          "{% endfor %}{% if add_generation_prompt %}{{'<|im_start|>assistant\n'}}{% endif %}")
DATA_SUFFIXES = (".jsonl", ".json", ".csv", ".txt")


def detect_format(record: dict[str, Any], text_field: str = "text") -> str | None:
    if isinstance(record.get("messages"), list):
        return "chat"
    if "instruction" in record and "output" in record:
        return "alpaca"
    if "prompt" in record and "completion" in record:
        return "prompt_completion"
    if isinstance(record.get(text_field), str) or isinstance(record.get("_text"), str):
        return "text"
    return None


def format_problem(record: Any, text_field: str) -> str:
    keys = ", ".join(map(str, record)) if isinstance(record, dict) else type(record).__name__
    return (f"unrecognised record (fields: {keys}); expected messages, instruction/input/output, "
            f"prompt/completion, or {text_field!r}")


def _alpaca_messages(record: dict[str, Any]) -> list[dict[str, str]]:
    user = str(record["instruction"])
    if record.get("input"):
        user += "\n\n" + str(record["input"])
    return [{"role": "user", "content": user}]


def prompt_text(record: dict[str, Any], tokenizer, fmt: str) -> str:
    """The text a model is given at inference for this record (everything before the response)."""
    if fmt == "chat":
        msgs = record["messages"]
        last = max((i for i, m in enumerate(msgs) if m.get("role") == "assistant"), default=len(msgs))
        return _render(tokenizer, msgs[:last], generation_prompt=True)
    if fmt == "alpaca":
        if tokenizer.chat_template:
            return _render(tokenizer, _alpaca_messages(record), generation_prompt=True)
        has_input = bool(record.get("input"))
        return ALPACA.format(ctx=", paired with an input that provides further context" if has_input else "",
                             instruction=record["instruction"],
                             input_block=f"### Input:\n{record['input']}\n\n" if has_input else "")
    if fmt == "prompt_completion":
        return str(record["prompt"])
    return ""


def response_text(record: dict[str, Any], fmt: str) -> str:
    if fmt == "chat":
        answers = [str(m["content"]) for m in record["messages"] if m.get("role") == "assistant"]
        return answers[-1] if answers else ""
    return str(record.get("output" if fmt == "alpaca" else "completion", ""))


def _render(tokenizer, messages, generation_prompt: bool = False) -> str:
    template = tokenizer.chat_template or CHATML
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt,
                                         chat_template=template)


def encode_record(record: dict[str, Any], tokenizer, fmt: str, max_len: int, train_on_prompt: bool = False,
                  text_field: str = "text") -> list[dict[str, list[int]]]:
    """One record -> examples {"input_ids", "labels"} (several for a long text document, else one).
    An example whose response was cut off entirely by truncation is returned anyway; the caller counts it."""
    eos = tokenizer.eos_token_id
    if fmt == "text":
        ids = tokenizer(record["_text"] if "_text" in record else record[text_field])["input_ids"] + [eos]
        return [{"input_ids": ids[i:i + max_len], "labels": ids[i:i + max_len]}
                for i in range(0, len(ids) - 1, max_len) if len(ids[i:i + max_len]) > 1]
    if fmt == "chat" or (fmt == "alpaca" and tokenizer.chat_template):
        messages = record["messages"] if fmt == "chat" else \
            _alpaca_messages(record) + [{"role": "assistant", "content": str(record["output"])}]
        ids, mask = _encode_chat(messages, tokenizer)
    else:
        prompt = tokenizer(prompt_text(record, tokenizer, fmt))["input_ids"]
        resp = tokenizer(response_text(record, fmt), add_special_tokens=False)["input_ids"] + [eos]
        ids, mask = prompt + resp, [False] * len(prompt) + [True] * len(resp)
    ids, mask = ids[:max_len], mask[:max_len]
    labels = [t if (m or train_on_prompt) else -100 for t, m in zip(ids, mask)]
    return [{"input_ids": ids, "labels": labels}]


def _encode_chat(messages: list[dict[str, str]], tokenizer) -> tuple[list[int], list[bool]]:
    """Token ids of the rendered conversation and, per token, whether it belongs to an assistant turn.

    Assistant spans are character ranges: from the end of the conversation rendered up to that turn with
    the generation prompt, to the end of it rendered through the turn (so the end-of-turn marker is
    learned). Templates where that prefix property fails fall back to finding the content in the text."""
    text = _render(tokenizer, messages)
    spans, cursor = [], 0
    for i, m in enumerate(messages):
        if m.get("role") != "assistant":
            continue
        before = _render(tokenizer, messages[:i], generation_prompt=True) if i else ""
        through = _render(tokenizer, messages[:i + 1])
        if text.startswith(through) and through.startswith(before) and len(before) >= cursor:
            spans.append((len(before), len(through)))
            cursor = len(through)
        else:
            at = text.find(str(m["content"]), cursor)
            if at >= 0:
                end = at + len(str(m["content"]))
                if tokenizer.eos_token and text.startswith(tokenizer.eos_token, end):
                    end += len(tokenizer.eos_token)
                spans.append((at, end))
                cursor = end
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    mask = [any(s <= a < e for s, e in spans) for a, _ in enc["offset_mapping"]]
    return list(enc["input_ids"]), mask


# ---------------------------------------------------------------- reading records

def hub_hint(spec: str) -> str:
    """'; did you mean hf:owner/name?' for a --data that is no path but reads like a hub dataset id
    (owner/name, no file suffix), else ''."""
    import re
    if re.fullmatch(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*", spec) and Path(spec).suffix not in DATA_SUFFIXES:
        return f"; did you mean hf:{spec}? (a Hugging Face dataset is --data hf:ID)"
    return ""


def expand_paths(specs: tuple[str, ...] | list[str]) -> tuple[list[Path], list[str]]:
    """Files named by --data (files, globs, folders, the embedded corpora shakespeare / kjv / bbc as plain
    text); problems for names that match nothing."""
    files, problems = [], []
    for spec in specs:
        p = Path(spec).expanduser()
        if not p.exists() and spec in ("shakespeare", "kjv", "bbc"):     # the embedded corpora, as text
            from memfit.data.corpora import CorpusMissing, corpus_files
            try:
                files += corpus_files(spec)
            except CorpusMissing as e:
                problems.append(f"--data {spec}: {e}")
            continue
        if p.is_dir():
            found = sorted(q for q in p.rglob("*") if q.is_file() and q.suffix in DATA_SUFFIXES)
        elif any(c in spec for c in "*?["):
            found = sorted(q for q in Path().glob(spec) if q.is_file())
        else:
            found = [p] if p.is_file() else []
        if not found:
            problems.append(f"--data {spec}: no such file (or no {'/'.join(DATA_SUFFIXES)} files in it)"
                            + hub_hint(spec))
        bad = [q.name for q in found if q.suffix not in DATA_SUFFIXES]
        if bad:
            problems.append(f"--data {spec}: unsupported file type {bad[0]} (use {', '.join(DATA_SUFFIXES)})")
        files += found
    return files, problems


def read_records(files: list[Path], on_bad_record: str = "skip") -> Iterator[tuple[str, Any]]:
    """(where, record) for every record: JSONL lines, JSON list items, CSV rows, .txt files (one document).
    A bad record raises ValueError naming file:line when on_bad_record == 'fail', else yields
    (where, None)."""
    for f in files:
        if f.suffix == ".txt":
            yield str(f), {"_text": f.read_text(errors="replace")}
        elif f.suffix == ".csv":
            with open(f, newline="", errors="replace") as fh:
                for i, row in enumerate(csv.DictReader(fh), start=2):
                    yield f"{f}:{i}", row
        elif f.suffix == ".json":
            try:
                items = json.loads(f.read_text(errors="replace"))
            except ValueError as e:
                raise ValueError(f"{f}: not valid JSON ({e})") from None
            for i, item in enumerate(items if isinstance(items, list) else [items]):
                yield f"{f}[{i}]", item
        else:
            with open(f, errors="replace") as fh:
                for i, line in enumerate(fh, start=1):
                    if not line.strip():
                        continue
                    try:
                        yield f"{f}:{i}", json.loads(line)
                    except ValueError as e:
                        if on_bad_record == "fail":
                            raise ValueError(f"{f}:{i}: not a JSON object ({e})") from None
                        yield f"{f}:{i}", None
