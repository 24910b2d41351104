"""Where the kit reads and writes: one place, driven by environment variables.

Layout (see README "Outputs")::

    $CDDPM_DATA_ROOT (default ./data)
        <source>/<profile>/raw/<dataset>/<subject>/{t1,t2,brain_mask,seg}.nii.gz
        <source>/<profile>/raw_manifest.csv
        <source>/<profile>/preprocessed/<dataset>/<subject>/{t1,t2,brain_mask,seg}.nii.gz
        <source>/<profile>/preprocessed_manifest.csv
    $CDDPM_RUNS_ROOT (default ./runs)
        <profile>/notebooks/  checkpoints/<model_id>/fold<k>/  recon/  results/  figures/  report/

``<source>`` is ``synthetic`` (the embedded cohort) or ``real`` (scans under ``$CDDPM_REAL_DATA``).
"""
from __future__ import annotations

import os
from pathlib import Path

PROFILES = ("smoke", "quick", "paper")
SOURCES = ("synthetic", "real")


class SetupError(RuntimeError):
    """The environment is not set up the way the kit needs; the message says how to fix it."""


def repo_root() -> Path:
    """The repository root (the folder holding ``notebooks/`` and ``data_manifests/``)."""
    return Path(__file__).resolve().parent.parent


def _root(var: str, default: str) -> Path:
    value = os.environ.get(var)
    return Path(value).expanduser().resolve() if value else (repo_root() / default)


def data_root() -> Path:
    """Root of generated and preprocessed data (``$CDDPM_DATA_ROOT``, default ``<repo>/data``)."""
    return _root("CDDPM_DATA_ROOT", "data")


def runs_root() -> Path:
    """Root of run outputs (``$CDDPM_RUNS_ROOT``, default ``<repo>/runs``)."""
    return _root("CDDPM_RUNS_ROOT", "runs")


def check_profile(profile: str) -> str:
    if profile not in PROFILES:
        raise ValueError(f"unknown profile {profile!r}: choose one of {', '.join(PROFILES)}")
    return profile


def check_source(source: str) -> str:
    if source not in SOURCES:
        raise ValueError(f"unknown data source {source!r}: choose one of {', '.join(SOURCES)}")
    return source


def source_dir(source: str, profile: str) -> Path:
    """``$CDDPM_DATA_ROOT/<source>/<profile>``: everything one data source produces for one profile."""
    return data_root() / check_source(source) / check_profile(profile)


def raw_manifest_path(source: str, profile: str) -> Path:
    return source_dir(source, profile) / "raw_manifest.csv"


def preprocessed_dir(source: str, profile: str) -> Path:
    return source_dir(source, profile) / "preprocessed"


def preprocessed_manifest_path(source: str, profile: str) -> Path:
    return source_dir(source, profile) / "preprocessed_manifest.csv"


def run_dir(profile: str) -> Path:
    """``$CDDPM_RUNS_ROOT/<profile>``."""
    return runs_root() / check_profile(profile)


def checkpoint_dir(profile: str, model_id: str, fold: int) -> Path:
    """``runs/<profile>/checkpoints/<model_id>/fold<k>`` (``model_id`` e.g. ``cddpm-ssl_t2``)."""
    return run_dir(profile) / "checkpoints" / model_id / f"fold{int(fold)}"


def recon_dir(profile: str, model_id: str, fold: int, variant: str, dataset: str) -> Path:
    """Saved inputs/reconstructions/residuals: ``runs/<profile>/recon/<model_id>/fold<k>/<variant>/<dataset>``."""
    return run_dir(profile) / "recon" / model_id / f"fold{int(fold)}" / variant / dataset


def run_relative(path: str | Path, profile: str) -> str:
    """``path`` relative to ``runs/<profile>`` when it lies inside (as the result tables store reconstruction
    files, so that a run folder moved or copied elsewhere still finds them), else the path as given."""
    path = Path(path)
    try:
        return path.resolve().relative_to(run_dir(profile).resolve()).as_posix()
    except ValueError:
        return str(path)


def from_run_relative(path: str | Path, profile: str) -> Path:
    """Inverse of :func:`run_relative`: a relative path is taken under ``runs/<profile>`` of this setting of
    ``$CDDPM_RUNS_ROOT``; an absolute one (tables of earlier versions) stays as it is."""
    path = Path(path)
    return path if path.is_absolute() else run_dir(profile) / path


def results_dir(profile: str) -> Path:
    return run_dir(profile) / "results"


def figures_dir(profile: str) -> Path:
    return run_dir(profile) / "figures"


def report_dir(profile: str) -> Path:
    return run_dir(profile) / "report"


def notebooks_out_dir(profile: str) -> Path:
    return run_dir(profile) / "notebooks"


def real_data_root() -> Path:
    """Root of the user's downloaded real data sets (``$CDDPM_REAL_DATA``).

    Raises :class:`SetupError` with instructions when the variable is unset or points nowhere.
    """
    value = os.environ.get("CDDPM_REAL_DATA")
    if not value:
        raise SetupError(
            "CDDPM_REAL_DATA is not set. Point it at the folder that holds IXI/, BraTS21/, MSLUB/, "
            "ATLAS/ and WMH/ laid out as described in data_manifests/README.md, e.g. "
            "`export CDDPM_REAL_DATA=/data/uad`."
        )
    root = Path(value).expanduser()
    if not root.is_dir():
        raise SetupError(
            f"CDDPM_REAL_DATA={value!r} is not a directory. Create it or fix the variable; the expected "
            "layout is in data_manifests/README.md."
        )
    return root.resolve()


def manifests_dir() -> Path:
    """The repository's ``data_manifests/`` folder (official and leak-free splits)."""
    return repo_root() / "data_manifests"
