"""Issue 18: a stop that lands on a step already saved (SIGTERM right after a scheduled save).

The stop event must still be in the run's record (history.jsonl, training_history.json) and survive the
`--resume auto` that continues the run, and the process must exit 75. Timing is made deterministic by
the test hook: MEMFIT_TEST_KILL_DURING_SAVE=1:saved sends this process SIGTERM once its first save is
complete, so the stop always lands on that saved step (a real process, a real signal).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
import chaos as H  # noqa: E402  (the harness shared with bench/chaos.py)

STEPS, SAVE = 8, 4


def _rows(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "history.jsonl").read_text().splitlines()]


def test_sigterm_right_after_a_save_records_the_stop_and_exits_75(tmp_path):
    corpus = H.make_corpus(tmp_path / "corpus")
    run = tmp_path / "run"
    args = H.train_args(run, corpus, STEPS, save_every=SAVE, eval_every=0)
    marker = tmp_path / "signalled.json"
    env = H.child_env({H.KILL_ENV: "1:saved", H.MARKER_ENV: str(marker)})
    rc = H.run(args, tmp_path / "p1.out", env)
    out = (tmp_path / "p1.out").read_text()
    assert json.loads(marker.read_text())["step"] == SAVE         # the signal came right after step-4's save
    assert rc == 75, out[-3000:]
    assert "stopped resumably at step 4" in out or "stopped at step 4" in out, out[-3000:]
    stop = {"kind": "stop", "step": SAVE, "reason": "received SIGTERM"}
    assert stop in _rows(run)
    summary = json.loads((run / "training_history.json").read_text())
    assert stop in summary["events"]
    assert summary["summary"]["exit_code"] == 75 and summary["summary"]["step"] == SAVE
    assert H.checkpoint_steps(run) == [SAVE]

    # The resumed run keeps the stop event (it is part of the run's story) and finishes.
    rc2 = H.run([*args, "--resume", "auto"], tmp_path / "p2.out")
    assert rc2 == 0, (tmp_path / "p2.out").read_text()[-3000:]
    rows = _rows(run)
    assert stop in rows and rows.index(stop) < next(i for i, r in enumerate(rows) if r["kind"] == "resume")
    assert stop in json.loads((run / "training_history.json").read_text())["events"]
    assert [r["step"] for r in rows if r["kind"] == "train"][-1] == STEPS
