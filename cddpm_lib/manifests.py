"""Manifests: which scans belong to which data set, split and fold (schema in docs/ARCHITECTURE.md), how to
load, select, write and validate them, and the published splits of the paper (§4.1, Table 1).

A manifest is a CSV with one row per subject per split/fold. Relative paths resolve against a root: the
manifest's own folder for generated manifests, ``$CDDPM_REAL_DATA`` for the shipped ones in ``data_manifests/``.
:func:`validate_manifest` opens every referenced file and reports *all* problems at once.
The real data sets' file layout, the published IXI folds, their leaks and the leak-free alternative live in
:mod:`cddpm_lib.realdata`; the data stage (notebook 00) is :func:`prepare_data` at the end.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import ClassVar, Iterable, Literal

import nibabel as nib
import numpy as np
import pandas as pd

from . import paths
from .datasets import DATASETS, HEALTHY, WEIGHTING_OF
from .synthetic import SyntheticConfig
from .volumes import save_dataframe, save_json, squeeze_to_3d

COLUMNS = ("dataset", "subject_id", "split", "fold", "t1", "t2", "brain_mask", "seg", "site", "skull_stripped",
           "healthy")
PATH_COLUMNS = ("t1", "t2", "brain_mask", "seg")
SPLITS = ("train", "val", "test")
MAX_FOLD = 4  # IXI: 5-fold cross-validation (paper §4.4)


class ManifestError(ValueError):
    """A manifest does not follow the schema, or its files are missing or broken; the message lists every
    problem with its row, column/file and what is wrong."""


@dataclasses.dataclass(frozen=True)
class Problem:
    """One problem of a manifest: ``rows`` (0-based DataFrame rows; CSV line = row + 2), the file's column and
    path (empty for row-level problems) and what is wrong."""

    rows: tuple[int, ...]
    dataset: str
    subject_id: str
    column: str
    path: str
    message: str

    def __str__(self) -> str:
        where = f"{self.column} {self.path}: " if self.path else (f"{self.column}: " if self.column else "")
        if not self.rows:
            return f"{where}{self.message}"
        rows = ",".join(map(str, self.rows[:5])) + ("…" if len(self.rows) > 5 else "")
        lines = ",".join(str(r + 2) for r in self.rows[:5]) + ("…" if len(self.rows) > 5 else "")
        return f"row {rows} (CSV line {lines}; {self.dataset}/{self.subject_id}) {where}{self.message}"


def _format(problems: list, title: str, limit: int = 200) -> str:
    lines = [f"{title}: {len(problems)} problem(s)"] + [f"  - {p}" for p in problems[:limit]]
    if len(problems) > limit:
        lines.append(f"  … and {len(problems) - limit} more (validate_manifest() returns the full list)")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------ the schema


def schema_problems(df: pd.DataFrame) -> list[str]:
    """Every violation of the manifest schema, as ``row i (CSV line i+2), column c: ...`` strings."""
    missing = [c for c in COLUMNS if c not in df.columns]
    if missing:
        return [f"missing column(s) {missing}; a manifest has the columns {list(COLUMNS)}"]
    out = []
    where = lambda i, c: f"row {i} (CSV line {i + 2}), column {c!r}"  # noqa: E731
    for i, r in enumerate(df.itertuples(index=False)):
        if r.dataset not in DATASETS:
            out.append(f"{where(i, 'dataset')}: {r.dataset!r} is not one of {list(DATASETS)}")
        if not str(r.subject_id).strip():
            out.append(f"{where(i, 'subject_id')}: empty")
        if r.split not in SPLITS:
            out.append(f"{where(i, 'split')}: {r.split!r} is not one of {list(SPLITS)}")
        try:
            fold = int(str(r.fold))
        except ValueError:
            out.append(f"{where(i, 'fold')}: {r.fold!r} is not an integer")
            fold = None
        if fold is not None and r.dataset in DATASETS and r.split in SPLITS:
            cv = r.dataset == HEALTHY and r.split in ("train", "val")
            if cv and not 0 <= fold <= MAX_FOLD:
                out.append(f"{where(i, 'fold')}: IXI {r.split} rows need a fold in 0-{MAX_FOLD}, got {fold}")
            if not cv and fold != -1:
                out.append(f"{where(i, 'fold')}: must be -1 outside IXI train/val, got {fold}")
        for c in ("skull_stripped", "healthy"):
            if str(getattr(r, c)) not in ("0", "1"):
                out.append(f"{where(i, c)}: must be 0 or 1, got {getattr(r, c)!r}")
        if not (r.t1 or r.t2):
            out.append(f"row {i} (CSV line {i + 2}): neither t1 nor t2 is given")
    dup = df.duplicated(["dataset", "subject_id", "split", "fold"], keep=False)
    for i in np.flatnonzero(dup.to_numpy()):
        out.append(f"row {i} (CSV line {i + 2}): duplicate of another row with the same dataset/subject/split/fold")
    return out


def check_schema(df: pd.DataFrame, where: str = "manifest") -> pd.DataFrame:
    """Raise :class:`ManifestError` listing every schema violation; return ``df`` with ``fold``/flags as int."""
    problems = schema_problems(df)
    if problems:
        raise ManifestError(_format(problems, f"{where} does not follow the manifest schema"))
    df = df.copy()
    for c in ("fold", "skull_stripped", "healthy"):
        df[c] = df[c].astype(str).astype(int)
    return df


def _read_csv(path: Path) -> pd.DataFrame:
    if path.is_dir():
        raise ValueError(f"manifest {path} is a folder; pass the manifest's CSV file")
    if not path.is_file():
        raise FileNotFoundError(f"manifest {path} does not exist")
    try:
        df = pd.read_csv(path, dtype=str, keep_default_na=False)
    except (pd.errors.EmptyDataError, pd.errors.ParserError, UnicodeDecodeError) as exc:
        raise ValueError(f"manifest {path} is not a readable CSV file: {exc}") from None
    if df.empty:
        raise ValueError(f"manifest {path} has a header but no rows")
    return df


def default_root(path: str | os.PathLike) -> Path:
    """Root of a manifest's relative paths: ``$CDDPM_REAL_DATA`` for ``data_manifests/``, else its folder."""
    path = Path(path).resolve()
    if path.parent == paths.manifests_dir().resolve():
        return paths.real_data_root()
    return path.parent


