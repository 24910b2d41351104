"""Reconstruction quality (paper §4.5.1, §5.1, Table 2): SSIM, PSNR, l1-error and l1-ratio of volumes.

How each metric is computed (the paper does not say; each choice is a parameter of the stage):

- **SSIM** (Wang et al. 2004): scikit-image's ``structural_similarity`` with Wang's settings — Gaussian window
  σ = 1.5 (11 voxels), K1 = 0.01, K2 = 0.03, population covariances, ``data_range = 1`` (intensities in [0, 1]).
  ``ssim_dims="3d"`` (default) computes the local SSIM map in 3D on the whole volume; ``"2d"`` computes it per
  axial slice (the models' own domain). The map is averaged over the brain-mask voxels
  (``similarity_region="brain"``, default) or over the whole volume (``"volume"``).
- **PSNR**: ``10 log10(data_range² / MSE)`` with the MSE over the same region, ``data_range = 1``;
  identical inputs give ``inf``, or ``psnr_cap_db`` when set (so that means stay finite).
- **l1-error**: mean ``|x − x̂|`` over the whole volume (``l1_error_region="volume"``, default: the authors'
  code, ``l1_loss(reconstruction, input)`` of the volume, background included) or over the brain-mask voxels
  (``"brain"``). With background at 0 in both, the volume's l1 is the brain's times the brain's share of the
  volume (about half of it at the quick size).
- **l1-ratio** = l1(unhealthy) / l1(healthy) (paper §4.5.1). ``region="brain"`` (default): unhealthy = brain ∩
  annotation, healthy = brain minus annotation. ``region="volume"``: annotation vs everything else, background
  included (the authors' public code). Per fold, the ratio of the mean unhealthy l1 over the mean healthy l1 of
  the test volumes; volumes with an empty annotation only count towards neither.
- **Perceptual**: LPIPS on MedicalNet features, or the labelled substitute (:mod:`cddpm_lib.perceptual`).

Fold scores are means over test volumes; Table 2 reports mean ± std over folds with SSIM in %, LPIPS and l1
×1e3, as the paper, and stars the best model of a column when a permutation test on the per-fold scores finds
it better than every other model (paper §4.5.4). Reconstructions are cached as ``.npz`` under
``runs/<profile>/recon/<model_id>/fold<k>/<variant>/<dataset>/`` and reused by later runs.
"""
from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import ClassVar, Literal

import numpy as np
import pandas as pd
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from . import data, paths, reconstruct, reference, stats, tables
from .conditioning import CONTRAST_LEVELS, CROP_FRACTIONS, apply_contrast, largest_brain_slice
from .config import ConfigError, StageConfig
from .datasets import EVAL_SETS, HEALTHY, model_id
from .models import MODEL_NAMES, load_model
from .perceptual import SUBSTITUTE_LABEL, resolve_perceptual
from .runtime import default_device, stage_amp

#: Wang et al. (2004) SSIM constants and window, used by :func:`ssim`
SSIM_SIGMA = 1.5
SSIM_K1, SSIM_K2 = 0.01, 0.03


def _check_pair(image: np.ndarray, recon: np.ndarray, mask: np.ndarray | None, where: str) -> np.ndarray:
    if image.shape != recon.shape:
        raise ValueError(f"{where}: image {image.shape} and reconstruction {recon.shape} differ in shape")
    if mask is None:
        return np.ones(image.shape, dtype=bool)
    if mask.shape != image.shape:
        raise ValueError(f"{where}: mask {mask.shape} and image {image.shape} differ in shape")
    m = np.asarray(mask) > 0
    if not m.any():
        raise ValueError(f"{where}: the mask is empty")
    return m


