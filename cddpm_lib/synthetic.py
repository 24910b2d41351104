"""The embedded synthetic cohort: IXI-like healthy subjects and BraTS21/MSLUB/ATLAS/WMH-like pathologies in the
split shapes of paper Table 1 (a stand-in for the data of paper §4.1; scans rendered by :mod:`headmodel`).

Sites differ in contrast, bias, noise, blur, slice thickness, axis orientation and pose range; the unhealthy
data sets come from other sites than IXI's three (the paper's domain shift). BraTS-like subjects are delivered
skull-stripped (as BraTS21), the others with skull. Every subject is deterministic from ``(seed, data set,
index)``; :func:`generate_cohort` writes ``raw/<dataset>/<subject>/{t1,t2,brain_mask,seg}.nii.gz`` and the raw
manifest, in parallel processes, skipping subjects already written with the same settings.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm import tqdm

from . import lesions
from .config import ConfigError, StageConfig
from .headmodel import (ATLAS_VERSION, WEIGHTINGS, Site, SubjectSpec, atlas_factor, load_atlas, render_subject,
                        sample_subject)
from .runtime import exit_with_parent
from .volumes import save_json, save_nifti

SITES: dict[str, Site] = {s.name: s for s in (
    # IXI (healthy): Guy's (Philips 1.5 T), Hammersmith (Philips 3 T), IoP (GE 1.5 T)
    Site("Guys", {}, 0.030, 0.15, 0.6),
    Site("HH", {"t1": {"gm": 0.92, "csf": 0.85}, "t2": {"gm": 0.95, "wm": 0.90, "csf": 1.05}}, 0.025, 0.30, 0.4,
         1.2, scale=1400.0),
    Site("IOP", {"t1": {"gm": 1.06, "csf": 1.20}, "t2": {"gm": 1.05, "wm": 1.08}}, 0.040, 0.20, 0.8,
         flip_x=True, scale=700.0),
    # unhealthy sets: other scanners and contrasts (domain shift); BraTS and ATLAS come registered (small pose)
    Site("BraTS-A", {"t2": {"csf": 0.90, "gm": 1.12, "wm": 1.15}, "t1": {"gm": 1.05, "csf": 1.30}}, 0.020, 0.10,
         1.0, pose_deg=3.0, pose_mm=3.0),
    Site("BraTS-B", {"t2": {"gm": 1.05, "wm": 1.20}, "t1": {"gm": 0.95}}, 0.035, 0.15, 1.2, pose_deg=3.0,
         pose_mm=3.0, scale=500.0),
    Site("Ljubljana", {"t2": {"gm": 0.90, "wm": 0.85, "csf": 1.10}, "t1": {"gm": 0.95}}, 0.030, 0.35, 0.5,
         pose_deg=12.0, scale=1600.0),
    Site("R001", {"t1": {"gm": 1.08, "csf": 1.40}}, 0.035, 0.20, 0.7, pose_deg=2.0, pose_mm=2.0),
    Site("R002", {"t1": {"gm": 0.97, "csf": 0.90}}, 0.045, 0.25, 1.0, pose_deg=2.0, pose_mm=2.0, scale=300.0),
    Site("Utrecht", {"t1": {"gm": 1.04}}, 0.030, 0.30, 0.6, 1.5, scale=900.0),
    Site("Singapore", {"t1": {"gm": 0.96, "csf": 1.25}}, 0.040, 0.25, 0.8, 1.5, flip_x=True),
    Site("GE3T", {"t1": {"gm": 1.10, "csf": 0.80}}, 0.035, 0.35, 0.7, 1.5, scale=2000.0),
)}
DATASET_SITES: dict[str, tuple[str, ...]] = {
    "IXI": ("Guys", "HH", "IOP"), "BraTS21": ("BraTS-A", "BraTS-B"), "MSLUB": ("Ljubljana",),
    "ATLAS": ("R001", "R002"), "WMH": ("Utrecht", "Singapore", "GE3T")}
#: weightings written per data set (main one first; the second only with ``extra_weightings``)
DATASET_WEIGHTINGS: dict[str, tuple[str, ...]] = {
    "IXI": ("t1", "t2"), "BraTS21": ("t2", "t1"), "MSLUB": ("t2", "t1"), "ATLAS": ("t1",), "WMH": ("t1",)}
SKULL_STRIPPED = {"BraTS21"}


# ------------------------------------------------------------------------------------------------ the cohort

GENERATOR_VERSION = 1  # bump when rendering changes (existing subjects are then regenerated)
DATASET_CODES = {"IXI": 0, "BraTS21": 1, "MSLUB": 2, "ATLAS": 3, "WMH": 4}
PAPER_UNHEALTHY_SIZES = {"BraTS21": [100, 1151], "MSLUB": [10, 20], "ATLAS": [175, 480], "WMH": [15, 45]}


@dataclasses.dataclass(frozen=True)
class SyntheticConfig(StageConfig):
    """The synthetic cohort; defaults give the split shapes of paper Table 1 at 1 mm.

    IXI: a train/val pool of ``n_ixi_pool`` subjects; validation fold ``k`` is the ``k``-th chunk of
    ``n_val_per_fold`` subjects and trains on the rest (358 + 44 in the paper), disjoint folds, plus
    ``n_ixi_test`` test subjects. ``unhealthy_sizes``: ``{data set: [n_val, n_test]}``.
    """

    seed: int = 0
    voxel_mm: float = 1.0
    fov_mm: tuple[float, float, float] = (200.0, 232.0, 208.0)
    anisotropic: bool = True
    n_ixi_pool: int = 402
    n_val_per_fold: int = 44
    n_folds: int = 5
    n_ixi_test: int = 158
    unhealthy_sizes: dict[str, list[int]] = dataclasses.field(
        default_factory=lambda: {k: list(v) for k, v in PAPER_UNHEALTHY_SIZES.items()})
    extra_weightings: bool = True
    n_jobs: int = 2

    def validate(self) -> None:
        if not 0.5 <= self.voxel_mm <= 8.0:
            raise ConfigError(f"voxel_mm must lie in [0.5, 8] mm, got {self.voxel_mm}")
        if self.n_folds < 1 or self.n_val_per_fold < 1 or self.n_folds * self.n_val_per_fold > self.n_ixi_pool:
            raise ConfigError(f"n_folds ({self.n_folds}) x n_val_per_fold ({self.n_val_per_fold}) must be >= 1 and "
                              f"fit in n_ixi_pool ({self.n_ixi_pool}): validation folds are disjoint chunks")
        for name, sizes in self.unhealthy_sizes.items():
            if name not in PAPER_UNHEALTHY_SIZES:
                raise ConfigError(f"unhealthy_sizes: unknown data set {name!r}; use {sorted(PAPER_UNHEALTHY_SIZES)}")
            if (not isinstance(sizes, (list, tuple)) or len(sizes) != 2
                    or not all(isinstance(n, int) and n >= 0 for n in sizes)):
                raise ConfigError(f"unhealthy_sizes[{name!r}] must be [n_val, n_test] (integers >= 0), got {sizes!r}")
        if self.n_ixi_test < 0 or self.n_jobs < 1:
            raise ConfigError("n_ixi_test must be >= 0 and n_jobs >= 1")

    def signature(self) -> str:
        """Hash of what changes a subject's volumes (cohort sizes and n_jobs do not)."""
        keys = ("seed", "voxel_mm", "fov_mm", "anisotropic", "extra_weightings")
        blob = json.dumps([GENERATOR_VERSION, ATLAS_VERSION, *(self.to_dict()[k] for k in keys)])
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


