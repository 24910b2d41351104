"""Figures of the segmentation results (paper Figs. 4–6, supplement Table 4), as PNG + PDF.

- :func:`fig4` — input, reconstruction and anomaly map of one BraTS21-like slice for cDDPM, pDDPM, DDPM, DAE;
- :func:`fig5` — test DICE versus ``t_test`` for DDPM, pDDPM, cDDPM, with cDDPM-ENS as a flat line (± std band);
- :func:`fig6` — gallery: input, the residual map of every model, ground truth, for several cases (BraTS21,
  WMH, ATLAS rows in the paper);
- :func:`table4_deltas` — change of DICE when one post-processing step is removed, ours beside the paper's.

The builders take plain arrays / DataFrames and return a matplotlib ``Figure``; :func:`save` writes it through
``volumes.save_figure`` (atomic) and closes it. :func:`examples_from_index` picks the cases from the saved
reconstructions (``results/recon_index.csv``). Slices are shown in radiological orientation (``rot90``).
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from .reconstruct import load_recon  # noqa: E402
from .reference import DISPLAY  # noqa: E402
from .volumes import save_figure  # noqa: E402

COLORS = {"ddpm": "tab:blue", "pddpm": "tab:orange", "cddpm": "tab:green"}


def save(fig, stem: str | Path) -> list[Path]:
    """``<stem>.png`` and ``<stem>.pdf``; closes the figure."""
    out = save_figure(fig, stem)
    plt.close(fig)
    return out


def best_slice(seg: np.ndarray, brain_mask: np.ndarray | None = None) -> int:
    """Axial index (last axis) with the largest annotated area; the largest brain area if there is none."""
    area = np.asarray(seg).reshape(-1, np.shape(seg)[-1]).sum(0)
    if area.max() == 0 and brain_mask is not None:
        area = np.asarray(brain_mask).reshape(-1, np.shape(brain_mask)[-1]).sum(0)
    return int(np.argmax(area))


def _show(ax, img: np.ndarray, title: str = "", cmap: str = "gray", vmin: float = 0.0, vmax: float | None = None):
    ax.imshow(np.rot90(img), cmap=cmap, vmin=vmin, vmax=vmax, interpolation="nearest")
    ax.set_xticks([])
    ax.set_yticks([])
    if title:
        ax.set_title(title, fontsize=8)


def fig4(examples: Sequence[tuple[str, dict]], z: int | None = None):
    """Rows: models (``(label, {"image", "recon", "anomaly", "seg"})``); columns: input, reconstruction, anomaly
    map (annotation outlined). ``z``: axial slice (default: largest lesion of the first example)."""
    if not examples:
        raise ValueError("fig4: no examples (no reconstructions of the Fig. 4 models were found)")
    z = best_slice(examples[0][1]["seg"]) if z is None else z
    vmax = max(float(np.max(e["anomaly"][..., z])) for _, e in examples) or 1.0
    fig, axes = plt.subplots(len(examples), 3, figsize=(6.5, 2.2 * len(examples)), squeeze=False)
    for i, (label, e) in enumerate(examples):
        _show(axes[i, 0], e["image"][..., z], "input" if i == 0 else "", vmax=1)
        _show(axes[i, 1], e["recon"][..., z], "reconstruction" if i == 0 else "", vmax=1)
        _show(axes[i, 2], e["anomaly"][..., z], "anomaly map" if i == 0 else "", cmap="inferno", vmax=vmax)
        if np.any(e["seg"][..., z]):
            axes[i, 2].contour(np.rot90(e["seg"][..., z]), levels=[0.5], colors="cyan", linewidths=0.6)
        axes[i, 0].set_ylabel(label, fontsize=9)
    fig.tight_layout()
    return fig


def fig5(summary: pd.DataFrame):
    """One panel per data set: mean DICE (± std over folds) versus ``t_test`` per model; rows with
    ``t_test = -1`` (the cDDPM ensemble) are drawn as a flat dashed line with its band."""
    if summary.empty:
        raise ValueError("fig5: no sweep results")
    sets = list(dict.fromkeys(summary["dataset"]))
    fig, axes = plt.subplots(1, len(sets), figsize=(4 * len(sets), 3.2), squeeze=False)
    for ax, ds in zip(axes[0], sets):
        part = summary[summary["dataset"] == ds]
        sweep = part[part["t_test"] > 0]
        for model, g in sweep.groupby("model", sort=False):
            g = g.sort_values("t_test")
            ax.errorbar(g["t_test"], g["mean"], yerr=g["std"].fillna(0), marker="o", ms=3, capsize=2,
                        color=COLORS.get(model), label=DISPLAY.get(model, model))
        ens = part[(part["t_test"] < 0) & (part["model"] == "cddpm")]
        if len(ens) and len(sweep):
            m, s = float(ens["mean"].iloc[0]), float(np.nan_to_num(ens["std"].iloc[0]))
            lo, hi = sweep["t_test"].min(), sweep["t_test"].max()
            ax.hlines(m, lo, hi, colors=COLORS["cddpm"], linestyles="--", label="cDDPM$^{ens}$")
            ax.fill_between([lo, hi], m - s, m + s, color=COLORS["cddpm"], alpha=0.15)
        ax.set_title(ds)
        ax.set_xlabel("$t_{test}$")
        ax.set_ylabel("DICE [%]")
        ax.grid(alpha=0.3)
    axes[0, -1].legend(fontsize=7)
    fig.tight_layout()
    return fig


def fig6(cases: Sequence[dict]):
    """Rows: cases ``{"title", "image", "seg", "maps": {label: residual}, "z"}``; columns: input, each model's
    residual (common colour scale per row), ground truth."""
    if not cases:
        raise ValueError("fig6: no cases")
    labels = list(dict.fromkeys(k for c in cases for k in c["maps"]))
    ncol = len(labels) + 2
    fig, axes = plt.subplots(len(cases), ncol, figsize=(1.3 * ncol, 1.4 * len(cases)), squeeze=False)
    for i, c in enumerate(cases):
        z = c["z"]
        vmax = max([float(np.max(m[..., z])) for m in c["maps"].values()] + [1e-6])
        _show(axes[i, 0], c["image"][..., z], "input" if i == 0 else "", vmax=1)
        axes[i, 0].set_ylabel(c["title"], fontsize=6)
        for j, lab in enumerate(labels, start=1):
            if lab in c["maps"]:
                _show(axes[i, j], c["maps"][lab][..., z], lab if i == 0 else "", cmap="inferno", vmax=vmax)
            else:
                axes[i, j].axis("off")
        _show(axes[i, -1], c["seg"][..., z], "ground truth" if i == 0 else "", vmax=1)
    fig.tight_layout(pad=0.3)
    return fig


def table4_deltas(df: pd.DataFrame):
    """Grouped bars per data set: ΔDICE (removed − full) for each (model, removed step), ours beside the
    paper's. ``df``: ``model, removed, dataset, delta, paper_delta``."""
    if df.empty:
        raise ValueError("table4_deltas: no ablation results")
    sets = list(dict.fromkeys(df["dataset"]))
    fig, axes = plt.subplots(1, len(sets), figsize=(4.2 * len(sets), 3.4), squeeze=False, sharey=False)
    for ax, ds in zip(axes[0], sets):
        part = df[df["dataset"] == ds]
        labels = [f"{DISPLAY.get(m, m)}\n−{r}" for m, r in zip(part["model"], part["removed"])]
        x = np.arange(len(part))
        ax.bar(x - 0.2, part["delta"], 0.4, label="ours")
        ax.bar(x + 0.2, part["paper_delta"], 0.4, label="paper", alpha=0.7)
        ax.axhline(0, color="k", lw=0.6)
        ax.set_xticks(x)
        ax.set_xticklabels(labels, fontsize=6, rotation=90)
        ax.set_title(ds)
        ax.set_ylabel("Δ DICE [%] vs full pipeline")
    axes[0, 0].legend(fontsize=7)
    fig.tight_layout()
    return fig


