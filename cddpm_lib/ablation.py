"""Stage ``postprocessing_ablation`` (notebook 07): supplement Table 4 — DICE with one post-processing step
removed (CC: connected components, MF: median filter, BE: brain-mask erosion), from the saved reconstructions only.

Rows as in the paper: DAE, and the ENS variants of DDPM, cDDPM (with SSL) and pDDPM (parameters ``ens`` and
``cddpm_ssl``). For each (row, fold, data set) the full pipeline of stage 06 and each reduced pipeline
(``PostprocessingSpec.without``) are run on the same npz files: the threshold is searched again on the validation
set with the reduced pipeline (the paper's "excluding individual post-processing steps from the evaluation
protocol"), then the test DICE is averaged over volumes. ``delta`` is ours minus our full pipeline (per-fold means
averaged over folds), beside the paper's bracket. Without BE no brain mask is applied (as in the authors' code).
No model is run: the stage reads ``results/recon_index.csv`` written by stage ``segmentation``.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import ClassVar, Literal

import pandas as pd

from . import figures, paths, reference
from .config import ConfigError, StageConfig
from .postprocessing import ABLATION_STEPS, PostprocessingSpec
from .segmentation import evaluate_run, median_backend_for, postprocessing_spec
from .tables import side_by_side, summarize, to_markdown, to_wide, write_table
from .volumes import save_dataframe


@dataclasses.dataclass(frozen=True)
class PostprocessingAblationConfig(StageConfig):
    """Stage ``postprocessing_ablation`` (notebook 07); post-processing defaults as stage 06 (paper §4.3)."""

    STAGE: ClassVar[str] = "postprocessing_ablation"  # profiles/<STAGE>.yaml resolves None parameters

    profile: str = "quick"
    source: str = "synthetic"
    models: tuple[str, ...] = ("dae", "ddpm", "cddpm", "pddpm")
    ens: bool = True
    cddpm_ssl: bool = True
    folds: tuple[int, ...] = (0, 1, 2, 3, 4)
    datasets: tuple[str, ...] = ("BraTS21", "MSLUB", "ATLAS", "WMH")
    removed: tuple[str, ...] = ("CC", "MF", "BE")
    threshold_search: Literal["bisection", "exact"] = "bisection"
    bisection_steps: int = 10
    step_order: tuple[str, ...] = ("erode", "median")
    erosion_iterations: int = 3
    erosion_mode: Literal["slice", "3d"] = "slice"
    median_size: int = 5
    cc_min_size: int = 8
    device: str = "auto"

    def validate(self) -> None:
        paths.check_profile(self.profile)
        paths.check_source(self.source)
        bad = [r for r in self.removed if r not in ABLATION_STEPS]
        if bad:
            raise ConfigError(f"parameter 'removed': unknown step(s) {bad}; use {list(ABLATION_STEPS)}")
        bad = [m for m in self.models if m not in ("dae", "ddpm", "cddpm", "pddpm")]
        if bad:
            raise ConfigError(f"parameter 'models': Table 4 has DAE, DDPM, cDDPM and pDDPM, not {bad}")
        self.spec()

    def spec(self) -> PostprocessingSpec:
        return postprocessing_spec(self)


def ablation_rows(cfg: PostprocessingAblationConfig) -> list[reference.Row]:
    """The Table 4 rows for the configured models (DDPM family: ENS if ``ens``; cDDPM with SSL if ``cddpm_ssl``)."""
    rows = []
    for m in cfg.models:
        diffusion = m in reference.DIFFUSION_MODELS
        rows.append(reference.Row(m, ssl=(m == "cddpm" and cfg.cddpm_ssl), ens=diffusion and cfg.ens))
    return rows


def load_index(cfg: PostprocessingAblationConfig) -> pd.DataFrame:
    """``results/recon_index.csv`` of stage 06, restricted to the Table 4 rows, folds and data sets."""
    path = paths.results_dir(cfg.profile) / "recon_index.csv"
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist: run stage 'segmentation' (notebook 06) first")
    index = pd.read_csv(path, dtype={"subject_id": str})
    index["npz"] = [str(paths.from_run_relative(p, cfg.profile)) for p in index["npz"]]
    labels = {reference.row_label(*r) for r in ablation_rows(cfg)}
    keep = (index["purpose"] == "table3") & index["row"].isin(labels) & index["fold"].isin(cfg.folds) \
        & index["dataset"].isin(cfg.datasets)
    return index[keep].reset_index(drop=True)


def run_ablation(cfg: PostprocessingAblationConfig, index: pd.DataFrame, log=print) -> pd.DataFrame:
    """Per (row, fold, data set, removed ∈ {none, CC, MF, BE}): mean test DICE (%) and the threshold used;
    saved as ``results/table4_per_fold.csv``."""
    spec, backend = cfg.spec(), median_backend_for(cfg.device)
    out = []
    keys = ["row", "model", "ssl", "ens", "fold", "dataset"]
    for key, grp in index.groupby(keys, sort=False):
        val, test = grp[grp["split"] == "val"]["npz"].tolist(), grp[grp["split"] == "test"]["npz"].tolist()
        if not val or not test:
            continue
        cache: dict = {}
        for removed in ("none", *cfg.removed):
            reduced = spec if removed == "none" else spec.without(removed)
            scores, info = evaluate_run(val, test, reduced, method=cfg.threshold_search, steps=cfg.bisection_steps,
                                        median_backend=backend, extras=False, cache=cache)
            out.append({**dict(zip(keys, key)), "removed": removed, "steps": " → ".join(reduced.steps),
                        "value": 100.0 * float(scores["dice"].mean()), "threshold": info["threshold"]})
        log(f"[ablation] {key[0]} fold {key[4]} {key[5]}: done")
    df = pd.DataFrame(out)
    if len(df):
        save_dataframe(df, paths.results_dir(cfg.profile) / "table4_per_fold.csv")
    return df


def table4(cfg: PostprocessingAblationConfig, per_fold: pd.DataFrame) -> pd.DataFrame:
    """Long Table 4: ``model, ssl, ens, removed, dataset, mean, std, delta`` (ours; ``removed = "none"`` is the
    full pipeline) beside the paper's ``paper_mean, paper_std, paper_delta``."""
    keys = ["model", "ssl", "ens", "removed", "dataset"]
    ours = summarize(per_fold, keys) if len(per_fold) else pd.DataFrame(columns=[*keys, "mean", "std", "n"])
    full = ours[ours["removed"] == "none"].set_index(["model", "ssl", "ens", "dataset"])["mean"]
    ours["delta"] = [m - full.get((a, b, c, d), float("nan")) if r != "none" else 0.0
                     for a, b, c, r, d, m in zip(ours["model"], ours["ssl"], ours["ens"], ours["removed"],
                                                 ours["dataset"], ours["mean"])]
    paper = reference.table4()
    paper = paper[paper["model"].isin(cfg.models) & paper["dataset"].isin(cfg.datasets)
                  & paper["removed"].isin(cfg.removed)]
    t3 = reference.table3()
    full_paper = t3[(t3["metric"] == "DICE")].merge(paper[["model", "ssl", "ens"]].drop_duplicates())
    full_paper = full_paper[full_paper["dataset"].isin(cfg.datasets)].assign(removed="none", delta=0.0)
    paper = pd.concat([full_paper[paper.columns], paper], ignore_index=True)
    sbs = side_by_side(ours, paper, keys)
    sbs = sbs.merge(ours[keys + ["delta"]], on=keys, how="left").merge(
        paper[keys + ["delta"]].rename(columns={"delta": "paper_delta"}), on=keys, how="left")
    sbs.insert(0, "row", [reference.row_label(m, s, e) for m, s, e in zip(sbs["model"], sbs["ssl"], sbs["ens"])])
    order = {m: i for i, m in enumerate(cfg.models)}
    steps = {r: i for i, r in enumerate(("none", *cfg.removed))}
    sbs["_o"] = [(order.get(m, 99), steps.get(r, 99)) for m, r in zip(sbs["model"], sbs["removed"])]
    return sbs.sort_values("_o", kind="stable").drop(columns="_o").reset_index(drop=True)


