"""The paper's numbers (Behrendt et al. 2023, Tables 1–4 and §5) as data, to compare the kit's results against.

Values are transcribed from ``paper/TABLES.md`` (the PDF's tables laid out again value by value). Every score is
``(mean, std, star)`` over the folds; ``std`` is ``None`` where the paper gives none (the deterministic Thresh row)
and ``star`` marks "significantly better than all baselines" (permutation test, α = 5 %, paper §4.5.4).

Model keys are the kit's registry names (``models.MODEL_NAMES``): ``fanogan`` is the paper's *AnoGAN* row;
:data:`DISPLAY` maps them to the paper's labels. Table rows carry ``ssl`` (SparK-pretrained encoder) and ``ens``
(reconstructions averaged over ``t_test = [250, 500, 750]``; otherwise ``t_test = 500``).

Functions return long DataFrames (one score per row) that :mod:`cddpm_lib.tables` pivots into the paper's layout:

- :func:`table1` — data set sizes;
- :func:`table2` — reconstruction quality (columns ``model, ssl, ens, dataset, metric, mean, std, star``);
- :func:`table3` — segmentation DICE and AUPRC in %;
- :func:`table4` — post-processing ablation (one step removed) with the paper's delta to the full pipeline;
- :data:`KLD_RATIOS`, :data:`INFERENCE_TIME_RATIOS` — the claims of §5.3 and §5.4.
"""
from __future__ import annotations

from typing import NamedTuple

import pandas as pd

#: the paper's row labels for the kit's model names
DISPLAY: dict[str, str] = {"thresh": "Thresh", "fanogan": "AnoGAN", "vae": "VAE", "svae": "SVAE", "ae": "AE",
                           "dae": "DAE", "ddpm": "DDPM", "pddpm": "pDDPM", "cddpm": "cDDPM"}
#: Table 3/4 columns in the paper's order
DATASETS: tuple[str, ...] = ("BraTS21", "MSLUB", "ATLAS", "WMH")
#: paper §4.4: the ensemble of test-time noise levels and the single level
ENSEMBLE_T_TEST: tuple[int, ...] = (250, 500, 750)
SINGLE_T_TEST = 500


class Row(NamedTuple):
    """One row of Table 3: a model, with/without SparK pre-training, with/without the t_test ensemble."""

    model: str
    ssl: bool = False
    ens: bool = False


#: Table 3 rows in the paper's order
TABLE3_ROWS: tuple[Row, ...] = (
    Row("thresh"), Row("fanogan"), Row("vae"), Row("svae"), Row("ae"), Row("dae"),
    Row("ddpm"), Row("ddpm", ens=True), Row("pddpm"), Row("pddpm", ens=True),
    Row("cddpm"), Row("cddpm", ssl=True), Row("cddpm", ssl=True, ens=True),
)
#: Table 4 rows (models) in the paper's order; DDPM-family rows are ENS variants, cDDPM with SSL
TABLE4_ROWS: tuple[Row, ...] = (Row("dae"), Row("ddpm", ens=True), Row("cddpm", ssl=True, ens=True),
                                Row("pddpm", ens=True))
#: Table 4: post-processing steps removed one at a time (CC: connected components, MF: median, BE: erosion)
TABLE4_REMOVED: tuple[str, ...] = ("CC", "MF", "BE")
DIFFUSION_MODELS: tuple[str, ...] = ("ddpm", "pddpm", "cddpm")


def row_label(model: str, ssl: bool = False, ens: bool = False) -> str:
    """Paper-style label of a row, e.g. ``cDDPM+SSL+ENS``."""
    return DISPLAY.get(model, model) + ("+SSL" if ssl else "") + ("+ENS" if ens else "")


def _v(text: str) -> tuple[float, float | None, bool]:
    """``"53.37±1.80*"`` -> ``(53.37, 1.80, True)``; ``"19.69"`` -> ``(19.69, None, False)``."""
    star = text.endswith("*")
    text = text.rstrip("*")
    if "±" in text:
        mean, std = text.split("±")
        return float(mean), float(std), star
    return float(text), None, star