# --------------------------------------------------------------------------------------------------------------
# Picking examples from the saved reconstructions


def examples_from_index(index: pd.DataFrame, rows: Sequence[str], dataset: str, fold: int,
                        prepare: Callable[[np.ndarray, np.ndarray], np.ndarray], subject_id: str | None = None
                        ) -> list[tuple[str, dict]]:
    """Fig. 4 inputs: for each Table 3 ``rows`` label (in order) with a test reconstruction of ``dataset`` in
    ``fold``, the arrays of ``subject_id`` (default: the volume with the largest annotation, chosen on the first
    row found) with ``anomaly`` replaced by ``prepare(anomaly, brain_mask)`` (the continuous post-processing)."""
    tab = index[(index["split"] == "test") & (index["dataset"] == dataset) & (index["fold"] == fold)
                & (index["purpose"] == "table3")]
    out = []
    for row in rows:
        part = tab[tab["row"] == row]
        if part.empty:
            continue
        if subject_id is None:
            subject_id = _largest_lesion(part)
        hit = part[part["subject_id"] == subject_id]
        if hit.empty:
            continue
        z = load_recon(hit.iloc[0]["npz"])
        z["anomaly"] = prepare(z["anomaly"], z["brain_mask"])
        out.append((row, z))
    return out


def _largest_lesion(part: pd.DataFrame) -> str:
    sizes = {r["subject_id"]: int(load_recon(r["npz"])["seg"].sum()) for _, r in part.iterrows()}
    return max(sizes, key=sizes.get)


def gallery_cases(index: pd.DataFrame, rows: Sequence[str], datasets: Sequence[str], fold: int,
                  prepare: Callable[[np.ndarray, np.ndarray], np.ndarray], per_dataset: int = 2) -> list[dict]:
    """Fig. 6 inputs: ``per_dataset`` test cases (largest annotations first) of each data set, each with the
    (post-processed) residual of every Table 3 row that has them."""
    cases = []
    tab = index[(index["split"] == "test") & (index["fold"] == fold) & (index["purpose"] == "table3")]
    for ds in datasets:
        part = tab[tab["dataset"] == ds]
        if part.empty:
            continue
        first = part[part["row"] == part["row"].iloc[0]]
        sizes = sorted(((int(load_recon(r["npz"])["seg"].sum()), r["subject_id"]) for _, r in first.iterrows()),
                       reverse=True)
        for _, sid in sizes[:per_dataset]:
            maps, base = {}, None
            for row in rows:
                hit = part[(part["row"] == row) & (part["subject_id"] == sid)]
                if hit.empty:
                    continue
                z = load_recon(hit.iloc[0]["npz"])
                base = base or z
                maps[row] = prepare(z["anomaly"], z["brain_mask"])
            if base is not None:
                cases.append({"title": f"{ds} {sid}", "image": base["image"], "seg": base["seg"], "maps": maps,
                              "z": best_slice(base["seg"], base["brain_mask"])})
    return cases
