"""memfit.atomic.swap_in, the one folder swap (checkpoints, best/, final_model/, adapters, the GGUF cache,
memfit.fit's export): an exception or a real SIGKILL after any of its steps never leaves the target
missing; it holds the old folder or the new one, whole (the two-rename fallback may leave the old one
under `.old-<name>-<pid>`, which `recover` and every start-up clean-up rename back)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from memfit import atomic

SRC = Path(__file__).resolve().parents[1] / "src"
STEPS = {True: ["synced", "exchanged"], False: ["synced", "old-aside", "renamed"]}
CASES = [(ex, s) for ex in (True, False) for s in STEPS[ex]]


class Stop(Exception):
    pass


def _folder(path: Path, tag: str) -> Path:
    path.mkdir()
    for i in range(3):
        (path / f"f{i}.txt").write_text(f"{tag}-{i}")
    return path


def _content(path: Path) -> str | None:
    """'old' / 'new' when `path` holds one folder whole, else None."""
    texts = sorted(p.read_text() for p in path.iterdir()) if path.is_dir() else []
    for tag in ("old", "new"):
        if texts == [f"{tag}-{i}" for i in range(3)]:
            return tag
    return None


@pytest.mark.parametrize("exchange,step", CASES)
def test_exception_after_any_step_leaves_the_target_whole(tmp_path, monkeypatch, exchange, step):
    monkeypatch.setattr(atomic, "EXCHANGE", exchange)
    final, new = _folder(tmp_path / "final_model", "old"), _folder(tmp_path / "final_model.tmp-1", "new")

    def between(name):
        if name == step:
            raise Stop(name)
    with pytest.raises(Stop):
        atomic.swap_in(new, final, between=between)
    done = step in ("exchanged", "renamed")
    if not (exchange or done or step == "synced"):
        assert not final.exists() and _content(atomic.old_name(final)) == "old"   # mid-swap: old set aside
        assert atomic.recover(final)
    assert _content(final) == ("new" if done else "old")
    # the next swap finishes whatever was left and installs a complete folder
    atomic.swap_in(_folder(tmp_path / "again", "new"), final)
    assert _content(final) == "new"
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith((".old-", ".del-"))) == []


def test_swap_without_an_old_folder_and_the_old_one_goes_only_after(tmp_path):
    final = tmp_path / "best"
    atomic.swap_in(_folder(tmp_path / "n1", "old"), final)
    seen = []
    atomic.swap_in(_folder(tmp_path / "n2", "new"), final, between=lambda s: seen.append(_content(final)))
    assert seen[0] == "old" and seen[-1] == "new" and None not in seen
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best"]


KILL = """
import os, signal, sys
sys.path.insert(0, {src!r})
from pathlib import Path
from memfit import atomic
atomic.EXCHANGE = {exchange!r}
def between(name):
    if name == {step!r}:
        os.kill(os.getpid(), signal.SIGKILL)
atomic.swap_in(Path({new!r}), Path({final!r}), between=between)
print("not killed")
"""


@pytest.mark.parametrize("exchange,step", CASES)
def test_sigkill_after_any_step_never_leaves_neither(tmp_path, exchange, step):
    final, new = _folder(tmp_path / "final_model", "old"), _folder(tmp_path / "final_model.tmp-1", "new")
    code = KILL.format(src=str(SRC), exchange=exchange, step=step, new=str(new), final=str(final))
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                          check=False)
    assert proc.returncode == -signal.SIGKILL, proc.stdout + proc.stderr
    olds = list(tmp_path.glob(".old-final_model-*"))
    assert final.exists() or (len(olds) == 1 and _content(olds[0]) == "old")
    atomic.recover(final)
    assert _content(final) == ("new" if step in ("exchanged", "renamed") else "old")


def test_checkpointer_start_restores_final_model_and_best_cut_mid_swap(tmp_path):
    sys.path.insert(0, str(Path(__file__).parent))
    from test_checkpoint import Rig
    run = tmp_path / "run"
    Rig(run)
    for name in ("final_model", "best"):      # what a kill between the fallback's two renames leaves
        _folder(run / f".old-{name}-{os.getpid() + 1}", "old")
    Rig(run)
    assert _content(run / "final_model") == "old" and _content(run / "best") == "old"
    assert not list(run.glob(".old-*"))
