"""Stage ``segmentation`` (notebook 06): Table 3, permutation stars, Fig. 5 sweep, inference time (paper §4.3,
§4.5.3, §4.5.4, §5.4).

For every Table 3 row (model, SSL, ENS) and fold: reconstruct the unhealthy validation and test volumes of the
data sets of the model's weighting (T2 models: BraTS21, MSLUB; T1: ATLAS, WMH — ``datasets.EVAL_SETS``) into
``paths.recon_dir`` (:func:`reconstruct.reconstruct_dataset`, resumable), post-process the residuals
(:mod:`postprocessing`), choose the threshold on the pooled validation voxels, and score the test volumes
(:func:`evaluate_run`): DICE at that threshold, AUPRC, AUROC, the per-volume oracle DICE (extra, labelled) and
the DICE with the other threshold search (extra). Per-volume scores -> per-fold means -> mean ± std over folds.

A row whose checkpoint is missing is listed with ``status = "missing checkpoint"`` in the plan and in Table 3
(empty cells), never dropped silently. Thresh needs no checkpoint; it is deterministic, so it runs on the first
fold only (no ±, as in the paper) with ``polarity`` per weighting (``thresh_polarity``, see models.thresh).
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import ClassVar, Literal, Sequence

import numpy as np
import pandas as pd

from . import data, paths, reference
from .config import ConfigError, StageConfig
from .datasets import EVAL_SETS, model_id
from .fingerprint import module_fingerprint
from .metrics import dice, pooled_rank_stats, rank_stats
from .models import MODEL_NAMES, UADModel, build_model, load_model
from .postprocessing import PostprocessingSpec, apply_postprocessing, binarize, search_threshold, stack_pooled
from .reconstruct import load_recon, part_dirs, reconstruct_dataset, variant_kwargs, variant_name
from .runtime import default_device, stage_amp
from .volumes import load_nifti, save_dataframe

RUN_KEYS = ["row", "model", "ssl", "ens", "variant", "weighting", "fold", "model_id"]


def postprocessing_spec(cfg) -> PostprocessingSpec:
    """``step_order`` + threshold + CC filter from a stage config's post-processing fields (``step_order``,
    ``erosion_iterations``, ``erosion_mode``, ``median_size``, ``cc_min_size``); bad values -> ConfigError."""
    try:
        return PostprocessingSpec(steps=(*cfg.step_order, "threshold", "cc"),
                                  erosion_iterations=cfg.erosion_iterations, erosion_mode=cfg.erosion_mode,
                                  median_size=cfg.median_size, cc_min_size=cfg.cc_min_size)
    except ValueError as exc:
        raise ConfigError(f"post-processing parameters: {exc}") from exc


@dataclasses.dataclass(frozen=True)
class SegmentationConfig(StageConfig):
    """Stage ``segmentation`` (notebook 06); defaults are the paper's settings (§4.3, §4.4, §4.5.4)."""

    STAGE: ClassVar[str] = "segmentation"  # profiles/<STAGE>.yaml resolves None parameters

    profile: str = "quick"
    source: str = "synthetic"
    models: tuple[str, ...] = ("thresh", "fanogan", "vae", "svae", "ae", "dae", "ddpm", "pddpm", "cddpm")
    ssl: bool = True
    ens: bool = True
    folds: tuple[int, ...] = (0, 1, 2, 3, 4)
    weightings: tuple[str, ...] = ("t2", "t1")
    datasets: tuple[str, ...] = ("BraTS21", "MSLUB", "ATLAS", "WMH")
    t_test: int = 500
    t_test_sweep: tuple[int, ...] = (100, 200, 300, 400, 500, 600, 700, 800, 900)
    sweep_cddpm_ssl: bool = True
    max_batch: int = 64
    device: str = "auto"
    amp: Literal["none", "bf16", "fp16"] = "none"  # reconstruct under autocast (runtime.effective_amp)
    seed: int = 0
    max_volumes: int = 0
    threshold_search: Literal["bisection", "exact"] = "bisection"
    bisection_steps: int = 10
    auprc_region: Literal["volume", "brain"] = "volume"
    step_order: tuple[str, ...] = ("erode", "median")
    erosion_iterations: int = 3
    erosion_mode: Literal["slice", "3d"] = "slice"
    median_size: int = 5
    cc_min_size: int = 8
    thresh_polarity: dict = dataclasses.field(default_factory=lambda: {"t2": 1, "t1": -1})
    permutation_rounds: int = 10_000
    alpha: float = 0.05
    alternative: Literal["one-sided", "two-sided"] = "one-sided"
    target_row: str = "cDDPM+SSL+ENS"
    star_baselines: Literal["other_models", "all_rows"] = "other_models"
    timing_volumes: int = 5
    n_nifti: int = 3
    overwrite: bool = False

    def validate(self) -> None:
        paths.check_profile(self.profile)
        paths.check_source(self.source)
        bad = [m for m in self.models if m not in MODEL_NAMES]
        if bad:
            raise ConfigError(f"parameter 'models': unknown {bad}; known: {list(MODEL_NAMES)}")
        if any(w not in EVAL_SETS for w in self.weightings):
            raise ConfigError(f"parameter 'weightings': use values from {list(EVAL_SETS)}")
        known = [d for s in EVAL_SETS.values() for d in s]
        if any(d not in known for d in self.datasets):
            raise ConfigError(f"parameter 'datasets': use values from {known}")
        if any(w not in self.thresh_polarity or self.thresh_polarity[w] not in (1, -1) for w in self.weightings):
            raise ConfigError(f"parameter 'thresh_polarity': give +1 or -1 for each weighting {list(self.weightings)}, "
                              f"got {self.thresh_polarity}")
        if not self.folds or min(self.folds) < 0:
            raise ConfigError("parameter 'folds': give at least one fold index >= 0")
        if self.max_batch < 1 or self.max_volumes < 0 or self.timing_volumes < 0 or self.n_nifti < 0:
            raise ConfigError("max_batch >= 1 and max_volumes, timing_volumes, n_nifti >= 0 are required")
        if any(not 0 < t <= 1000 for t in (self.t_test, *self.t_test_sweep)):
            raise ConfigError("parameters 't_test'/'t_test_sweep': noise levels must lie in 1..T (1000)")
        self.spec()  # validates the post-processing settings

    def spec(self) -> PostprocessingSpec:
        """The post-processing pipeline of this run (paper §4.3 with the authors' defaults)."""
        return postprocessing_spec(self)


