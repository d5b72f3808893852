"""--mirror-to: background copies with the same atomic rules and keep-K; resume finds them."""

from __future__ import annotations

import json
import shutil

import torch
from test_checkpoint import Rig, weights

from memfit.ckpt.io import dir_bytes


def test_mirror_copies_rotates_and_resume_uses_it(tmp_path):
    mirror = tmp_path / "drive" / "run1"
    r = Rig(tmp_path / "run", keep_last=2, mirror_to=str(mirror))
    for s in range(1, 5):
        r.step()
        r.ck.save(s)
        if s == 2:
            r.ck.update_best(s, {"val_loss": 1.0})
    r.ck.wait()
    mck = mirror / "checkpoints"
    assert sorted(p.name for p in mck.iterdir()) == ["latest", "step-3", "step-4"]
    assert (mck / "latest").read_text().strip() == "step-4"
    assert json.loads((mirror / "best" / "metrics.json").read_text())["step"] == 2
    assert dir_bytes(mck / "step-4") == dir_bytes(tmp_path / "run" / "checkpoints" / "step-4")
    assert not r.ck.mirror.errors
    expected = weights(r.model)

    shutil.rmtree(tmp_path / "run")                        # the machine's own disk is gone
    b = Rig(tmp_path / "run", seed=7, keep_last=2, mirror_to=str(mirror))
    assert b.ck.resume("auto") == 4
    assert str(mck / "step-4") in b.text()
    got = weights(b.model)
    assert all(torch.equal(got[k], expected[k]) for k in expected)


def test_resume_prefers_newest_across_run_dir_and_mirror(tmp_path):
    mirror = tmp_path / "m"
    r = Rig(tmp_path / "run", keep_last=3, mirror_to=str(mirror))
    for s in (1, 2):
        r.ck.save(s)
    r.ck.wait()
    # damage the local newest: the mirror's good copy of the same step is used
    p = tmp_path / "run" / "checkpoints" / "step-2" / "model.safetensors"
    p.write_bytes(p.read_bytes()[:-3])
    b = Rig(tmp_path / "run", keep_last=3, mirror_to=str(mirror))
    assert b.ck.resume("auto") == 2
    assert "truncated" in b.text() and str(mirror / "checkpoints" / "step-2") in b.text()
    # the corrupt local copy is set aside, not left where the next resume would try it again
    assert any(p.name.startswith("corrupt-step-2") for p in (tmp_path / "run" / "checkpoints").iterdir())


def test_fsspec_memory_mirror(tmp_path):
    import fsspec
    url = f"memory://memfit-test-{tmp_path.name}"
    r = Rig(tmp_path / "run", keep_last=2, mirror_to=url)
    for s in (1, 2, 3):
        r.step()
        r.ck.save(s)
    r.ck.wait()
    assert not r.ck.mirror.errors
    fs, root = fsspec.core.url_to_fs(url)
    names = sorted(p.rsplit("/", 1)[-1] for p in fs.ls(f"{root}/checkpoints", detail=False))
    assert names == ["latest", "step-2", "step-3"]
    expected = weights(r.model)
    shutil.rmtree(tmp_path / "run")
    b = Rig(tmp_path / "run", seed=3, keep_last=2, mirror_to=url)
    assert b.ck.resume("auto") == 3
    assert (tmp_path / "run" / "checkpoints" / "step-3" / "manifest.json").exists()   # fetched back
    assert all(torch.equal(weights(b.model)[k], expected[k]) for k in expected)


def test_fsspec_mirror_replacing_best_keeps_the_old_copy_until_the_new_one_is_in_place(tmp_path):
    import fsspec
    url = f"memory://memfit-test-{tmp_path.name}"
    r = Rig(tmp_path / "run", keep_last=2, mirror_to=url)
    r.step()
    r.ck.save(1)
    r.ck.update_best(1, {"val_loss": 2.0})
    r.ck.wait()
    fs, root = fsspec.core.url_to_fs(url)
    assert fs.exists(f"{root}/best/manifest.json")
    # what an upload cut between its two moves leaves: the previous best/ and step-1/ under .old-*
    fs.mv(f"{root}/best", f"{root}/.old-best-999", recursive=True)
    fs.mv(f"{root}/checkpoints/step-1", f"{root}/checkpoints/.old-step-1-999", recursive=True)
    b = Rig(tmp_path / "run2", keep_last=2, mirror_to=url)
    assert fs.exists(f"{root}/best/manifest.json") and fs.exists(f"{root}/checkpoints/step-1/manifest.json")
    assert not fs.exists(f"{root}/.old-best-999") and "restored" in b.text()
    r.step()
    r.ck.update_best(2, {"val_loss": 1.0})      # a second best/ replaces the first through .old-best-<pid>
    r.ck.wait()
    assert not r.ck.mirror.errors
    assert json.loads(fs.cat_file(f"{root}/best/metrics.json"))["step"] == 2
    assert not [p for p in fs.ls(root, detail=False) if p.rsplit("/", 1)[-1].startswith(".old-")]
