"""The real data sets of paper §4.1 (Table 1): their file layout under ``$CDDPM_REAL_DATA``, the published
membership of the authors' splits, the leaks of the published IXI folds, a leak-free IXI split of the same
sizes, and the raw manifest of the files a user actually has.

``data_manifests/official_splits.csv`` (columns ``dataset, split, fold, subject_id, has_t2``) is the source of
truth shipped with the kit; :func:`build_shipped_manifests` derives from it ``official.csv`` (the published
splits), ``leak_free.csv`` and ``official_leaks.csv``. Each real data set keeps its own file naming
(``data_manifests/README.md``):

* IXI: ``IXI/IXI002-Guys-0828-T1.nii.gz``, ``…-T2.nii.gz`` (the IXI-T1/IXI-T2 tarballs, extracted into one folder),
* BraTS21: ``BraTS21/BraTS2021_00000/BraTS2021_00000_{t1,t2,seg}.nii.gz`` (RSNA-ASNR-MICCAI training set),
* MSLUB: ``MSLUB/patient01/patient01_{T1W,T2W,consensus_gt}.nii.gz`` (Ljubljana, co-registered release),
* ATLAS v2: ``ATLAS/Training/R001/sub-r001s001/ses-1/anat/sub-r001s001_ses-1_space-MNI152NLin2009aSym_T1w.nii.gz``
  and ``…_label-L_desc-T1lesion_mask.nii.gz`` (BIDS),
* WMH: ``WMH/training/Utrecht/0/pre/T1.nii.gz`` + ``WMH/training/Utrecht/0/wmh.nii.gz`` (``Singapore/50``,
  ``Amsterdam/GE3T/100``): the ``pre/`` T1 shares the label's grid.
"""
from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np
import pandas as pd

from . import paths
from .datasets import DATASETS, HEALTHY
from .manifests import COLUMNS, PATH_COLUMNS, ManifestError, check_schema, resolve_paths, write_manifest
from .volumes import atomic_path, save_dataframe

REFERENCE_NAME = "official_splits.csv"
REFERENCE_COLUMNS = ("dataset", "split", "fold", "subject_id", "has_t2")
MANIFEST_NAMES = ("official", "leak_free")


def real_paths(dataset: str, subject_id: str, has_t2: bool = True) -> dict[str, str]:
    """Paths relative to ``$CDDPM_REAL_DATA`` of one subject's ``t1``/``t2``/``seg`` in its data set's layout."""
    s = subject_id
    if dataset == "IXI":
        return {"t1": f"IXI/{s}-T1.nii.gz", "t2": f"IXI/{s}-T2.nii.gz" if has_t2 else ""}
    if dataset == "BraTS21":
        return {k: f"BraTS21/{s}/{s}_{k}.nii.gz" for k in ("t1", "t2", "seg")}
    if dataset == "MSLUB":
        return {"t1": f"MSLUB/{s}/{s}_T1W.nii.gz", "t2": f"MSLUB/{s}/{s}_T2W.nii.gz",
                "seg": f"MSLUB/{s}/{s}_consensus_gt.nii.gz"}
    if dataset == "ATLAS":
        stem = f"ATLAS/Training/{s[4:8].upper()}/{s}/ses-1/anat/{s}_ses-1_space-MNI152NLin2009aSym"
        return {"t1": f"{stem}_T1w.nii.gz", "seg": f"{stem}_label-L_desc-T1lesion_mask.nii.gz"}
    if dataset == "WMH":
        site, number = s.rsplit("_", 1)
        folder = f"WMH/training/{'Amsterdam/GE3T' if site == 'GE3T' else site}/{number}"
        return {"t1": f"{folder}/pre/T1.nii.gz", "seg": f"{folder}/wmh.nii.gz"}
    raise ValueError(f"unknown data set {dataset!r}; choose one of {list(DATASETS)}")


def real_site(dataset: str, subject_id: str) -> str:
    """Scanner site / cohort from the identifier (IXI hospital, ATLAS cohort, WMH site)."""
    if dataset == "IXI":
        return subject_id.split("-")[1]
    if dataset == "ATLAS":
        return subject_id[4:8].upper()
    if dataset == "WMH":
        return subject_id.rsplit("_", 1)[0]
    return {"BraTS21": "BraTS21", "MSLUB": "Ljubljana"}[dataset]


def read_reference(path: str | os.PathLike | None = None) -> pd.DataFrame:
    """The published membership (``data_manifests/official_splits.csv`` by default), checked."""
    path = Path(path) if path is not None else paths.manifests_dir() / REFERENCE_NAME
    ref = pd.read_csv(path, dtype=str, keep_default_na=False)
    missing = [c for c in REFERENCE_COLUMNS if c not in ref.columns]
    if missing:
        raise ManifestError(f"{path}: missing column(s) {missing}; expected {list(REFERENCE_COLUMNS)}")
    bad = ref.index[~ref["dataset"].isin(DATASETS)].tolist()
    if bad:
        raise ManifestError(f"{path}: rows {bad[:10]} have unknown data sets {sorted(set(ref['dataset'][bad]))}")
    return ref


