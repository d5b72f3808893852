"""Where the dequantized-GGUF cache lives (finetune/load.py): MEMFIT_CACHE, then XDG_CACHE_HOME, then ~/.cache."""

from pathlib import Path

from memfit.models.load import cache_root


def test_cache_root_overrides(monkeypatch, tmp_path):
    for var in ("MEMFIT_CACHE", "MEMFIT_CACHE_DIR", "XDG_CACHE_HOME"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache_root() == tmp_path / "home" / ".cache" / "memfit"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_root() == tmp_path / "xdg" / "memfit"
    monkeypatch.setenv("MEMFIT_CACHE_DIR", str(tmp_path / "old-name"))
    assert cache_root() == tmp_path / "old-name"
    monkeypatch.setenv("MEMFIT_CACHE", str(tmp_path / "mine"))
    assert cache_root() == Path(tmp_path / "mine")