# --------------------------------------------------------------------------------------------------------------
# Plan: which (row, weighting, fold) runs exist


def table3_rows(cfg: SegmentationConfig) -> list[reference.Row]:
    """Table 3 rows (paper order) for the configured models, with SSL/ENS rows when enabled."""
    return [r for r in reference.TABLE3_ROWS if r.model in cfg.models and (cfg.ssl or not r.ssl)
            and (cfg.ens or not r.ens)]


def checkpoint_path(profile: str, mid: str, fold: int) -> Path:
    return paths.checkpoint_dir(profile, mid, fold) / "best.pt"


def _run(cfg, row: reference.Row, weighting: str, fold: int, variant: str, purpose: str) -> dict:
    mid = model_id(row.model, weighting, row.ssl)
    ckpt = checkpoint_path(cfg.profile, mid, fold)
    status = "no training needed" if row.model == "thresh" else ("ok" if ckpt.exists() else "missing checkpoint")
    return {"row": reference.row_label(*row), "model": row.model, "ssl": row.ssl, "ens": row.ens,
            "variant": variant, "weighting": weighting, "fold": int(fold), "model_id": mid,
            "checkpoint": "" if row.model == "thresh" else str(ckpt), "status": status, "purpose": purpose}


def plan_runs(cfg: SegmentationConfig) -> pd.DataFrame:
    """Every run of the stage: Table 3 rows × weightings × folds (Thresh: first fold), plus the Fig. 5 sweep
    (DDPM, pDDPM, cDDPM at each ``t_test_sweep``); ``status`` says whether its checkpoint exists."""
    runs = []
    for w in cfg.weightings:
        for row in table3_rows(cfg):
            for fold in (cfg.folds[:1] if row.model == "thresh" else cfg.folds):
                runs.append(_run(cfg, row, w, fold, variant_name(row.model, row.ens, cfg.t_test), "table3"))
        for m in [m for m in reference.DIFFUSION_MODELS if m in cfg.models]:
            row = reference.Row(m, ssl=(m == "cddpm" and cfg.sweep_cddpm_ssl and cfg.ssl))
            for fold in cfg.folds:
                for t in cfg.t_test_sweep:
                    runs.append(_run(cfg, row, w, fold, f"t{t}", "sweep"))
    df = pd.DataFrame(runs)
    return df.drop_duplicates(subset=RUN_KEYS, keep="first").reset_index(drop=True)


# --------------------------------------------------------------------------------------------------------------
# Reconstruction of the evaluation sets


def eval_rows(cfg: SegmentationConfig, dataset: str, split: str, weighting: str) -> pd.DataFrame:
    """Manifest rows of an unhealthy set/split (first ``max_volumes`` when set); empty when the set is absent."""
    df = data.read_manifest(paths.preprocessed_manifest_path(cfg.source, cfg.profile))
    try:
        rows = data.select_rows(df, dataset=dataset, split=split, fold=None, weighting=weighting)
    except ValueError:
        return df.iloc[0:0]
    rows = rows.sort_values("subject_id", kind="stable").reset_index(drop=True)
    return rows.head(cfg.max_volumes) if cfg.max_volumes else rows