def ssim_map(image: np.ndarray, recon: np.ndarray, *, data_range: float = 1.0,
             dims: Literal["2d", "3d"] = "3d") -> np.ndarray:
    """Local SSIM of two volumes ``[X, Y, Z]`` (Wang et al. 2004 settings), same shape as the input.

    ``dims="2d"``: one 2D map per axial slice (last axis); ``"3d"``: a 3D map.
    """
    kw = dict(data_range=data_range, gaussian_weights=True, sigma=SSIM_SIGMA, use_sample_covariance=False,
              K1=SSIM_K1, K2=SSIM_K2, full=True)
    x, y = np.asarray(image, np.float64), np.asarray(recon, np.float64)
    if dims == "3d":
        return structural_similarity(x, y, **kw)[1]
    if dims == "2d":
        return np.stack([structural_similarity(x[..., z], y[..., z], **kw)[1] for z in range(x.shape[-1])], -1)
    raise ValueError(f"ssim dims must be '2d' or '3d', got {dims!r}")


def ssim(image: np.ndarray, recon: np.ndarray, mask: np.ndarray | None = None, *, data_range: float = 1.0,
         dims: Literal["2d", "3d"] = "3d") -> float:
    """Mean local SSIM over the mask voxels (1 for identical volumes)."""
    m = _check_pair(image, recon, mask, "ssim")
    return float(ssim_map(image, recon, data_range=data_range, dims=dims)[m].mean())


def psnr(image: np.ndarray, recon: np.ndarray, mask: np.ndarray | None = None, *, data_range: float = 1.0,
         cap_db: float | None = None) -> float:
    """PSNR in dB over the mask voxels; ``inf`` (or ``cap_db``) when they are identical."""
    m = _check_pair(image, recon, mask, "psnr")
    x, y = np.asarray(image, np.float64)[m], np.asarray(recon, np.float64)[m]
    if np.array_equal(x, y):
        return math.inf if cap_db is None else float(cap_db)
    value = float(peak_signal_noise_ratio(x, y, data_range=data_range))
    return value if cap_db is None else min(value, float(cap_db))


def l1_error(image: np.ndarray, recon: np.ndarray, region: np.ndarray | None = None) -> float:
    """Mean ``|x − x̂|`` over the region's voxels; NaN when the region is empty."""
    if image.shape != recon.shape:
        raise ValueError(f"l1_error: image {image.shape} and reconstruction {recon.shape} differ in shape")
    r = np.ones(image.shape, dtype=bool) if region is None else np.asarray(region) > 0
    if not r.any():
        return math.nan
    return float(np.abs(np.asarray(image, np.float64)[r] - np.asarray(recon, np.float64)[r]).mean())


def l1_split(image: np.ndarray, recon: np.ndarray, brain_mask: np.ndarray, seg: np.ndarray,
             region: Literal["brain", "volume"] = "brain") -> tuple[float, float]:
    """(l1 of unhealthy voxels, l1 of healthy voxels) of one volume (paper §4.5.1); NaN for an empty part."""
    anomalous = np.asarray(seg) > 0
    if region == "brain":
        brain = np.asarray(brain_mask) > 0
        return l1_error(image, recon, brain & anomalous), l1_error(image, recon, brain & ~anomalous)
    if region == "volume":
        return l1_error(image, recon, anomalous), l1_error(image, recon, ~anomalous)
    raise ValueError(f"l1-ratio region must be 'brain' or 'volume', got {region!r}")


def l1_ratio(l1_unhealthy: np.ndarray, l1_healthy: np.ndarray) -> float:
    """l1-ratio of a set of volumes: mean unhealthy l1 / mean healthy l1, ignoring NaN (empty parts)."""
    u, h = np.asarray(l1_unhealthy, np.float64), np.asarray(l1_healthy, np.float64)
    if not np.isfinite(u).any() or not np.isfinite(h).any():
        return math.nan
    den = np.nanmean(h)
    return float(np.nanmean(u) / den) if den > 0 else math.nan