def subject_name(dataset: str, index: int, site: str) -> str:
    """Identifiers in each data set's own style: ``IXI012-HH``, ``BraTS2021_00003``, ``patient04``,
    ``sub-r002s005``, ``Utrecht_7``."""
    return {"IXI": f"IXI{index + 1:03d}-{site}", "BraTS21": f"BraTS2021_{index:05d}",
            "MSLUB": f"patient{index + 1:02d}", "ATLAS": f"sub-{site.lower()}s{index + 1:03d}",
            "WMH": f"{site}_{index}"}[dataset]


def plan_cohort(cfg: SyntheticConfig) -> pd.DataFrame:
    """One row per subject: ``dataset, index, subject_id, site, split`` (IXI pool subjects: ``split='pool'``)."""
    rows = []
    for i in range(cfg.n_ixi_pool + cfg.n_ixi_test):
        site = DATASET_SITES["IXI"][i % 3]
        rows.append(("IXI", i, subject_name("IXI", i, site), site, "pool" if i < cfg.n_ixi_pool else "test"))
    for dataset, (n_val, n_test) in cfg.unhealthy_sizes.items():
        sites = DATASET_SITES[dataset]
        for i in range(n_val + n_test):
            site = sites[i % len(sites)]
            rows.append((dataset, i, subject_name(dataset, i, site), site, "val" if i < n_val else "test"))
    return pd.DataFrame(rows, columns=["dataset", "index", "subject_id", "site", "split"])