def _cell(r: pd.Series, digits: int) -> str:
    ours = "–" if pd.isna(r["mean"]) else f"{r['mean']:.{digits}f}±{r['std']:.{digits}f} ({r['delta']:+.{digits}f})"
    if pd.isna(r.get("paper_mean")):
        return ours
    return f"{ours} (paper {r['paper_mean']:.{digits}f}±{r['paper_std']:.{digits}f} ({r['paper_delta']:+.2f}))"


def write_table4(cfg: PostprocessingAblationConfig, sbs: pd.DataFrame) -> tuple[Path, Path]:
    """``results/table4.{csv,md}``: one line per (row, removed step), one column per data set."""
    wide = to_wide(sbs, ["row", "removed"], ["dataset"], extra=("delta", "paper_delta"))
    note = (f"DICE % with one step removed (none = full pipeline {' → '.join(cfg.spec().steps)}); brackets: change "
            f"against the full pipeline. Threshold re-searched ({cfg.threshold_search}) on the validation set for "
            f"each reduced pipeline. Mean ± std over folds {list(cfg.folds)}.")
    md = to_markdown(sbs, ["row", "removed"], ["dataset"], title="Table 4 — post-processing ablation", note=note,
                     cell=_cell)
    return write_table(wide, md, paths.results_dir(cfg.profile) / "table4")


def figure(cfg: PostprocessingAblationConfig, sbs: pd.DataFrame) -> list[Path]:
    """Bar chart of the deltas, ours beside the paper's -> ``figures/table4_deltas.{png,pdf}``."""
    part = sbs[(sbs["removed"] != "none") & sbs["delta"].notna()]
    if part.empty:
        return []
    return figures.save(figures.table4_deltas(part), paths.figures_dir(cfg.profile) / "table4_deltas")