def volume_quality(image: np.ndarray, recon: np.ndarray, brain_mask: np.ndarray, *, data_range: float = 1.0,
                   ssim_dims: Literal["2d", "3d"] = "3d", psnr_cap_db: float | None = None,
                   similarity_region: Literal["brain", "volume"] = "brain",
                   l1_error_region: Literal["brain", "volume"] = "volume") -> dict[str, float]:
    """SSIM, PSNR and l1-error of one healthy volume (Table 2's IXI columns); SSIM and PSNR over
    ``similarity_region``, the l1-error over ``l1_error_region`` (``brain``: the brain-mask voxels; ``volume``:
    every voxel)."""
    regions = {"brain": brain_mask, "volume": None}
    for name, value in (("similarity_region", similarity_region), ("l1_error_region", l1_error_region)):
        if value not in regions:
            raise ValueError(f"volume_quality: {name} must be 'brain' or 'volume', got {value!r}")
    sim = regions[similarity_region]
    return {
        "ssim": ssim(image, recon, sim, data_range=data_range, dims=ssim_dims),
        "psnr": psnr(image, recon, sim, data_range=data_range, cap_db=psnr_cap_db),
        "l1": l1_error(image, recon, regions[l1_error_region]),
    }


# --------------------------------------------------------------------------------------------------------------
# Stage `reconstruction_quality` (notebook 04): models, test volumes, per-volume scores


@dataclasses.dataclass(frozen=True)
class ReconstructionQualityConfig(StageConfig):
    """Notebook 04 (Table 2 and Fig. 2). Defaults: the paper's settings."""

    STAGE: ClassVar[str] = "reconstruction_quality"  # profiles/<STAGE>.yaml resolves None parameters

    profile: str = "quick"
    source: str = "synthetic"
    folds: tuple[int, ...] = (0, 1, 2, 3, 4)
    #: Table 2 rows; "-ssl" = encoder pre-trained with SparK (the cDDPM of the paper's final rows)
    models: tuple[str, ...] = ("vae", "svae", "ae", "dae", "ddpm", "pddpm", "cddpm-ssl")
    diffusion_variant: str = "ens"  # DDPM family: t_test = [250, 500, 750] averaged (Table 2 caption)
    ssim_dims: Literal["2d", "3d"] = "3d"
    data_range: float = 1.0
    psnr_cap_db: float | None = None
    l1_region: Literal["brain", "volume"] = "brain"
    similarity_region: Literal["brain", "volume"] = "brain"
    l1_error_region: Literal["brain", "volume"] = "volume"
    medicalnet_weights: str = ""  # "" -> $CDDPM_MEDICALNET_WEIGHTS
    permutation_rounds: int = 10000  # paper §4.5.4
    alpha: float = 0.05
    alternative: Literal["one-sided", "two-sided"] = "one-sided"
    max_volumes: int = 0  # per data set; 0 = all test volumes
    device: str = "auto"
    amp: Literal["none", "bf16", "fp16"] = "none"  # reconstruct under autocast (runtime.effective_amp)
    max_batch: int = 32
    seed: int = 0
    fig2_fold: int = 0
    fig2_cddpm: str = "cddpm-ssl"
    fig2_contrasts: tuple[float, ...] = CONTRAST_LEVELS
    fig2_crops: tuple[float, ...] = CROP_FRACTIONS
    fig2_t_half: int = 500
    fig2_t_full: int = 1000

    def validate(self) -> None:
        paths.check_profile(self.profile)
        paths.check_source(self.source)
        for spec in self.models + (self.fig2_cddpm,):
            parse_model(spec)
        if not self.folds:
            raise ConfigError("parameter 'folds': at least one fold")
        if not 0 < self.alpha < 1:
            raise ConfigError(f"parameter 'alpha': must lie in (0, 1), got {self.alpha}")
        if self.max_volumes < 0 or self.max_batch < 1:
            raise ConfigError("parameters 'max_volumes' >= 0 and 'max_batch' >= 1 required")


def parse_model(spec: str) -> tuple[str, bool]:
    """``"cddpm-ssl"`` -> ``("cddpm", True)``; ``"ddpm"`` -> ``("ddpm", False)``; unknown names are an error."""
    name, ssl = (spec[:-4], True) if spec.endswith("-ssl") else (spec, False)
    if name not in MODEL_NAMES:
        raise ConfigError(f"unknown model {spec!r}; known: {', '.join(MODEL_NAMES)} (optionally with '-ssl')")
    return name, ssl


def model_label(spec: str) -> str:
    """Display name of a Table row, e.g. ``cddpm-ssl`` -> ``cDDPM (SSL)``."""
    name, ssl = parse_model(spec)
    return reference.DISPLAY.get(name, name) + (" (SSL)" if ssl else "")