def subject_spec(cfg: SyntheticConfig, dataset: str, index: int, site: str) -> SubjectSpec:
    """The subject ``index`` of ``dataset``: deterministic from ``(cfg.seed, dataset, index)``."""
    rng = np.random.default_rng([cfg.seed, DATASET_CODES[dataset], index])
    return sample_subject(SITES[site], rng, voxel_mm=cfg.voxel_mm, dataset=dataset,
                          subject_id=subject_name(dataset, index, site), weightings=cohort_weightings(cfg, dataset),
                          lesion_kind=lesions.DATASET_KIND.get(dataset, ""), skull_stripped=dataset in SKULL_STRIPPED,
                          fov_mm=cfg.fov_mm, anisotropic=cfg.anisotropic)


def cohort_weightings(cfg: SyntheticConfig, dataset: str) -> tuple[str, ...]:
    """Weightings written for ``dataset``: IXI both; the others their evaluation weighting (+ T1 for BraTS21 and
    MSLUB with ``extra_weightings``)."""
    return DATASET_WEIGHTINGS[dataset][: None if cfg.extra_weightings or dataset == "IXI" else 1]


def subject_files(spec_dataset: str, subject_id: str, weightings: tuple[str, ...]) -> dict[str, str]:
    """Relative paths (to the source folder) of a subject's files: ``raw/<dataset>/<subject>/<name>.nii.gz``."""
    folder = f"raw/{spec_dataset}/{subject_id}"
    names = [*weightings, "brain_mask"] + ([] if spec_dataset == "IXI" else ["seg"])
    return {n: f"{folder}/{n}.nii.gz" for n in names}


def write_subject(cfg: SyntheticConfig, dataset: str, index: int, site: str, out_dir: str | Path) -> dict:
    """Render one subject and write its NIfTIs and ``subject.json`` (last, so a partial subject is redone)."""
    out_dir = Path(out_dir)
    spec = subject_spec(cfg, dataset, index, site)
    vols = render_subject(spec)
    files = subject_files(dataset, spec.subject_id, spec.weightings)
    for name, rel in files.items():
        save_nifti(vols[name], vols["affine"], out_dir / rel, dtype=np.int16 if name in WEIGHTINGS else np.uint8)
    voxel_ml = float(abs(np.linalg.det(vols["affine"][:3, :3]))) / 1000.0
    info = {"signature": cfg.signature(), "dataset": dataset, "index": index, "site": site,
            "subject_id": spec.subject_id, "files": files, "shape": list(spec.shape),
            "lesion_kind": vols["lesion"].kind if vols["lesion"] else "",
            "lesion_ml": float(vols["seg"].sum() * voxel_ml), "brain_ml": float(vols["brain_mask"].sum() * voxel_ml)}
    save_json(info, out_dir / f"raw/{dataset}/{spec.subject_id}/subject.json")
    return info


def subject_done(cfg: SyntheticConfig, out_dir: Path, dataset: str, subject_id: str) -> bool:
    """A subject is skipped when its ``subject.json`` matches ``cfg.signature()`` and its files exist."""
    record = out_dir / f"raw/{dataset}/{subject_id}/subject.json"
    try:
        info = json.loads(record.read_text())
    except (OSError, ValueError):
        return False
    return info.get("signature") == cfg.signature() and all((out_dir / p).is_file() for p in info["files"].values())


def _write_subject_task(task: tuple) -> dict:
    return write_subject(*task)


