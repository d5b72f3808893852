"""history.jsonl on resume: cut back to exactly the rows that existed when the checkpoint was written."""

from __future__ import annotations

import json

from memfit.metrics import History


def _rows(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_rows_written_after_the_checkpoint_are_dropped_even_with_its_step_number(tmp_path):
    h = History(tmp_path)
    for s in (1, 2):
        h.append({"kind": "train", "step": s, "loss": 1.0 / s})
    h.append({"kind": "eval", "step": 2, "val_loss": 0.9})
    saved = h.state_dict()                                   # the checkpoint of step 2
    h.append({"kind": "oom", "step": 2, "old_micro_batch": 8, "new_micro_batch": 4})  # during step 3
    h.append({"kind": "train", "step": 3, "loss": 0.3})
    with open(tmp_path / "history.jsonl", "a") as f:
        f.write('{"kind": "train", "st')                      # a line cut by SIGKILL

    again = History(tmp_path)
    again.load_state_dict(saved)
    again.load_until(2)
    assert [r["kind"] for r in again.rows] == ["train", "train", "eval"]
    assert _rows(tmp_path / "history.jsonl") == again.rows


def test_without_a_row_count_the_step_decides_and_a_fresh_start_keeps_nothing(tmp_path):
    h = History(tmp_path)
    h.append({"kind": "oom", "step": 0, "new_micro_batch": 4})
    for s in (1, 2, 3):
        h.append({"kind": "train", "step": s, "loss": 1.0})
    light = History(tmp_path)             # a weights-only checkpoint has no history part
    light.load_until(2)
    assert [r.get("step") for r in light.rows] == [0, 1, 2]
    fresh = History(tmp_path)             # --resume auto with nothing to resume
    fresh.load_until(0)
    assert fresh.rows == [] and (tmp_path / "history.jsonl").read_text() == ""