def load_trained(profile: str, spec: str, weighting: str, fold: int):
    """``best.pt`` of model ``spec`` for ``weighting``/``fold``; a clear error naming the missing checkpoint."""
    name, ssl = parse_model(spec)
    path = paths.checkpoint_dir(profile, model_id(name, weighting, ssl), fold) / "best.pt"
    if not path.exists():
        raise FileNotFoundError(f"{path} missing: train {model_id(name, weighting, ssl)} fold {fold} first "
                                "(stage 'training', notebook 03) or drop it from 'models'")
    return load_model(path)


def test_volumes(cfg, dataset: str, weighting: str) -> pd.DataFrame:
    """Manifest rows of the ``dataset`` test split with a ``weighting`` image, by subject id (first
    ``cfg.max_volumes``: the same volumes as the segmentation stage's test split, whose reconstructions they share)."""
    df = data.read_manifest(paths.preprocessed_manifest_path(cfg.source, cfg.profile))
    rows = data.select_rows(df, dataset=dataset, split="test", fold=None, weighting=weighting,
                            where=str(paths.preprocessed_manifest_path(cfg.source, cfg.profile)))
    rows = rows.drop_duplicates("subject_id").sort_values("subject_id", kind="stable").reset_index(drop=True)
    return rows.head(cfg.max_volumes) if cfg.max_volumes else rows


def load_case(row: pd.Series, weighting: str, contrast: float = 1.0) -> dict[str, np.ndarray]:
    """Image (``x^contrast`` inside the brain), brain mask, segmentation (zeros if none) and affine of one row."""
    case = reconstruct.load_case(row, weighting)
    if contrast != 1.0:
        case["image"] = (apply_contrast(case["image"], contrast) * case["brain_mask"]).astype(np.float32)
    return case


def reconstruct_rows(model, rows: pd.DataFrame, weighting: str, out_dir: Path, cfg, contrast: float = 1.0,
                     parts: dict[int, Path] | None = None, *, amp: str | None = None, **recon_kwargs):
    """Yield ``(row, case, recon)`` for every manifest row, reconstructing into (or reusing from) ``out_dir``
    (``parts``: folders of an ensemble's single-``t`` parts, :func:`reconstruct.part_dirs`). ``amp``: the
    precision that runs (a stage resolves it once, :func:`runtime.stage_amp`); ``None``: ``cfg.amp`` resolved
    here, a fallback to float32 warned."""
    device = default_device(cfg.device)
    if amp is None:
        amp = stage_amp(cfg.amp, device)
    model.to(device).eval()
    for _, row in rows.iterrows():
        case = load_case(row, weighting, contrast)
        seed = reconstruct.subject_seed(cfg.seed, str(row["subject_id"]))
        recon, *_ = reconstruct.reconstruct_cached(model, case, out_dir / f"{row['subject_id']}.npz", device=device,
                                                   max_batch=cfg.max_batch, seed=seed, parts=parts, amp=amp,
                                                   **recon_kwargs)
        yield row, case, recon


def _variant(cfg, spec: str) -> tuple[str, dict]:
    """(variant, test-time kwargs): the configured one for the DDPM family, ``default`` for the others."""
    variant = cfg.diffusion_variant if parse_model(spec)[0] in reference.DIFFUSION_MODELS else "default"
    return variant, reconstruct.variant_kwargs(variant)


