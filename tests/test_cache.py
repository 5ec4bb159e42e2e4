"""One cache root for everything bertopt builds, one variable for it, the old one deprecated."""

from __future__ import annotations

import warnings

import pytest

from bertopt import cache
from bertopt.train.pretrain import default_cache_dir


@pytest.fixture
def clean_env(monkeypatch, tmp_path):
    for name in (cache.VARIABLE, cache.DEPRECATED_VARIABLE):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.setattr(cache, "_warned", False)
    return monkeypatch


def test_one_root_one_folder_per_kind(clean_env, tmp_path):
    assert cache.cache_dir("pretrain") == tmp_path / "xdg" / "bertopt" / "pretrain"
    assert cache.cache_dir("native") == tmp_path / "xdg" / "bertopt" / "native"
    clean_env.setenv(cache.VARIABLE, str(tmp_path / "mine"))
    assert default_cache_dir() == tmp_path / "mine" / "pretrain"  # the trainer's --cache-dir default
    assert cache.cache_dir("native") == tmp_path / "mine" / "native"
    with pytest.raises(ValueError, match="cache kind must be one of pretrain, native"):
        cache.cache_dir("models")


def test_the_old_variable_still_works_with_one_warning(clean_env, tmp_path):
    clean_env.setenv(cache.DEPRECATED_VARIABLE, str(tmp_path / "old"))
    with pytest.warns(FutureWarning, match="BERTOPT_CACHE is deprecated.*set BERTOPT_CACHE_DIR"):
        assert default_cache_dir() == tmp_path / "old"  # the pretrain folder itself, as before
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once per process: a second call is silent
        assert cache.cache_dir("pretrain") == tmp_path / "old"
        assert cache.cache_dir("native") == tmp_path / "xdg" / "bertopt" / "native"  # never read it