def build_run_model(cfg: SegmentationConfig, run: pd.Series, image_size: tuple[int, int]) -> UADModel:
    """Thresh from the registry (polarity per weighting), every other model from its ``best.pt``."""
    if run["model"] == "thresh":
        return build_model("thresh", image_size=image_size, polarity=int(cfg.thresh_polarity[run["weighting"]]))
    return load_model(run["checkpoint"])


def _run_relative_npz(table: pd.DataFrame, profile: str) -> pd.DataFrame:
    """``table`` with its ``npz`` file paths relative to ``runs/<profile>`` (:func:`paths.run_relative`)."""
    return table.assign(npz=[paths.run_relative(p, profile) for p in table["npz"]])


def reconstruct_all(cfg: SegmentationConfig, plan: pd.DataFrame, log=print) -> pd.DataFrame:
    """Reconstruct val + test of every available run (one model load per checkpoint) -> the index of npz files,
    also saved as ``results/recon_index.csv``: ``RUN_KEYS``, ``purpose`` (``table3`` or the Fig. 5 ``sweep``),
    ``split``, ``weights`` (fingerprint of the weights that reconstructed, :func:`module_fingerprint`), ``amp``
    (the precision that ran, after any float32 fallback), ``subject_id``, ``dataset``, ``npz`` (the file; in the
    CSV relative to ``runs/<profile>``, :func:`paths.run_relative`), ``seconds`` (model time) and ``reused``
    (an existing file kept)."""
    device = default_device(cfg.device)
    amp = stage_amp(cfg.amp, device, log, "[segmentation]")  # the precision that runs, recorded with each file
    records = []
    todo = plan[plan["status"] != "missing checkpoint"]
    for (mid, fold), runs in todo.groupby(["model_id", "fold"], sort=False):
        weighting = runs.iloc[0]["weighting"]
        sets = [d for d in EVAL_SETS[weighting] if d in cfg.datasets]
        rows = {(d, s): eval_rows(cfg, d, s, weighting) for d in sets for s in ("val", "test")}
        first = next((r for r in rows.values() if len(r)), None)
        if first is None:
            log(f"[segmentation] {mid}: no evaluation volumes for {sets}")
            continue
        image_size = tuple(load_nifti(first.iloc[0][weighting])[0].shape[:2])
        model = build_run_model(cfg, runs.iloc[0], image_size).to(device).eval()
        weights = module_fingerprint(model)  # which weights the thresholds belong to (checked by `score`)
        for _, run in runs.iterrows():
            for (dataset, split), sel in rows.items():
                out = paths.recon_dir(cfg.profile, mid, fold, run["variant"], dataset)
                idx = reconstruct_dataset(model, sel, weighting, out, device=device, max_batch=cfg.max_batch,
                                          overwrite=cfg.overwrite, seed=cfg.seed, amp=amp,
                                          parts=part_dirs(cfg.profile, mid, fold, run["variant"], dataset),
                                          **variant_kwargs(run["variant"]))
                for rec in idx.to_dict("records"):
                    records.append({**{k: run[k] for k in RUN_KEYS}, "purpose": run["purpose"], "split": split,
                                    "weights": weights, "amp": amp, **rec})
            log(f"[segmentation] reconstructed {run['row']} {run['variant']} fold {fold} ({weighting})")
        del model
    index = pd.DataFrame(records)
    if len(index):  # file paths relative to runs/<profile>: a moved run folder still finds its reconstructions
        save_dataframe(_run_relative_npz(index, cfg.profile), paths.results_dir(cfg.profile) / "recon_index.csv")
    return index


# --------------------------------------------------------------------------------------------------------------
# Scoring one run on one data set


