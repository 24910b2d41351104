"""Outputs of stage ``segmentation`` (notebook 06): Table 3 with the paper's values and permutation stars,
inference time (§5.4), Figs. 4–6 and NIfTI exports, from the scores of :mod:`cddpm_lib.segmentation`.

- :func:`fold_scores` — per-volume scores -> per-fold means (%), the unit of Table 3 and of the paper's tests;
- :func:`significance` — permutation tests of ``target_row`` against the other models' rows
  (:func:`star_baselines`): per-fold (mlxtend, paper §4.5.4) and, extra, paired per-volume;
- :func:`table3` / :func:`write_table3` — mean ± std over folds beside the paper's values, ``*`` where the target
  beat every other row, and each row's checkpoint status (missing rows stay in the table);
- :func:`inference_times` — DDPM, pDDPM, cDDPM timed back to back in one process, ratios beside the paper's;
- :func:`figure4`, :func:`figure5`, :func:`figure6` and :func:`export_nifti`.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from . import figures, paths, reference, stats
from .datasets import EVAL_SETS
from .models import load_model
from .postprocessing import binarize
from .reconstruct import load_recon, time_volumes, variant_kwargs
from .runtime import default_device, effective_amp
from .segmentation import SegmentationConfig, continuous_map_fn, eval_rows, table3_rows
from .stats import compare_with_baselines, stars
from .tables import side_by_side, summarize, to_markdown, to_wide, write_table
from .volumes import load_nifti, save_dataframe, save_nifti

METRICS = {"DICE": "dice", "AUPRC": "auprc"}


def fold_scores(per_volume: pd.DataFrame, purpose: str | None = "table3") -> pd.DataFrame:
    """Per (run, data set): the mean over test volumes (NaN DICE of empty-empty volumes skipped, as the authors)
    of DICE, AUPRC and the extras, in % -> long frame ``row, model, ssl, ens, variant, dataset, fold, metric,
    value`` (``purpose=None``: every run)."""
    keys = ["row", "model", "ssl", "ens", "variant", "dataset", "fold"]
    if per_volume.empty:
        return pd.DataFrame(columns=[*keys, "metric", "value"])
    pv = per_volume if purpose is None else per_volume[per_volume["purpose"] == purpose]
    cols = {"DICE": "dice", "AUPRC": "auprc", "AUROC": "auroc", "DICE_other_threshold": "dice_other",
            "oracle_DICE": "oracle_dice"}
    cols = {k: v for k, v in cols.items() if v in pv.columns}
    means = pv.groupby(keys, sort=False)[list(cols.values())].mean().reset_index()  # pandas mean skips NaN
    long = means.melt(id_vars=keys, value_vars=list(cols.values()), var_name="metric", value_name="value")
    long["metric"] = long["metric"].map({v: k for k, v in cols.items()})
    long["value"] = long["value"] * 100.0
    return long


def _side(cfg: SegmentationConfig) -> str:
    return "greater" if cfg.alternative == "one-sided" else "two-sided"


def star_baselines(cfg: SegmentationConfig, folds: pd.DataFrame) -> list[str]:
    """Rows the target row is tested against for its star. Paper Table 3: "superior performance with statistical
    significance compared to all baselines" — the other models (AE, VAE, …, DDPM, pDDPM), not the target's own
    ablation rows (cDDPM, cDDPM+SSL: the paper stars 53.37 ± 1.80 beside cDDPM+SSL's 52.35 ± 0.95, which five
    folds cannot separate); ``star_baselines="all_rows"`` tests those as well."""
    model_of = folds.drop_duplicates("row").set_index("row")["model"]
    if cfg.target_row not in model_of:
        return []
    return [r for r in model_of.index if r != cfg.target_row
            and (cfg.star_baselines == "all_rows" or model_of[r] != model_of[cfg.target_row])]


def significance(cfg: SegmentationConfig, folds: pd.DataFrame, per_volume: pd.DataFrame) -> pd.DataFrame:
    """Permutation tests of ``target_row`` against every star baseline (:func:`star_baselines`) per data set and
    metric (``cfg.alternative``; one-sided: H1 is "target better"): on per-fold scores (mlxtend, the paper;
    Thresh, scored once because it is deterministic, counts with its value in every fold) and, as an extra, paired
    on per-volume scores averaged over folds."""
    baselines = star_baselines(cfg, folds)
    if not baselines:
        return pd.DataFrame(columns=["dataset", "metric", "target", "baseline", "p_value", "min_p_value",
                                     "significant", "unit"])
    constant = [r for r in baselines if (folds.loc[folds["row"] == r, "model"] == "thresh").all()]
    tab = folds[folds["metric"].isin(list(METRICS))]
    per_fold = compare_with_baselines(tab, cfg.target_row, baselines, unit_col="fold",
                                      rounds=cfg.permutation_rounds, alpha=cfg.alpha, seed=cfg.seed,
                                      alternative=_side(cfg), constant_baselines=constant)
    pv = per_volume[per_volume["purpose"] == "table3"]
    vol = (pv.groupby(["row", "dataset", "subject_id"], sort=False)[list(METRICS.values())].mean() * 100.0)
    vol = vol.reset_index().melt(id_vars=["row", "dataset", "subject_id"], var_name="metric", value_name="value")
    vol["metric"] = vol["metric"].map({v: k for k, v in METRICS.items()})
    per_vol = compare_with_baselines(vol, cfg.target_row, baselines, unit_col="subject_id", paired=True,
                                     rounds=cfg.permutation_rounds, alpha=cfg.alpha, seed=cfg.seed,
                                     alternative=_side(cfg))
    tests = pd.concat([per_fold.assign(unit="fold (paper)"), per_vol.assign(unit="volume, paired (extra)")],
                      ignore_index=True)
    save_dataframe(tests, paths.results_dir(cfg.profile) / "table3_pvalues.csv")
    return tests


def table3(cfg: SegmentationConfig, plan: pd.DataFrame, folds: pd.DataFrame, tests: pd.DataFrame
           ) -> pd.DataFrame:
    """Long Table 3 (ours beside the paper's): ``model, ssl, ens, dataset, metric, mean, std, star, paper_*,
    diff, status``; rows without results keep the paper's values and their plan status."""
    keys = ["row", "model", "ssl", "ens", "dataset", "metric"]
    ours = summarize(folds[folds["metric"].isin(list(METRICS))], keys) if len(folds) else \
        pd.DataFrame(columns=[*keys, "mean", "std", "n"])
    ours["star"] = False
    if len(tests):
        st = stars(tests[tests["unit"] == "fold (paper)"], alpha=cfg.alpha)
        for _, s in st[st["star"]].iterrows():
            ours.loc[(ours["row"] == s["target"]) & (ours["dataset"] == s["dataset"])
                     & (ours["metric"] == s["metric"]), "star"] = True
    paper = reference.table3()
    rows = table3_rows(cfg)
    paper = paper[[reference.Row(m, s, e) in rows for m, s, e in zip(paper["model"], paper["ssl"], paper["ens"])]]
    paper = paper[paper["dataset"].isin(cfg.datasets)]
    sbs = side_by_side(ours.drop(columns=["row"]), paper, ["model", "ssl", "ens", "dataset", "metric"])
    sbs.insert(0, "row", [reference.row_label(m, s, e) for m, s, e in zip(sbs["model"], sbs["ssl"], sbs["ens"])])
    status = plan[plan["purpose"] == "table3"].groupby("row")["status"].agg(
        lambda s: "ok" if (s != "missing checkpoint").all() else
        f"missing checkpoint ({(s == 'missing checkpoint').sum()} of {len(s)} runs)")
    sbs["status"] = sbs["row"].map(status).fillna("not run")
    return sbs


def star_note(cfg: SegmentationConfig, tests: pd.DataFrame | None = None) -> str:
    """What the ``*`` of Table 3 means here, and whether these folds could give one at all."""
    against = "every other model's row" if cfg.star_baselines == "other_models" else "every other row"
    side = cfg.alternative
    note = (f"`*` = {cfg.target_row} significantly better than {against} ({side} permutation test on per-fold "
            f"scores, Thresh's deterministic score counted in every fold, {cfg.permutation_rounds} rounds, "
            f"α = {cfg.alpha}).")
    if tests is not None and "min_p_value" in tests:
        floors = tests.loc[tests["unit"] == "fold (paper)", "min_p_value"].dropna()
        if len(floors) and floors.max() >= cfg.alpha:
            note += (f" No star is possible with these folds: the smallest p-value the test can reach is "
                     f"{floors.max():.3g} ≥ α (5 folds against 5 reach {stats.min_p_value(5, 5, _side(cfg)):.3g}).")
    return note


def write_table3(cfg: SegmentationConfig, sbs: pd.DataFrame, folds: pd.DataFrame | None = None,
                 tests: pd.DataFrame | None = None) -> tuple[Path, Path]:
    """``results/table3.{csv,md}`` in the paper's layout with the paper's values and the difference (and the
    per-fold scores behind it as ``segmentation_per_fold.csv``); ``tests``: :func:`significance`'s, for the note
    on whether a star was possible."""
    if folds is not None and len(folds):
        save_dataframe(folds, paths.results_dir(cfg.profile) / "segmentation_per_fold.csv")
    wide = to_wide(sbs, ["row", "status"], ["dataset", "metric"])
    note = (f"Mean ± std over folds {list(cfg.folds)} (Thresh: first fold only), DICE/AUPRC in %. Threshold: "
            f"{cfg.threshold_search} search on the pooled unhealthy validation voxels; AUPRC per volume over "
            f"{'all voxels of the volume' if cfg.auprc_region == 'volume' else 'brain voxels'}; post-processing "
            f"{' → '.join(cfg.spec().steps)}. " + star_note(cfg, tests))
    md = to_markdown(sbs, ["row", "status"], ["dataset", "metric"], title="Table 3 — segmentation", note=note)
    return write_table(wide, md, paths.results_dir(cfg.profile) / "table3")


def extras_table(cfg: SegmentationConfig, folds: pd.DataFrame, runs: pd.DataFrame) -> pd.DataFrame:
    """Extras beside Table 3 (not in the paper), mean ± std over folds per row and data set: AUROC, the per-volume
    oracle DICE (each volume at its own best threshold), the DICE with the other threshold search, and the
    AUPRC of all test voxels pooled; ``results/table3_extras.{csv,md}``."""
    extra = folds[~folds["metric"].isin(list(METRICS))]
    if len(runs) and "pooled_auprc" in runs:
        pooled = runs[runs["purpose"] == "table3"][["row", "model", "ssl", "ens", "variant", "dataset", "fold",
                                                    "pooled_auprc"]]
        extra = pd.concat([extra, pooled.rename(columns={"pooled_auprc": "value"})
                          .assign(metric="pooled_AUPRC", value=lambda d: d["value"] * 100.0)], ignore_index=True)
    if extra.empty:
        return extra
    table = summarize(extra, ["row", "dataset", "metric"])
    wide = table.pivot_table(index="row", columns=["dataset", "metric"], values=["mean", "std"], sort=False)
    wide.columns = [f"{d} {m} {'±' if k == 'std' else ''}".strip() for k, d, m in wide.columns]
    wide = wide.reset_index()
    other = "exact" if cfg.threshold_search == "bisection" else "bisection"
    md = (f"## Table 3 extras (not in the paper)\n\nAUROC, oracle DICE (best threshold per volume), DICE with the "
          f"{other} threshold search, pooled AUPRC; in %, mean ± std over folds.\n\n"
          + to_markdown(table.assign(paper_mean=np.nan), ["row"], ["dataset", "metric"]))
    write_table(wide, md, paths.results_dir(cfg.profile) / "table3_extras")
    return table


def inference_times(cfg: SegmentationConfig, plan: pd.DataFrame, log=print) -> pd.DataFrame:
    """Seconds per volume of DDPM, pDDPM and cDDPM with a single ``t_test`` and the ensemble, measured back to
    back in this process on the first ``timing_volumes`` test volumes (first fold, first weighting), with
    cDDPM's relative change against each and the paper's (§5.4: +2 % vs DDPM, −37 % vs pDDPM)."""
    device = default_device(cfg.device)
    amp = effective_amp(cfg.amp, device)[0]  # the precision timed (the reconstruction stage said any fallback)
    w = cfg.weightings[0]
    sets = [d for d in EVAL_SETS[w] if d in cfg.datasets]
    rows = eval_rows(cfg, sets[0], "test", w).head(cfg.timing_volumes) if sets else pd.DataFrame()
    if rows.empty or cfg.timing_volumes == 0:
        return pd.DataFrame()
    vols = [load_nifti(r[w])[0] for _, r in rows.iterrows()]
    masks = [load_nifti(r["brain_mask"])[0] for _, r in rows.iterrows()]
    out = []
    for m in [m for m in reference.DIFFUSION_MODELS if m in cfg.models]:
        cand = plan[(plan["model"] == m) & (plan["weighting"] == w) & (plan["status"] == "ok")
                    & (plan["fold"] == cfg.folds[0])]
        if cand.empty:
            out.append({"model": m, "variant": "-", "seconds_per_volume": np.nan, "status": "missing checkpoint"})
            continue
        model = load_model(cand.iloc[0]["checkpoint"]).to(device).eval()
        for variant in (f"t{cfg.t_test}", "ens"):
            secs = time_volumes(model, vols, masks, device=device, max_batch=cfg.max_batch, amp=amp,
                                **variant_kwargs(variant))
            out.append({"model": m, "variant": variant, "seconds_per_volume": float(np.median(secs)),
                        "n_volumes": len(secs), "device": str(device), "amp": amp, "status": "ok"})
            log(f"[segmentation] inference {m} {variant}: {np.median(secs):.3f} s/volume")
    df = pd.DataFrame(out)
    for ref, paper in reference.INFERENCE_TIME_RATIOS.items():
        for variant in (f"t{cfg.t_test}", "ens"):
            c = df[(df["model"] == "cddpm") & (df["variant"] == variant)]["seconds_per_volume"]
            o = df[(df["model"] == ref) & (df["variant"] == variant)]["seconds_per_volume"]
            change = float(c.iloc[0] / o.iloc[0] - 1) if len(c) and len(o) else np.nan
            df.loc[(df["model"] == ref) & (df["variant"] == variant), "cddpm_relative_change"] = change
            df.loc[(df["model"] == ref) & (df["variant"] == variant), "paper_relative_change"] = paper
    save_dataframe(df, paths.results_dir(cfg.profile) / "inference_time.csv")
    return df


def fig5_rows(cfg: SegmentationConfig) -> tuple[list[str], str]:
    """Fig. 5's rows: DDPM, pDDPM and cDDPM (with SSL if ``sweep_cddpm_ssl``) at single ``t_test``, and the
    cDDPM ensemble row drawn flat."""
    ssl = cfg.sweep_cddpm_ssl and cfg.ssl
    rows = [reference.row_label(m, ssl=(m == "cddpm" and ssl)) for m in reference.DIFFUSION_MODELS if m in cfg.models]
    return rows, reference.row_label("cddpm", ssl=ssl, ens=True)


def fig5_data(cfg: SegmentationConfig, per_volume: pd.DataFrame) -> pd.DataFrame:
    """Mean ± std over folds of the per-fold test DICE (%) versus ``t_test`` (sweep runs and the Table 3 runs at
    ``t_test``, which the plan does not repeat) and of the cDDPM ensemble (``t_test = -1``)."""
    if per_volume.empty:
        return pd.DataFrame()
    rows, ens_row = fig5_rows(cfg)
    single = per_volume[per_volume["row"].isin(rows) & per_volume["variant"].str.match(r"^t\d+$")]
    sweep = fold_scores(single, purpose=None)
    sweep = sweep[sweep["metric"] == "DICE"].copy()
    sweep["t_test"] = sweep["variant"].str[1:].astype(int)
    ens = fold_scores(per_volume[per_volume["row"] == ens_row], purpose=None)
    ens = ens[ens["metric"] == "DICE"].assign(t_test=-1)
    both = pd.concat([sweep, ens], ignore_index=True)
    return summarize(both, ["model", "ssl", "variant", "t_test", "dataset"]) if len(both) else both


def export_nifti(cfg: SegmentationConfig, index: pd.DataFrame, runs: pd.DataFrame) -> list[Path]:
    """Anomaly maps (continuous, post-processed) and binary segmentations of the first ``n_nifti`` test volumes
    per (Table 3 row, data set) of the first fold, with the input's affine, under ``results/nifti/``."""
    spec, prepare = cfg.spec(), continuous_map_fn(cfg)
    written = []
    tab = index[(index["purpose"] == "table3") & (index["split"] == "test") & (index["fold"] == cfg.folds[0])]
    for key, grp in tab.groupby(["row", "model_id", "variant", "dataset"], sort=False):
        hit = runs[(runs["row"] == key[0]) & (runs["variant"] == key[2]) & (runs["dataset"] == key[3])
                   & (runs["fold"] == cfg.folds[0]) & (runs["purpose"] == "table3")]
        if hit.empty:
            continue
        thr = float(hit.iloc[0]["threshold"])
        for _, r in grp.head(cfg.n_nifti).iterrows():
            z = load_recon(r["npz"])
            cont = prepare(z["anomaly"], z["brain_mask"])
            base = paths.results_dir(cfg.profile) / "nifti" / key[1] / key[2] / key[3] / r["subject_id"]
            written.append(save_nifti(cont, z["affine"], f"{base}_anomaly.nii.gz"))
            written.append(save_nifti(binarize(cont, thr, spec), z["affine"], f"{base}_segmentation.nii.gz",
                                      dtype=np.uint8))
    return written


# --------------------------------------------------------------------------------------------------------------
# Figures 4–6

FIG4_MODELS = ("cddpm", "pddpm", "ddpm", "dae")


def pick_rows(index: pd.DataFrame, models) -> list[str]:
    """For each model, the Table 3 row present in ``index`` with the most of SSL and ENS (paper's best)."""
    tab = index[index["purpose"] == "table3"].drop_duplicates("row")
    out = []
    for m in models:
        part = tab[tab["model"] == m]
        if len(part):
            out.append(part.assign(_k=part["ssl"].astype(int) + part["ens"].astype(int))
                       .sort_values("_k", kind="stable").iloc[-1]["row"])
    return out


def _first_dataset(cfg: SegmentationConfig, index: pd.DataFrame, prefer: tuple[str, ...]) -> str | None:
    have = set(index["dataset"])
    return next((d for d in (*prefer, *cfg.datasets) if d in have and d in cfg.datasets), None)


def figure4(cfg: SegmentationConfig, index: pd.DataFrame) -> list[Path]:
    """Fig. 4: input, reconstruction, anomaly map for cDDPM, pDDPM, DDPM, DAE on a BraTS21 test volume."""
    ds = _first_dataset(cfg, index, ("BraTS21",))
    ex = figures.examples_from_index(index, pick_rows(index, FIG4_MODELS), ds, cfg.folds[0],
                                     continuous_map_fn(cfg)) if ds else []
    return figures.save(figures.fig4(ex), paths.figures_dir(cfg.profile) / "fig4_reconstructions") if ex else []


def figure5(cfg: SegmentationConfig, per_volume: pd.DataFrame) -> tuple[pd.DataFrame, list[Path]]:
    """Fig. 5: DICE versus ``t_test`` (data in ``results/fig5_dice_vs_t.csv``)."""
    summary = fig5_data(cfg, per_volume)
    if summary.empty:
        return summary, []
    save_dataframe(summary, paths.results_dir(cfg.profile) / "fig5_dice_vs_t.csv")
    return summary, figures.save(figures.fig5(summary), paths.figures_dir(cfg.profile) / "fig5_dice_vs_t")


def figure6(cfg: SegmentationConfig, index: pd.DataFrame, per_dataset: int = 2) -> list[Path]:
    """Fig. 6: residual maps of every Table 3 row for BraTS21-, WMH- and ATLAS-like test cases."""
    rows = list(dict.fromkeys(index.loc[index["purpose"] == "table3", "row"]))
    sets = [d for d in ("BraTS21", "WMH", "ATLAS", "MSLUB") if d in cfg.datasets]
    cases = figures.gallery_cases(index, rows, sets, cfg.folds[0], continuous_map_fn(cfg), per_dataset)
    return figures.save(figures.fig6(cases), paths.figures_dir(cfg.profile) / "fig6_residual_gallery") \
        if cases else []