# --------------------------------------------------------------------------------------------------------------
# Table 1 — data set sizes

_TABLE1 = {  # dataset: (weighting, healthy train, healthy val, healthy test, unhealthy val, unhealthy test)
    "IXI": ("T2 (and T1)", 358, 44, 158, None, None),
    "BraTS21": ("T2", None, None, None, 100, 1151),
    "MSLUB": ("T2", None, None, None, 10, 20),
    "ATLAS": ("T1", None, None, None, 175, 480),
    "WMH": ("T1", None, None, None, 15, 45),
}


def table1() -> pd.DataFrame:
    """Paper Table 1: number of volumes per data set and split."""
    cols = ["weighting", "healthy_train", "healthy_val", "healthy_test", "unhealthy_val", "unhealthy_test"]
    df = pd.DataFrame([(k, *v) for k, v in _TABLE1.items()], columns=["dataset", *cols])
    for c in cols[1:]:
        df[c] = df[c].astype("Int64")
    return df


# --------------------------------------------------------------------------------------------------------------
# Table 2 — reconstruction quality on IXI T2 test, l1-ratio on the unhealthy test sets

TABLE2_METRICS: tuple[str, ...] = ("SSIM", "PSNR", "LPIPS", "l1", "ratio_BraTS21", "ratio_MSLUB", "ratio_ATLAS",
                                   "ratio_WMH")
#: units of Table 2: SSIM in %, PSNR in dB, LPIPS and l1 ×1e-3, ratios plain
TABLE2_UNITS: dict[str, str] = {"SSIM": "%", "PSNR": "dB", "LPIPS": "1e-3", "l1": "1e-3"}
_TABLE2 = {
    "vae": "74.98±0.54 23.38±0.14 4.03±0.50 32.32±0.64 3.52±0.08 2.92±0.06 4.43±0.03 2.36±0.04",
    "svae": "77.87±0.15 23.94±0.06 3.31±0.24 29.08±0.16 3.90±0.05 3.13±0.05 3.38±0.11 2.07±0.01",
    "ae": "76.11±0.27 23.41±0.14 3.19±0.54 31.67±0.41 3.84±0.17 3.26±0.18 4.40±0.07 2.36±0.04",
    "dae": "98.69±0.15* 36.69±0.38* 0.14±0.01 8.14±0.17* 7.17±0.63 2.69±0.15 4.51±0.15 2.99±0.14",
    "ddpm": "93.96±0.37 31.79±0.26 0.49±0.14 14.29±0.32 6.16±0.53 3.37±0.24 5.00±0.23 3.16±0.15",
    "pddpm": "96.62±0.25 34.58±0.39 0.09±0.04* 9.70±0.43 7.16±0.15 4.34±0.13 5.58±0.28 3.00±0.16",
    "cddpm": "96.80±0.19 34.87±0.23 0.11±0.05 9.68±0.16 7.43±0.17 4.49±0.18 5.69±0.27 3.12±0.08",
}


def table2() -> pd.DataFrame:
    """Paper Table 2 (long): ``model, ssl, ens, metric, mean, std, star``.

    DDPM-family rows use the ensemble (``ens=True``); the paper does not say whether its cDDPM row is pre-trained,
    so it is recorded with ``ssl=False``. SSIM in %, LPIPS and l1 ×1e-3 (:data:`TABLE2_UNITS`).
    """
    rows = []
    for model, line in _TABLE2.items():
        for metric, cell in zip(TABLE2_METRICS, line.split()):
            mean, std, star = _v(cell)
            rows.append({"model": model, "ssl": False, "ens": model in DIFFUSION_MODELS, "metric": metric,
                         "mean": mean, "std": std, "star": star})
    return pd.DataFrame(rows)


# --------------------------------------------------------------------------------------------------------------
# Table 3 — segmentation (DICE and AUPRC in %)