def resolve_paths(df: pd.DataFrame, root: str | os.PathLike) -> pd.DataFrame:
    """Relative paths -> absolute (against ``root``); absolute and empty ones stay."""
    df = df.copy()
    root = Path(root)
    for c in PATH_COLUMNS:
        df[c] = [str(root / p) if p and not os.path.isabs(p) else p for p in df[c]]
    return df


def load_manifest(path: str | os.PathLike, root: str | os.PathLike | None = None) -> pd.DataFrame:
    """Read and schema-check a manifest; paths come back absolute (resolved against ``root``, see
    :func:`default_root`). ``fold``, ``skull_stripped``, ``healthy`` are ints, everything else str."""
    path = Path(path)
    df = check_schema(_read_csv(path), str(path))
    return resolve_paths(df, root if root is not None else default_root(path))


def select(df: pd.DataFrame, dataset: str | Iterable[str] | None = None, split: str | Iterable[str] | None = None,
           fold: int | None = None) -> pd.DataFrame:
    """Rows of the given data set(s)/split(s); ``fold`` keeps that fold's IXI train/val rows plus the fold-free
    (``-1``) rows, e.g. ``select(df, "IXI", "train", fold=0)``."""
    keep = pd.Series(True, index=df.index)
    if dataset is not None:
        keep &= df["dataset"].isin([dataset] if isinstance(dataset, str) else list(dataset))
    if split is not None:
        keep &= df["split"].isin([split] if isinstance(split, str) else list(split))
    if fold is not None:
        keep &= df["fold"].astype(int).isin([int(fold), -1])
    return df[keep].reset_index(drop=True)


def write_manifest(df: pd.DataFrame, path: str | os.PathLike, root: str | os.PathLike | None = None) -> Path:
    """Schema-check and write ``df`` (columns in schema order) atomically. With ``root``, absolute paths under
    it are written relative to it (a generated manifest: ``root`` = its folder, see :func:`default_root`)."""
    df = df.astype({c: str for c in COLUMNS if c in df.columns}).reset_index(drop=True)
    df = check_schema(df, str(path))[list(COLUMNS)]
    if root is not None:
        root = Path(root).resolve()
        for c in PATH_COLUMNS:
            df[c] = [os.path.relpath(p, root) if p and os.path.isabs(p) and Path(p).resolve().is_relative_to(root)
                     else p for p in df[c]]
    return save_dataframe(df, path)


# ------------------------------------------------------------------------------------------------ validation