def official_manifest(reference: pd.DataFrame) -> pd.DataFrame:
    """The published splits as a manifest (paths relative to ``$CDDPM_REAL_DATA``, raw: no brain masks)."""
    rows = []
    for r in reference.itertuples(index=False):
        files = real_paths(r.dataset, r.subject_id, has_t2=r.has_t2 != "0")
        rows.append({"dataset": r.dataset, "subject_id": r.subject_id, "split": r.split,
                     "fold": int(r.fold) if r.fold != "" else -1, "t1": files.get("t1", ""),
                     "t2": files.get("t2", ""), "brain_mask": "", "seg": files.get("seg", ""),
                     "site": real_site(r.dataset, r.subject_id), "skull_stripped": int(r.dataset == "BraTS21"),
                     "healthy": int(r.dataset == HEALTHY)})
    return pd.DataFrame(rows, columns=list(COLUMNS))


def find_leaks(df: pd.DataFrame) -> pd.DataFrame:
    """Leaks of a split: a test subject also in train/val (``test_in_train_val``), a subject validated in
    several folds (``val_in_several_folds``), in train and val of one fold (``train_and_val_same_fold``) and
    repeated rows (``duplicate_row``). Returns ``dataset, subject_id, kind, detail`` (empty: leak-free)."""
    out = []
    for dataset, g in df.groupby("dataset", sort=False):
        cv = g[g["split"].isin(["train", "val"])]
        folds = cv.groupby("subject_id")["fold"].apply(lambda f: sorted({int(x) for x in f}))
        for sid in sorted(set(g.loc[g["split"] == "test", "subject_id"]) & set(cv["subject_id"])):
            out.append((dataset, sid, "test_in_train_val", f"test subject also in train/val of folds {folds[sid]}"))
        val = cv[cv["split"] == "val"].groupby("subject_id")["fold"].apply(lambda f: sorted({int(x) for x in f}))
        out += [(dataset, sid, "val_in_several_folds", f"validation subject in folds {f}")
                for sid, f in val.items() if len(f) > 1]
        both = cv.groupby(["subject_id", "fold"])["split"].nunique()
        out += [(dataset, sid, "train_and_val_same_fold", f"in train and val of fold {k}")
                for (sid, k), n in both.items() if n > 1]
        dup = g[g.duplicated(["subject_id", "split", "fold"])]
        out += [(dataset, r.subject_id, "duplicate_row", f"{r.split} fold {r.fold} repeated")
                for r in dup.itertuples()]
    return pd.DataFrame(out, columns=["dataset", "subject_id", "kind", "detail"])


def stratified_order(subjects: list[str], sites: list[str], seed: int) -> list[str]:
    """A seeded shuffle that interleaves sites in proportion, so consecutive chunks are site-balanced."""
    rng = np.random.default_rng(seed)
    perm = rng.permutation(len(subjects))
    frame = pd.DataFrame({"sid": np.asarray(subjects)[perm], "site": np.asarray(sites)[perm]})
    rank = frame.groupby("site").cumcount()
    size = frame.groupby("site")["sid"].transform("size")
    return frame.assign(key=(rank + 0.5) / size).sort_values("key", kind="stable")["sid"].tolist()


def leak_free_split(official: pd.DataFrame, seed: int = 0) -> pd.DataFrame:
    """IXI folds without leaks, same test set and validation-fold size as the published split.

    The published test subjects stay the test set; the train/val pool is every other published IXI subject
    (the 9 test subjects that also appear in the published folds are removed from it); validation fold ``k``
    is the ``k``-th chunk of a seeded, site-stratified order; fold ``k`` trains on the rest of the pool.
    Validation folds are disjoint and never meet the test set. Published: 374–377 train / 44 val per fold
    with overlaps; leak-free: 365 train / 44 val. Other data sets are copied unchanged.
    """
    ixi = official[official["dataset"] == HEALTHY]
    cv = ixi[ixi["split"].isin(["train", "val"])]
    test = set(ixi.loc[ixi["split"] == "test", "subject_id"])
    folds = sorted({int(f) for f in cv["fold"]})
    n_val = int(cv[cv["split"] == "val"].groupby("fold").size().median())
    first = cv.drop_duplicates("subject_id").set_index("subject_id")
    pool = sorted(set(first.index) - test)
    if len(folds) * n_val > len(pool):
        raise ManifestError(f"leak-free split: {len(folds)} folds x {n_val} validation subjects exceed the "
                            f"pool of {len(pool)} subjects")
    order = stratified_order(pool, [first.loc[s, "site"] for s in pool], seed)
    val_fold = {sid: k for i, k in enumerate(folds) for sid in order[i * n_val:(i + 1) * n_val]}
    rows = [{**first.loc[sid].to_dict(), "subject_id": sid, "fold": k,
             "split": "val" if val_fold.get(sid) == k else "train"} for sid in pool for k in folds]
    new_cv = pd.DataFrame(rows)[list(COLUMNS)]
    rest = official[~((official["dataset"] == HEALTHY) & official["split"].isin(["train", "val"]))]
    return pd.concat([new_cv, rest], ignore_index=True)[list(COLUMNS)]