_TABLE3 = [  # row, then BraTS21 DICE, AUPRC, MSLUB DICE, AUPRC, ATLAS DICE, AUPRC, WMH DICE, AUPRC
    (TABLE3_ROWS[0], "19.69 20.27 6.21 4.23 4.41 1.71 9.38 4.72"),
    (TABLE3_ROWS[1], "23.99±6.15 21.08±6.23 4.86±2.02 3.77±1.32 9.91±1.80 9.17±1.41 6.25±1.00 3.45±0.33"),
    (TABLE3_ROWS[2], "28.81±1.26 25.72±1.54 6.16±0.58 4.46±0.20 15.08±0.28 15.27±0.30 5.23±0.82 4.16±0.13"),
    (TABLE3_ROWS[3], "31.93±0.42 30.30±0.52 6.04±0.26 4.81±0.12 10.49±0.67 10.06±0.55 6.64±0.01 3.11±0.04"),
    (TABLE3_ROWS[4], "31.51±1.94 28.80±1.92 7.23±0.90 5.71±0.90 14.91±0.33 14.76±0.46 4.53±0.36 4.16±0.19"),
    (TABLE3_ROWS[5], "45.37±4.40 49.38±4.68 3.88±1.35 4.47±0.78 8.53±0.28 12.45±0.94 7.31±1.02 6.32±0.88"),
    (TABLE3_ROWS[6], "44.25±1.49 49.98±2.41 4.80±1.98 6.36±1.84 12.90±0.89 15.67±0.76 10.03±1.06 8.86±0.95"),
    (TABLE3_ROWS[7], "44.50±2.20 50.73±3.09 6.46±2.05 6.31±1.40 14.67±0.86 17.56±1.12 9.63±1.06 8.12±1.17"),
    (TABLE3_ROWS[8], "49.36±0.66 54.70±0.53 9.40±1.23 9.88±0.59 12.95±0.45 17.37±0.39 8.03±0.62 7.78±0.51"),
    (TABLE3_ROWS[9], "49.78±0.85 55.10±0.57 9.21±1.35 10.11±0.45 13.24±0.93 17.76±1.17 7.97±0.95 7.65±0.91"),
    (TABLE3_ROWS[10], "51.34±1.68 56.84±2.21 10.71±1.52 10.13±1.19 19.06±1.27 20.98±1.14 9.94±0.55 9.28±0.42"),
    (TABLE3_ROWS[11], "52.35±0.95 58.14±1.47 11.09±0.87 10.85±1.02 18.95±1.94 20.86±1.53 9.92±1.26 9.23±1.08"),
    (TABLE3_ROWS[12], "53.37±1.80* 58.84±1.76* 11.51±1.24 11.13±1.26 19.99±1.55* 22.21±1.47* 9.88±1.22 9.33±1.07"),
]
TABLE3_METRICS: tuple[str, ...] = ("DICE", "AUPRC")