def inspect_file(path: str, column: str) -> tuple[tuple | None, np.ndarray | None, list[str]]:
    """Open one file: ``(shape, affine, problems)``. Images must be 3D, finite and not all zero; ``brain_mask``
    binary and non-empty; ``seg`` non-negative integer labels (0 = healthy)."""
    if not os.path.isfile(path):
        return None, None, ["file does not exist"]
    try:
        img = nib.load(path)
        data = np.asarray(img.dataobj)
    except Exception as exc:  # nibabel raises many types for corrupt files
        return None, None, [f"cannot be read as NIfTI ({type(exc).__name__}: {exc})"]
    data = squeeze_to_3d(data)
    if data.ndim != 3:
        return data.shape, None, [f"expected a 3D volume, got shape {data.shape}"]
    problems = []
    if not np.isfinite(data).all():
        problems.append(f"{int((~np.isfinite(data)).sum())} non-finite (NaN/inf) voxels")
    elif column == "brain_mask":
        if not data.any():
            problems.append("empty mask (no voxel > 0)")
        elif len(values := np.unique(data)) > 2 or values.min() != 0:
            # 0/1 or 0/255: the pipeline reads a mask as "> 0"
            problems.append(f"brain mask is not binary (0 and one positive value), values {values[:6].tolist()}")
    elif column == "seg":
        if (data < 0).any() or not np.array_equal(data, np.round(data)):
            problems.append("segmentation is not non-negative integer labels")
    elif not data.any():
        problems.append("image is all zero")
    return data.shape, np.asarray(img.affine, float), problems


def validate_manifest(manifest: pd.DataFrame | str | os.PathLike, root: str | os.PathLike | None = None, *,
                      n_jobs: int = 4, atol_mm: float = 1e-3) -> list[Problem]:
    """Every problem of a manifest at once (empty list: all good).

    Checks the schema, that each referenced file exists, loads, is 3D and finite, that masks are non-empty,
    that each row has the weighting its data set is evaluated on (T2: BraTS21/MSLUB, T1: ATLAS/WMH) and
    unhealthy rows a segmentation, and that ``brain_mask``/``seg`` share shape and affine (``atol_mm``) with
    every image of the row. A file shared by several rows (IXI folds) is opened once.
    """
    if not isinstance(manifest, pd.DataFrame):
        path = Path(manifest)
        raw = _read_csv(path)
        errors = schema_problems(raw)
        if errors:
            return [Problem((), "", "", "", str(path), e) for e in errors]
        manifest = load_manifest(path, root)
    elif root is not None:
        manifest = resolve_paths(manifest, root)
    df = manifest.reset_index(drop=True)
    problems = [Problem((), "", "", "", "", e) for e in schema_problems(df.astype({c: str for c in df.columns}))]
    files = {(c, p): [] for c in PATH_COLUMNS for p in df[c] if p}
    for i, r in df.iterrows():
        for c in PATH_COLUMNS:
            if r[c]:
                files[(c, r[c])].append(i)
    with ThreadPoolExecutor(max(1, n_jobs)) as pool:
        info = dict(zip(files, pool.map(lambda key: inspect_file(key[1], key[0]), files)))
    for (c, p), rows in files.items():
        r = df.loc[rows[0]]
        problems += [Problem(tuple(rows), r["dataset"], r["subject_id"], c, p, m) for m in info[(c, p)][2]]
    for i, r in df.iterrows():
        needed = WEIGHTING_OF.get(r["dataset"])
        if needed and not r[needed]:
            problems.append(Problem((i,), r["dataset"], r["subject_id"], needed, "",
                                    f"{r['dataset']} is evaluated on {needed.upper()} but no {needed} file is given"))
        if str(r["healthy"]) == "0" and not r["seg"]:
            problems.append(Problem((i,), r["dataset"], r["subject_id"], "seg", "", "unhealthy row without seg"))
        for c in ("brain_mask", "seg"):
            for w in ("t1", "t2"):
                if r[c] and r[w] and info[(c, r[c])][1] is not None and info[(w, r[w])][1] is not None:
                    (s1, a1), (s2, a2) = info[(c, r[c])][:2], info[(w, r[w])][:2]
                    if s1 != s2 or not np.allclose(a1, a2, atol=atol_mm):
                        problems.append(Problem((i,), r["dataset"], r["subject_id"], c, r[c],
                                                f"grid differs from {w} ({s1} vs {s2}, affines "
                                                f"{'equal' if np.allclose(a1, a2, atol=atol_mm) else 'differ'})"))
    return problems


def check_manifest(manifest: pd.DataFrame | str | os.PathLike, root: str | os.PathLike | None = None,
                   **kw) -> pd.DataFrame:
    """:func:`validate_manifest`, raising :class:`ManifestError` with every problem; returns the manifest."""
    problems = validate_manifest(manifest, root, **kw)
    if problems:
        raise ManifestError(_format(problems, f"manifest {manifest if not isinstance(manifest, pd.DataFrame) else ''}"
                                    .strip()))
    if isinstance(manifest, pd.DataFrame):
        return manifest if root is None else resolve_paths(manifest, root)
    return load_manifest(manifest, root)