def continuous_maps(npz_paths: Sequence[str], spec: PostprocessingSpec, median_backend: str
                    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Post-processed residuals before binarisation, annotations and brain masks: ``[N, X, Y, Z]`` each."""
    maps, segs, masks = [], [], []
    cont = dataclasses.replace(spec, steps=spec.continuous_steps)
    for p in npz_paths:
        z = load_recon(p)
        maps.append(apply_postprocessing(z["anomaly"], z["brain_mask"], cont, median_backend=median_backend))
        segs.append(z["seg"] > 0)
        masks.append(z["brain_mask"] > 0)
    return np.stack(maps), np.stack(segs), np.stack(masks)


def median_backend_for(device: str) -> str:
    return "cuda" if default_device(device).type == "cuda" else "numpy"


def evaluate_run(val_paths: Sequence[str], test_paths: Sequence[str], spec: PostprocessingSpec, *,
                 method: str = "bisection", steps: int = 10, region: str = "volume", median_backend: str = "numpy",
                 extras: bool = True, cache: dict | None = None) -> tuple[pd.DataFrame, dict]:
    """Threshold on the pooled validation voxels, then per test volume: ``dice`` (at that threshold, CC filter if
    in ``spec``), ``auprc``, ``auroc`` and — ``extras`` — ``dice_other`` (the other search's threshold) and
    ``oracle_dice`` (best threshold of each volume, no CC). Returns ``(per-volume frame, run info)``.

    ``cache``: a dict kept by the caller across calls on the same files; continuous maps are computed once per
    distinct list of continuous steps (the ablation's full and no-CC pipelines share them)."""
    if not len(val_paths) or not len(test_paths):
        raise ValueError("evaluate_run: needs validation and test volumes")

    def maps(files):
        if cache is None:
            return continuous_maps(files, spec, median_backend)
        key = (tuple(files), spec.continuous_steps)
        if key not in cache:
            cache[key] = continuous_maps(files, spec, median_backend)
        return cache[key]

    v_maps, v_segs, _ = maps(val_paths)
    thr, val_dice = search_threshold(stack_pooled(v_maps), stack_pooled(v_segs), method, steps)
    other = "exact" if method == "bisection" else "bisection"
    thr_other = search_threshold(stack_pooled(v_maps), stack_pooled(v_segs), other, steps)[0] if extras else None
    del v_maps, v_segs
    t_maps, t_segs, t_masks = maps(test_paths)
    ranks = rank_stats(t_maps, t_segs, t_masks, region=region)
    pred = np.stack([binarize(m, thr, spec) for m in t_maps])
    out = pd.DataFrame({"npz": list(test_paths), "dice": dice(pred, t_segs), "auprc": ranks.ap,
                        "auroc": ranks.auroc, "lesion_voxels": t_segs.reshape(len(t_segs), -1).sum(1)})
    info = {"threshold": thr, "threshold_method": method, "val_dice": val_dice}
    if extras:
        out["dice_other"] = dice(np.stack([binarize(m, thr_other, spec) for m in t_maps]), t_segs)
        out["oracle_dice"] = ranks.best_dice
        info.update(threshold_other=thr_other,
                    pooled_auprc=float(pooled_rank_stats(t_maps, t_segs, t_masks, region=region).ap[0]))
    return out, info


def score_all(cfg: SegmentationConfig, index: pd.DataFrame, log=print) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Score every (run, data set): per-volume scores and per-run info (threshold, validation DICE, pooled
    AUPRC); saved as ``results/segmentation_per_volume.csv`` and ``segmentation_runs.csv``."""
    spec, backend = cfg.spec(), median_backend_for(cfg.device)
    per_volume, runs = [], []
    if index.empty:
        log("[segmentation] nothing to score: no reconstructions (no checkpoints and no evaluation volumes?)")
        return pd.DataFrame(), pd.DataFrame()
    for key, grp in index.groupby([*RUN_KEYS, "purpose", "dataset"], sort=False):
        meta = dict(zip([*RUN_KEYS, "purpose", "dataset"], key))
        val, test = grp[grp["split"] == "val"], grp[grp["split"] == "test"]
        if val.empty or test.empty:
            log(f"[segmentation] {meta['row']} {meta['dataset']}: no val or test volumes, skipped")
            continue
        scores, info = evaluate_run(val["npz"].tolist(), test["npz"].tolist(), spec, method=cfg.threshold_search,
                                    steps=cfg.bisection_steps, region=cfg.auprc_region, median_backend=backend,
                                    extras=meta["purpose"] == "table3")
        scores = scores.merge(test[["npz", "subject_id"]], on="npz")
        per_volume.append(scores.assign(**meta))
        recorded = {k: grp[k].iloc[0] for k in ("weights", "amp") if k in grp}  # older indexes lack them
        runs.append({**meta, **info, "n_val": len(val), "n_test": len(test), "auprc_region": cfg.auprc_region,
                     **recorded})
    pv = pd.concat(per_volume, ignore_index=True) if per_volume else pd.DataFrame()
    info = pd.DataFrame(runs)
    if len(pv):
        save_dataframe(_run_relative_npz(pv, cfg.profile),
                       paths.results_dir(cfg.profile) / "segmentation_per_volume.csv")
        save_dataframe(info, paths.results_dir(cfg.profile) / "segmentation_runs.csv")
    return pv, info


def continuous_map_fn(cfg: SegmentationConfig):
    """``f(anomaly, brain_mask) -> map``: the continuous post-processing of ``cfg`` (figures, NIfTI export)."""
    spec = cfg.spec()
    cont = dataclasses.replace(spec, steps=spec.continuous_steps)
    backend = median_backend_for(cfg.device)
    return lambda anomaly, mask: apply_postprocessing(anomaly, mask, cont, median_backend=backend)