def table3() -> pd.DataFrame:
    """Paper Table 3 (long): ``model, ssl, ens, dataset, metric, mean, std, star`` (DICE, AUPRC in %)."""
    out = []
    for row, line in _TABLE3:
        cells = line.split()
        for i, cell in enumerate(cells):
            mean, std, star = _v(cell)
            out.append({**row._asdict(), "dataset": DATASETS[i // 2], "metric": TABLE3_METRICS[i % 2],
                        "mean": mean, "std": std, "star": star})
    return pd.DataFrame(out)


# --------------------------------------------------------------------------------------------------------------
# Table 4 — post-processing ablation (supplement), DICE %

_TABLE4 = {  # (model, removed): BraTS21, MSLUB, ATLAS, WMH as "mean±std(delta)"
    ("dae", "CC"): "45.34±3.94(-0.03) 3.92±1.19(+0.04) 8.53±0.24(0.00) 7.31±0.91(0.00)",
    ("dae", "MF"): "39.75±3.37(-5.62) 3.94±0.58(+0.06) 9.21±0.32(+0.68) 7.01±0.68(-0.30)",
    ("dae", "BE"): "44.36±3.88(-1.01) 3.51±0.89(-0.37) 8.77±0.28(+0.24) 6.80±0.81(-0.51)",
    ("ddpm", "CC"): "44.42±2.03(-0.08) 6.05±2.10(-0.41) 14.65±0.30(-0.02) 10.27±0.96(+0.64)",
    ("ddpm", "MF"): "36.56±1.86(-7.94) 8.05±1.39(+1.59) 12.02±0.45(-2.65) 8.80±0.71(-0.83)",
    ("ddpm", "BE"): "43.81±2.12(-0.69) 5.70±2.06(-0.76) 15.11±0.32(+0.44) 9.89±1.00(+0.26)",
    ("cddpm", "CC"): "53.43±1.49(+0.06) 10.70±1.50(-0.81) 19.92±1.45(-0.07) 9.86±1.18(-0.02)",
    ("cddpm", "MF"): "40.59±1.27(-12.78) 11.05±1.04(-0.46) 16.56±1.11(-3.43) 8.34±0.76(-1.54)",
    ("cddpm", "BE"): "52.29±1.70(-1.08) 10.00±1.48(-1.51) 20.41±1.41(+0.42) 9.36±1.15(-0.52)",
    ("pddpm", "CC"): "49.62±0.84(-0.16) 10.09±0.76(+0.88) 13.35±0.22(+0.11) 7.62±0.80(-0.35)",
    ("pddpm", "MF"): "36.09±0.35(-13.69) 10.40±0.59(+1.19) 12.14±0.21(-1.10) 7.33±0.39(-0.64)",
    ("pddpm", "BE"): "47.76±0.86(-2.02) 8.13±1.03(-1.08) 13.71±0.28(+0.47) 7.30±0.95(-0.67)",
}


def table4() -> pd.DataFrame:
    """Paper Table 4 (long): ``model, ssl, ens, removed, dataset, mean, std, delta`` (DICE %).

    ``delta`` is the paper's bracket: the change against its full pipeline (Table 3's row of the same model).
    """
    rows_of = {r.model: r for r in TABLE4_ROWS}
    out = []
    for (model, removed), line in _TABLE4.items():
        for dataset, cell in zip(DATASETS, line.split()):
            value, delta = cell.rstrip(")").split("(")
            mean, std, _ = _v(value)
            out.append({**rows_of[model]._asdict(), "removed": removed, "dataset": dataset, "mean": mean,
                        "std": std, "delta": float(delta)})
    return pd.DataFrame(out)


# --------------------------------------------------------------------------------------------------------------
# Claims of §5.3 and §5.4

#: §5.3 / Fig. 3: KLD(DDPM) / KLD(cDDPM) on IXI for the original contrast and contrast factors 0.5 and 2.0
KLD_RATIOS: dict[str, float] = {"original": 2.3, "contrast_0.5": 4.0, "contrast_2.0": 17.0}
#: §5.4: relative inference time of cDDPM against DDPM (+2 %) and pDDPM (−37 %): t_cDDPM / t_other − 1
INFERENCE_TIME_RATIOS: dict[str, float] = {"ddpm": 0.02, "pddpm": -0.37}


def kld_ratios() -> pd.DataFrame:
    """§5.3 as a DataFrame: ``contrast, ratio`` with ``ratio = KLD(DDPM) / KLD(cDDPM)`` on IXI."""
    return pd.DataFrame({"contrast": list(KLD_RATIOS), "ratio": list(KLD_RATIOS.values())})


def inference_time_ratios() -> pd.DataFrame:
    """§5.4 as a DataFrame: ``reference, relative_change`` of cDDPM's inference time against DDPM and pDDPM."""
    return pd.DataFrame({"reference": list(INFERENCE_TIME_RATIOS),
                         "relative_change": list(INFERENCE_TIME_RATIOS.values())})


def paper_value(table: pd.DataFrame, **keys) -> pd.Series:
    """The single row of a reference table matching ``keys`` (e.g. ``model="cddpm", ssl=True, ens=True, ...``)."""
    mask = pd.Series(True, index=table.index)
    for k, v in keys.items():
        mask &= table[k] == v
    hits = table[mask]
    if len(hits) != 1:
        raise KeyError(f"reference: {len(hits)} rows match {keys}; expected exactly one")
    return hits.iloc[0]