def summarize(df: pd.DataFrame) -> pd.DataFrame:
    """Subjects per data set and split (IXI train/val: per fold, as ``train`` ``f0``…), for display."""
    key = df["split"].where(df["fold"].astype(int) < 0, df["split"] + " f" + df["fold"].astype(str))
    table = df.assign(part=key).groupby(["dataset", "part"])["subject_id"].nunique().unstack(fill_value=0)
    order = [d for d in DATASETS if d in table.index]
    return table.loc[order]


# ------------------------------------------------------------------------------------------- the data stage


@dataclasses.dataclass(frozen=True)
class DataConfig(SyntheticConfig):
    """Stage ``data`` (notebook ``00_data.ipynb``): the generator's settings (:class:`SyntheticConfig`, used
    with ``source='synthetic'``) plus where the data come from. ``split`` picks the shipped manifest for real
    data (``official``: the authors' published folds, leaks included; ``leak_free``); a generated cohort is
    leak-free by construction. ``allow_missing``: continue with the real subjects present."""

    profile: str = "paper"
    source: Literal["synthetic", "real"] = "real"
    split: Literal["official", "leak_free"] = "official"
    allow_missing: bool = False
    #: ``from_namespace``: parameters left at ``None`` take ``profiles/data.yaml``'s value (``papermill -p profile
    #: smoke`` alone gives the smoke cohort)
    STAGE: ClassVar[str] = "data"

    def validate(self) -> None:
        super().validate()
        paths.check_profile(self.profile)



def data_info_path(source: str, profile: str) -> Path:
    """``data_info.json`` beside the raw manifest: which manifest a run used, and counts."""
    return paths.source_dir(source, profile) / "data_info.json"


def read_data_info(source: str, profile: str) -> dict:
    """What the data stage recorded (source, manifest name and file, counts); fix-it error when absent."""
    path = data_info_path(source, profile)
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist; run the data stage (notebooks/00_data.ipynb) first")
    return json.loads(path.read_text())


def prepare_data(cfg: DataConfig, *, progress: bool = True) -> pd.DataFrame:
    """Run the data stage: write ``raw_manifest.csv`` for ``cfg.source`` and validate every file.

    ``synthetic``: generate (or resume) the cohort; ``real``: resolve ``data_manifests/<split>.csv`` against
    ``$CDDPM_REAL_DATA``. Raises :class:`ManifestError` listing every problem. Writes ``data_info.json``
    (source, manifest name, its SHA-256, subjects per data set and split) and returns the manifest (absolute).
    """
    from . import realdata, synthetic

    out = paths.source_dir(cfg.source, cfg.profile)
    missing = pd.DataFrame(columns=["dataset", "subject_id", "column", "path"])
    emptied: list[str] = []
    if cfg.source == "synthetic":
        df, name, origin = synthetic.generate_cohort(cfg, out, progress=progress), "generated", "generated"
    else:
        df, missing = realdata.build_real_manifest(cfg.split, allow_missing=cfg.allow_missing)
        emptied = realdata.emptied_parts(realdata.load_shipped(cfg.split), df)
        write_manifest(df, paths.raw_manifest_path(cfg.source, cfg.profile))
        name, origin = cfg.split, str(realdata.shipped_manifest_path(cfg.split).relative_to(paths.repo_root()))
    check_manifest(df, n_jobs=max(2, cfg.n_jobs))
    manifest_file = paths.raw_manifest_path(cfg.source, cfg.profile)
    info = {"source": cfg.source, "profile": cfg.profile, "manifest": name, "manifest_origin": origin,
            "raw_manifest": str(manifest_file),
            "raw_manifest_sha256": hashlib.sha256(manifest_file.read_bytes()).hexdigest(),
            "subjects": df.groupby("dataset")["subject_id"].nunique().to_dict(),
            "rows": {f"{d}/{s}": int(n) for (d, s), n in df.groupby(["dataset", "split"]).size().items()},
            "folds": sorted(int(f) for f in df["fold"].unique() if int(f) >= 0),
            "missing_subjects": int(missing[["dataset", "subject_id"]].drop_duplicates().shape[0]),
            "empty_parts": emptied,  # (data set, split, fold) left without any subject by allow_missing
            "leaks": int(len(realdata.find_leaks(df)))}
    if cfg.source == "synthetic":
        info.update(seed=cfg.seed, voxel_mm=cfg.voxel_mm, generator=cfg.signature())
    save_json(info, data_info_path(cfg.source, cfg.profile))
    return df
