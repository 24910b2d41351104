"""paths: environment-driven roots and fix-it errors."""
from __future__ import annotations

import pytest

from cddpm_lib import paths


def test_roots_follow_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("CDDPM_DATA_ROOT", str(tmp_path / "d"))
    monkeypatch.setenv("CDDPM_RUNS_ROOT", str(tmp_path / "r"))
    assert paths.data_root() == (tmp_path / "d").resolve()
    assert paths.preprocessed_manifest_path("synthetic", "smoke") == (
        tmp_path / "d" / "synthetic" / "smoke" / "preprocessed_manifest.csv").resolve()
    assert paths.checkpoint_dir("quick", "cddpm-ssl_t2", 3) == (
        tmp_path / "r" / "quick" / "checkpoints" / "cddpm-ssl_t2" / "fold3").resolve()


def test_defaults_inside_repo(monkeypatch):
    monkeypatch.delenv("CDDPM_DATA_ROOT", raising=False)
    assert paths.data_root() == paths.repo_root() / "data"
    assert (paths.repo_root() / "cddpm_lib").is_dir()


def test_unknown_profile_and_source():
    with pytest.raises(ValueError, match="unknown profile 'fast'"):
        paths.run_dir("fast")
    with pytest.raises(ValueError, match="unknown data source"):
        paths.source_dir("web", "smoke")


def test_real_data_root_errors(tmp_path, monkeypatch):
    monkeypatch.delenv("CDDPM_REAL_DATA", raising=False)
    with pytest.raises(paths.SetupError, match="CDDPM_REAL_DATA is not set"):
        paths.real_data_root()
    monkeypatch.setenv("CDDPM_REAL_DATA", str(tmp_path / "missing"))
    with pytest.raises(paths.SetupError, match="is not a directory"):
        paths.real_data_root()
    monkeypatch.setenv("CDDPM_REAL_DATA", str(tmp_path))
    assert paths.real_data_root() == tmp_path.resolve()