def evaluate_healthy(cfg: ReconstructionQualityConfig, log=print, amp: str | None = None
                     ) -> tuple[pd.DataFrame, dict[int, str]]:
    """Per-volume SSIM, PSNR, l1 and perceptual distance on the IXI T2 test set, per model and fold.

    ``amp``: the precision that runs, resolved once for the stage (:func:`runtime.stage_amp`); ``None``:
    ``cfg.amp`` resolved here, a fallback said through ``log``.
    Returns ``(scores, notes)``: one row per (model, fold, subject); notes: fold -> perceptual provenance.
    """
    device, rows, notes = default_device(cfg.device), test_volumes(cfg, HEALTHY, "t2"), {}
    amp = stage_amp(cfg.amp, device, log, "[quality]") if amp is None else amp
    records = []
    for fold in cfg.folds:
        encoder = paths.checkpoint_dir(cfg.profile, "spark_t2", fold) / "encoder.pt"
        metric = resolve_perceptual(cfg.medicalnet_weights or None, encoder)
        notes[fold] = metric.note
        for spec in cfg.models:
            model, (variant, kw) = load_trained(cfg.profile, spec, "t2", fold), _variant(cfg, spec)
            name, ssl = parse_model(spec)
            mid = model_id(name, "t2", ssl)
            out, parts = (f(cfg.profile, mid, fold, variant, HEALTHY) for f in (paths.recon_dir, reconstruct.part_dirs))
            for row, case, recon in reconstruct_rows(model, rows, "t2", out, cfg, parts=parts, amp=amp, **kw):
                scores = volume_quality(case["image"], recon, case["brain_mask"], data_range=cfg.data_range,
                                        ssim_dims=cfg.ssim_dims, psnr_cap_db=cfg.psnr_cap_db,
                                        similarity_region=cfg.similarity_region,
                                        l1_error_region=cfg.l1_error_region)
                scores["perceptual"] = metric.distance(case["image"], recon, case["brain_mask"], device)
                records.append({"model": spec, "fold": fold, "subject_id": row["subject_id"], **scores,
                                "perceptual_kind": metric.kind})
            log(f"[quality] {spec} fold {fold}: {len(rows)} IXI test volumes")
    return pd.DataFrame(records), notes


def evaluate_unhealthy(cfg: ReconstructionQualityConfig, log=print, amp: str | None = None) -> pd.DataFrame:
    """Per-volume l1 of unhealthy and healthy voxels on each unhealthy test set (T2 models: BraTS21, MSLUB;
    T1 models: ATLAS, WMH — ``datasets.EVAL_SETS``). ``amp``: as in :func:`evaluate_healthy`."""
    records = []
    amp = stage_amp(cfg.amp, default_device(cfg.device), log, "[quality]") if amp is None else amp
    for weighting, sets in EVAL_SETS.items():
        for dataset in sets:
            rows = test_volumes(cfg, dataset, weighting)
            for fold in cfg.folds:
                for spec in cfg.models:
                    model, (variant, kw) = load_trained(cfg.profile, spec, weighting, fold), _variant(cfg, spec)
                    name, ssl = parse_model(spec)
                    mid = model_id(name, weighting, ssl)
                    out = paths.recon_dir(cfg.profile, mid, fold, variant, dataset)
                    parts = reconstruct.part_dirs(cfg.profile, mid, fold, variant, dataset)
                    recons = reconstruct_rows(model, rows, weighting, out, cfg, parts=parts, amp=amp, **kw)
                    for row, case, recon in recons:
                        u, h = l1_split(case["image"], recon, case["brain_mask"], case["seg"], cfg.l1_region)
                        records.append({"model": spec, "fold": fold, "dataset": dataset,
                                        "subject_id": row["subject_id"], "l1_unhealthy": u, "l1_healthy": h})
                log(f"[quality] l1-ratio {dataset}: {len(rows)} volumes × {len(cfg.models)} models, fold(s) {fold}")
    return pd.DataFrame(records)


def fold_scores(healthy: pd.DataFrame, unhealthy: pd.DataFrame) -> pd.DataFrame:
    """One row per (model, fold): mean SSIM/PSNR/perceptual/l1 over IXI test volumes and the l1-ratio of each
    unhealthy set (ratio of mean l1 over volumes with a non-empty annotation)."""
    scores = healthy.groupby(["model", "fold"], sort=False)[["ssim", "psnr", "perceptual", "l1"]].mean()
    valid = unhealthy[np.isfinite(unhealthy["l1_unhealthy"].astype(float))] if len(unhealthy) else unhealthy
    for dataset in [d for sets in EVAL_SETS.values() for d in sets]:
        part = valid[valid["dataset"] == dataset] if len(valid) else valid
        ratio = {key: l1_ratio(g["l1_unhealthy"], g["l1_healthy"]) for key, g in
                 part.groupby(["model", "fold"], sort=False)} if len(part) else {}
        scores[f"ratio_{dataset}"] = [ratio.get(key, math.nan) for key in scores.index]
    return scores.reset_index()