def generate_cohort(cfg: SyntheticConfig, out_dir: str | Path, *, progress: bool = True) -> pd.DataFrame:
    """Write the cohort under ``out_dir/raw/`` plus ``out_dir/raw_manifest.csv`` (relative paths); return the
    manifest with absolute paths (:func:`manifests.load_manifest`).

    Subjects already written with the same :meth:`SyntheticConfig.signature` are skipped (resumable).
    ``cfg.n_jobs`` processes render subjects in parallel; results do not depend on ``n_jobs``.
    """
    from . import manifests

    out_dir = Path(out_dir)
    gen_cfg = SyntheticConfig.from_params({k: getattr(cfg, k) for k in SyntheticConfig.field_names()})
    plan = plan_cohort(gen_cfg)
    todo = [(gen_cfg, r.dataset, int(r.index), r.site, str(out_dir)) for r in plan.itertuples()
            if not subject_done(gen_cfg, out_dir, r.dataset, r.subject_id)]
    load_atlas(atlas_factor(gen_cfg.voxel_mm))  # built once (and cached on disk) before any worker starts
    bar = tqdm(total=len(todo), desc="synthetic subjects", disable=not progress or not todo)
    if gen_cfg.n_jobs > 1 and len(todo) > 2 * gen_cfg.n_jobs:
        with ProcessPoolExecutor(gen_cfg.n_jobs, mp_context=get_context("spawn"),
                                 initializer=exit_with_parent) as pool:  # a stopped run leaves no worker behind
            for _ in pool.map(_write_subject_task, todo, chunksize=2):
                bar.update()
    else:
        for task in todo:
            _write_subject_task(task)
            bar.update()
    bar.close()
    path = manifests.write_manifest(cohort_manifest(gen_cfg, plan), out_dir / "raw_manifest.csv")
    return manifests.load_manifest(path)


def cohort_manifest(cfg: SyntheticConfig, plan: pd.DataFrame) -> pd.DataFrame:
    """Manifest rows (architecture schema) of a planned cohort; IXI pool subjects get one row per fold."""
    rows = []
    for r in plan.itertuples():
        files = subject_files(r.dataset, r.subject_id, cohort_weightings(cfg, r.dataset))
        base = {"dataset": r.dataset, "subject_id": r.subject_id, "t1": files.get("t1", ""),
                "t2": files.get("t2", ""), "brain_mask": files["brain_mask"], "seg": files.get("seg", ""),
                "site": r.site, "skull_stripped": int(r.dataset in SKULL_STRIPPED), "healthy": int(r.dataset == "IXI")}
        if r.split == "pool":
            for k in range(cfg.n_folds):
                val = k * cfg.n_val_per_fold <= r.index < (k + 1) * cfg.n_val_per_fold
                rows.append({**base, "split": "val" if val else "train", "fold": k})
        else:
            rows.append({**base, "split": r.split, "fold": -1})
    from .manifests import COLUMNS

    return pd.DataFrame(rows, columns=list(COLUMNS))


def plot_montage(manifest: pd.DataFrame, weightings: tuple[str, ...] = ("t2", "t1"), datasets: tuple[str, ...] = (
        "IXI", "BraTS21", "MSLUB", "ATLAS", "WMH")):
    """One example per data set (rows) and weighting (columns) from a manifest with absolute paths: the axial
    slice through the lesion's largest cross-section (mid-volume for healthy subjects), the segmentation
    outlined in red. Volumes are reoriented to RAS first, so real scans in any orientation show axially.
    Returns the matplotlib Figure."""
    import matplotlib.pyplot as plt
    import nibabel as nib

    present = [d for d in datasets if (manifest["dataset"] == d).any()]
    fig, axes = plt.subplots(len(present), len(weightings), figsize=(2.6 * len(weightings), 2.6 * len(present)),
                             squeeze=False)
    for r, dataset in enumerate(present):
        rows = manifest[manifest["dataset"] == dataset]
        row = rows.sort_values("split", key=lambda s: s != "test").iloc[0]
        seg = (np.asarray(nib.as_closest_canonical(nib.load(row["seg"])).dataobj) > 0) if row["seg"] else None
        for c, weighting in enumerate(weightings):
            ax = axes[r, c]
            ax.set_xticks([]), ax.set_yticks([])
            if not row[weighting]:
                ax.text(0.5, 0.5, f"{dataset}: no {weighting.upper()}", ha="center", va="center",
                        transform=ax.transAxes, fontsize=8, color="0.4")
                ax.axis("off")
                continue
            img = nib.as_closest_canonical(nib.load(row[weighting]))
            vol = np.asarray(img.dataobj, np.float32)
            z = (int(np.argmax(seg.sum((0, 1)))) if seg is not None and seg.shape == vol.shape and seg.any()
                 else vol.shape[2] // 2)
            zoom = img.header.get_zooms()[:2]
            ax.imshow(vol[:, :, z].T, cmap="gray", origin="lower", aspect=zoom[1] / zoom[0],
                      vmax=np.percentile(vol, 99.5))
            if seg is not None and seg.shape == vol.shape and seg[:, :, z].any():
                ax.contour(seg[:, :, z].T, [0.5], colors="red", linewidths=0.7)
            ax.set_title(f"{dataset} {weighting.upper()} ({row['site']})", fontsize=8)
    fig.tight_layout()
    return fig