def shipped_manifest_path(name: str) -> Path:
    """``data_manifests/<name>.csv`` for ``official`` or ``leak_free``."""
    if name not in MANIFEST_NAMES:
        raise ValueError(f"unknown manifest {name!r}; the kit ships {list(MANIFEST_NAMES)}")
    return paths.manifests_dir() / f"{name}.csv"


def build_shipped_manifests(reference_csv: str | os.PathLike, out_dir: str | os.PathLike | None = None,
                            seed: int = 0) -> dict[str, Path]:
    """Write ``official_splits.csv`` (a copy of the reference), ``official.csv``, ``leak_free.csv`` and
    ``official_leaks.csv`` into ``out_dir`` (default ``data_manifests/``); returns their paths."""
    out_dir = Path(out_dir) if out_dir is not None else paths.manifests_dir()
    ref = read_reference(reference_csv)
    official = official_manifest(ref)
    leak_free = leak_free_split(official, seed)
    if len(find_leaks(leak_free)):
        raise ManifestError("leak-free split still has leaks:\n" + find_leaks(leak_free).to_string())
    return {REFERENCE_NAME: save_bytes(Path(reference_csv).read_bytes(), out_dir / REFERENCE_NAME),
            "official": write_manifest(official, out_dir / "official.csv"),
            "leak_free": write_manifest(leak_free, out_dir / "leak_free.csv"),
            "official_leaks": save_dataframe(find_leaks(official), out_dir / "official_leaks.csv")}


def save_bytes(data: bytes, path: Path) -> Path:
    """Byte-exact atomic copy (the reference CSV is shipped as published)."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return path


def load_shipped(name: str) -> pd.DataFrame:
    """A shipped manifest with its paths still relative to ``$CDDPM_REAL_DATA`` (no variable needed)."""
    path = shipped_manifest_path(name)
    return check_schema(pd.read_csv(path, dtype=str, keep_default_na=False), str(path))


def emptied_parts(full: pd.DataFrame, kept: pd.DataFrame) -> list[str]:
    """Parts (data set, split, fold) of ``full`` with rows that keep none in ``kept``, as readable lines."""
    groups = ["dataset", "split", "fold"]
    before, after = full.groupby(groups).size(), set(kept.groupby(groups).size().index)
    return [f"{d} {sp}" + (f" fold {f}" if int(f) >= 0 else "") + f" (all {n} subjects)"
            for (d, sp, f), n in before.items() if (d, sp, f) not in after]


def build_real_manifest(name: str = "official", root: str | os.PathLike | None = None, *,
                        allow_missing: bool = True) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The raw manifest of the real data: ``data_manifests/<name>.csv`` resolved against ``root`` (default
    ``$CDDPM_REAL_DATA``, with a fix-it error when unset).

    Returns ``(manifest with absolute paths, missing)`` where ``missing`` lists ``dataset, subject_id, column,
    path`` of absent files. Subjects with an absent file are dropped when ``allow_missing``; otherwise any
    absent file raises :class:`ManifestError` with a per-data-set count and the first paths.
    """
    root = Path(root) if root is not None else paths.real_data_root()
    df = resolve_paths(load_shipped(name), root)
    missing = pd.DataFrame([(r["dataset"], r["subject_id"], c, r[c]) for _, r in df.iterrows()
                            for c in PATH_COLUMNS if r[c] and not os.path.isfile(r[c])],
                           columns=["dataset", "subject_id", "column", "path"]).drop_duplicates()
    if len(missing) and not allow_missing:
        counts = missing.groupby("dataset")["subject_id"].nunique()
        total = df.groupby("dataset")["subject_id"].nunique()
        lines = [f"  {d}: {counts[d]} of {total[d]} subjects lack files, e.g. "
                 f"{missing.loc[missing['dataset'] == d, 'path'].iloc[0]}" for d in counts.index]
        raise ManifestError(f"{len(missing)} file(s) of data_manifests/{name}.csv are missing under {root}:\n"
                            + "\n".join(lines) + "\nPut the data sets there as described in data_manifests/"
                            "README.md, or set allow_missing=True to use only the subjects present.")
    lacking = set(zip(missing["dataset"], missing["subject_id"]))
    keep = [(d, s) not in lacking for d, s in zip(df["dataset"], df["subject_id"])]
    present = df[keep].reset_index(drop=True)
    if present.empty:
        raise ManifestError(f"none of the files of data_manifests/{name}.csv exist under {root}; see "
                            "data_manifests/README.md for the expected layout")
    emptied = emptied_parts(df, present)
    if emptied:
        warnings.warn(f"allow_missing: under {root}, these parts of data_manifests/{name}.csv keep no subject "
                      "(all lack files); stages that train or evaluate on them will have nothing to work on:\n  "
                      + "\n  ".join(emptied), stacklevel=2)
    return present, missing