def figure2_inputs(cfg: ReconstructionQualityConfig):
    """``(cddpm, ddpm, image, mask)`` for Fig. 2: the T2 models of ``cfg.fig2_fold`` on the device, and the axial
    slice ``[H, W]`` with the largest brain area of the first IXI test volume."""
    device = default_device(cfg.device)
    cddpm = load_trained(cfg.profile, cfg.fig2_cddpm, "t2", cfg.fig2_fold).to(device)
    ddpm = load_trained(cfg.profile, "ddpm", "t2", cfg.fig2_fold).to(device)
    case = load_case(test_volumes(cfg, HEALTHY, "t2").iloc[0], "t2")
    z = largest_brain_slice(case["brain_mask"])
    return cddpm, ddpm, case["image"][..., z], case["brain_mask"][..., z]

# --------------------------------------------------------------------------------------------------------------
# Table 2 in the paper's layout

#: (fold-score column, reference metric, display scale, higher is better, header)
TABLE2_COLUMNS: tuple[tuple[str, str, float, bool, str], ...] = (
    ("ssim", "SSIM", 100.0, True, "SSIM % ↑"), ("psnr", "PSNR", 1.0, True, "PSNR dB ↑"),
    ("perceptual", "LPIPS", 1e3, False, "LPIPS e-3 ↓"), ("l1", "l1", 1e3, False, "l1-error e-3 ↓"),
    *((f"ratio_{d}", f"ratio_{d}", 1.0, True, f"l1-ratio {d} ↑") for d in ("BraTS21", "MSLUB", "ATLAS", "WMH")),
)
SUBSTITUTE_HEADER = SUBSTITUTE_LABEL + " e-3 ↓"


def significance_stars(scores: pd.DataFrame, column: str, higher_is_better: bool, *, rounds: int, alpha: float,
                       seed: int = 0, alternative: Literal["one-sided", "two-sided"] = "one-sided") -> str | None:
    """The model of ``column`` that is significantly better than every other (paper §4.5.4), or ``None``.

    The best model by fold mean is tested against each other model with mlxtend's permutation test on the
    per-fold scores (one-sided in its favour, or two-sided); the star needs ``p < alpha`` every time, which
    needs enough folds (:func:`cddpm_lib.stats.min_p_value`: 4 against 4 at least at α = 0.05, one-sided).
    """
    per_model = {m: g[column].astype(float).dropna().to_numpy() for m, g in scores.groupby("model", sort=False)}
    per_model = {m: v for m, v in per_model.items() if v.size and np.isfinite(v).all()}
    if len(per_model) < 2 or min(v.size for v in per_model.values()) < 2:
        return None
    best = (max if higher_is_better else min)(per_model, key=lambda m: per_model[m].mean())
    side = "two-sided" if alternative == "two-sided" else "greater" if higher_is_better else "less"
    if any(stats.min_p_value(per_model[best].size, v.size, "two-sided" if side == "two-sided" else "greater")
           >= alpha for m, v in per_model.items() if m != best):
        return None  # too few folds: the exact test cannot reach α (an approximate p may dip below it by chance)
    for other, values in per_model.items():
        if other != best and stats.permutation_test(per_model[best], values, alternative=side,
                                                    rounds=rounds, seed=seed) >= alpha:
            return None
    return best


def table2_long(scores: pd.DataFrame, perceptual_kind: str, *, rounds: int = stats.ROUNDS,
                alpha: float = stats.ALPHA, alternative: Literal["one-sided", "two-sided"] = "one-sided"
                ) -> pd.DataFrame:
    """Our Table 2 as ``model, metric, mean, std, star`` (display units) beside the paper's (``tables``
    side-by-side layout). The perceptual column is ``LPIPS`` only with MedicalNet; the substitute gets its own,
    clearly labelled column and the LPIPS column stays empty ("n/a")."""
    ours = []
    for col, metric, scale, hib, header in TABLE2_COLUMNS:
        if col == "perceptual" and perceptual_kind != "lpips":
            if perceptual_kind == "none":
                continue
            header = SUBSTITUTE_HEADER
        best = significance_stars(scores, col, hib, rounds=rounds, alpha=alpha, alternative=alternative)
        for spec, g in scores.groupby("model", sort=False):
            mean, std = stats.mean_std(g[col].astype(float) * scale)
            ours.append({"model": spec, "metric": header, "mean": mean, "std": std, "star": best == spec})
    ours = pd.DataFrame(ours)
    paper = reference.table2()
    headers = {metric: header for _, metric, _, _, header in TABLE2_COLUMNS}
    spec_of = {}
    for spec in dict.fromkeys(scores["model"]):
        spec_of.setdefault(parse_model(spec)[0], spec)
    paper = paper.assign(model=paper["model"].map(lambda m: spec_of.get(m, m)), metric=paper["metric"].map(headers))
    sbs = tables.side_by_side(ours, paper, ["model", "metric"])
    sbs.insert(0, "row", [model_label(m) if m in spec_of.values() else reference.DISPLAY.get(m, m)
                          for m in sbs["model"]])
    return sbs


def _cell(r: pd.Series, digits: int) -> str:
    if r["metric"] == "LPIPS e-3 ↓" and pd.isna(r["mean"]):
        return f"n/a — MedicalNet weights not found (paper {tables.format_value(r['paper_mean'], r['paper_std'])})"
    return tables.format_cell(r, digits)


_REGION = {"brain": "the brain-mask voxels", "volume": "every voxel of the volume (the authors' code)"}


def _star_floor(cfg: ReconstructionQualityConfig) -> str:
    """Whether ``cfg.folds`` can give a star at all (the test's smallest p-value against α)."""
    n = len(cfg.folds)
    floor = stats.min_p_value(n, n, "two-sided" if cfg.alternative == "two-sided" else "greater")
    if floor >= cfg.alpha:
        return f"No star is possible with {n} fold(s) per row: the smallest p-value is {floor:.3g} ≥ α."
    return f"With {n} folds per row the smallest possible p-value is {floor:.3g}."


def write_table2(sbs: pd.DataFrame, notes: dict[int, str], cfg: ReconstructionQualityConfig) -> Path:
    """``results/table2.csv`` (numbers, paper beside) and ``table2.md`` (the paper's layout, how each metric was
    computed, the perceptual provenance); returns the CSV path."""
    lines = [
        f"- Kit: mean ± std over folds {list(cfg.folds)}; DDPM family with variant '{cfg.diffusion_variant}' "
        f"(t_test {reconstruct.variant_kwargs(cfg.diffusion_variant).get('t_test')}); `*`: best and "
        f"significantly better than every other row ({cfg.alternative} mlxtend permutation test on per-fold "
        f"scores, {cfg.permutation_rounds} rounds, α = {cfg.alpha}). " + _star_floor(cfg),
        f"- SSIM: Wang et al. (Gaussian σ = 1.5, data range 1), {cfg.ssim_dims.upper()} map averaged over "
        f"{_REGION[cfg.similarity_region]}; PSNR over {_REGION[cfg.similarity_region]} (data range 1); l1-error over "
        f"{_REGION[cfg.l1_error_region]}.",
        f"- l1-ratio: l1(unhealthy) / l1(healthy) with region '{cfg.l1_region}' (brain: annotation ∩ brain vs brain "
        "minus annotation), ratio of the means over test volumes with a non-empty annotation.",
        *(f"- Perceptual column, fold {k}: {note}" for k, note in notes.items()),
    ]
    md = tables.to_markdown(sbs, ["row"], ["metric"], cell=_cell, note="\n".join(lines),
                            title="Table 2 — reconstruction quality (IXI T2 test) and l1-ratio (unhealthy test sets)")
    stem = paths.results_dir(cfg.profile) / "table2"
    return tables.write_table(tables.to_wide(sbs, ["row"], ["metric"]), md, stem)[0]
