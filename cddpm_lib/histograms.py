"""Intensity histograms of input and reconstruction and their divergence (paper §4.5.2, §5.3, Fig. 3).

Paper §4.5.2: intensities are partitioned into 500 bins and each raw count is divided "by the total number of
counts and the bin width" (a density that integrates to 1). The paper then states a "Kullback-Leibler divergence"

    KLD = [ −Σ_i p_input,i log p_input,i ] − [ −Σ_i p_reconstruction,i log p_reconstruction,i ],

which, read literally, is the difference of the two histograms' Shannon entropies H(p_in) − H(p_rec): it can be
negative and is 0 for two different histograms of equal entropy, so it is not a divergence. The kit computes both
and labels them:

- :func:`kl_divergence` — the true D_KL(p_input ‖ p_reconstruction) = Σ_i p_i log(p_i / q_i) of the bin
  probabilities (``density × bin width``). Empty bins: ``eps = 1e-10`` is added to every bin probability of both
  histograms, which are then renormalised (without it, a bin filled by the input but empty in the
  reconstruction makes the divergence infinite).
- :func:`paper_expression` — H(p_in) − H(p_rec), the formula as printed, on the same bin probabilities (on the
  densities it differs only by the factor bin width, which cancels in the DDPM/cDDPM ratios).

Both histograms of a pair share one set of bin edges (:func:`common_edges`) spanning the values of both, which a
divergence between them needs.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import ClassVar, Literal

import numpy as np
import pandas as pd

from . import paths, quality, reconstruct, tables
from .config import ConfigError, StageConfig
from .datasets import HEALTHY, model_id
from .reference import KLD_RATIOS
from .runtime import default_device, stage_amp
from .volumes import save_dataframe, save_text

#: number of histogram bins (paper §4.5.2)
N_BINS = 500
#: added to every bin probability before the KL divergence (empty bins)
KL_EPS = 1e-10


def common_edges(*samples: np.ndarray, n_bins: int = N_BINS, value_range: tuple[float, float] | None = None
                 ) -> np.ndarray:
    """``n_bins + 1`` equal-width edges covering every value of every sample (or ``value_range``)."""
    if n_bins < 1:
        raise ValueError(f"n_bins must be >= 1, got {n_bins}")
    if value_range is None:
        finite = [np.asarray(s, dtype=np.float64).ravel() for s in samples if np.size(s)]
        if not finite:
            raise ValueError("common_edges: every sample is empty; nothing to histogram")
        lo = float(min(v.min() for v in finite))
        hi = float(max(v.max() for v in finite))
    else:
        lo, hi = map(float, value_range)
    if not (np.isfinite(lo) and np.isfinite(hi)):
        raise ValueError(f"common_edges: non-finite intensity range [{lo}, {hi}]")
    if hi <= lo:
        hi = lo + 1.0  # constant data: one unit-wide range so that widths stay positive
    return np.linspace(lo, hi, n_bins + 1)


def density_histogram(values: np.ndarray, edges: np.ndarray) -> np.ndarray:
    """Density per bin: ``count / (total · bin width)`` (paper §4.5.2); integrates to 1 over ``edges``.

    values: any shape (flattened); values outside the edges are an error (use :func:`common_edges`).
    """
    v = np.asarray(values, dtype=np.float64).ravel()
    if v.size == 0:
        raise ValueError("density_histogram: no values (empty region?)")
    if v.min() < edges[0] or v.max() > edges[-1]:
        raise ValueError(f"density_histogram: values span [{v.min()}, {v.max()}], outside the edges "
                         f"[{edges[0]}, {edges[-1]}]")
    counts, _ = np.histogram(v, bins=edges)
    return counts / (counts.sum() * np.diff(edges))


def bin_probabilities(density: np.ndarray, edges: np.ndarray) -> np.ndarray:
    """Probability mass of each bin, ``density · width`` (sums to 1)."""
    return np.asarray(density, dtype=np.float64) * np.diff(edges)


def _check_probs(p: np.ndarray, name: str) -> np.ndarray:
    p = np.asarray(p, dtype=np.float64)
    if p.ndim != 1 or np.any(p < 0) or not np.isfinite(p).all():
        raise ValueError(f"{name}: expected a 1D array of non-negative finite probabilities")
    total = p.sum()
    if not np.isclose(total, 1.0, atol=1e-6):
        raise ValueError(f"{name}: probabilities sum to {total}, not 1 (pass bin_probabilities(), not densities)")
    return p


def kl_divergence(p: np.ndarray, q: np.ndarray, eps: float = KL_EPS) -> float:
    """D_KL(p ‖ q) = Σ_i p_i log(p_i / q_i) in nats, with ``eps`` added to every bin of both, renormalised.

    p, q: [n_bins] bin probabilities over the same edges. ≥ 0, and 0 exactly when ``p == q``.
    """
    p = _check_probs(p, "p")
    q = _check_probs(q, "q")
    if p.shape != q.shape:
        raise ValueError(f"kl_divergence: p has {p.size} bins, q has {q.size}; use common edges")
    p = (p + eps) / (1.0 + eps * p.size)
    q = (q + eps) / (1.0 + eps * q.size)
    return float(max(0.0, np.sum(p * np.log(p / q))))


def entropy(p: np.ndarray) -> float:
    """Shannon entropy −Σ p_i log p_i of bin probabilities (0 · log 0 = 0), in nats."""
    p = _check_probs(p, "p")
    nz = p[p > 0]
    return float(-np.sum(nz * np.log(nz)))


def paper_expression(p_input: np.ndarray, p_reconstruction: np.ndarray) -> float:
    """The "KLD" of paper §4.5.2 as printed: H(p_input) − H(p_reconstruction) (an entropy difference, signed)."""
    return entropy(p_input) - entropy(p_reconstruction)


@dataclasses.dataclass(frozen=True)
class HistogramPair:
    """Histograms of input and reconstruction over shared edges, with both divergence readings."""

    edges: np.ndarray  # [n_bins + 1]
    density_input: np.ndarray  # [n_bins]
    density_reconstruction: np.ndarray  # [n_bins]
    kld: float  # true D_KL(p_input ‖ p_reconstruction)
    paper_expression: float  # H(p_input) − H(p_reconstruction)
    n_voxels: int

    @property
    def centers(self) -> np.ndarray:
        return 0.5 * (self.edges[:-1] + self.edges[1:])


def histogram_pair(input_values: np.ndarray, reconstruction_values: np.ndarray, *, n_bins: int = N_BINS,
                   value_range: tuple[float, float] | None = None, eps: float = KL_EPS) -> HistogramPair:
    """Histograms (paper §4.5.2) of the same voxels in input and reconstruction, and their divergences."""
    x = np.asarray(input_values, dtype=np.float64).ravel()
    y = np.asarray(reconstruction_values, dtype=np.float64).ravel()
    if x.size != y.size:
        raise ValueError(f"histogram_pair: {x.size} input values but {y.size} reconstruction values")
    if value_range is not None:
        x, y = np.clip(x, *value_range), np.clip(y, *value_range)
    edges = common_edges(x, y, n_bins=n_bins, value_range=value_range)
    d_in, d_rec = density_histogram(x, edges), density_histogram(y, edges)
    p_in, p_rec = bin_probabilities(d_in, edges), bin_probabilities(d_rec, edges)
    return HistogramPair(edges, d_in, d_rec, kl_divergence(p_in, p_rec, eps), paper_expression(p_in, p_rec),
                         int(x.size))


def region_values(image: np.ndarray, reconstruction: np.ndarray, brain_mask: np.ndarray,
                  seg: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Voxels of one volume the histograms use: the brain, minus the annotated anomaly when ``seg`` is given
    (paper §5.3: "for the BraTS21 data set, we only consider regions that have been annotated as healthy").

    image, reconstruction, brain_mask, seg: [X, Y, Z] -> two 1D arrays of equal length.
    """
    if image.shape != reconstruction.shape or image.shape != brain_mask.shape:
        raise ValueError(f"region_values: shapes differ: image {image.shape}, reconstruction "
                         f"{reconstruction.shape}, brain mask {brain_mask.shape}")
    region = np.asarray(brain_mask) > 0
    if seg is not None:
        if seg.shape != image.shape:
            raise ValueError(f"region_values: segmentation shape {seg.shape} != image shape {image.shape}")
        region &= ~(np.asarray(seg) > 0)
    return np.asarray(image)[region], np.asarray(reconstruction)[region]


# --------------------------------------------------------------------------------------------------------------
# Stage `domain_shift` (notebook 05): histograms of DDPM and cDDPM reconstructions, KLD table, Fig. 3

#: the paper's KLD(DDPM) / KLD(cDDPM) on IXI per contrast factor (paper §5.3, ``reference.KLD_RATIOS``)
PAPER_RATIOS_IXI: dict[float, float] = {1.0: KLD_RATIOS["original"], 0.5: KLD_RATIOS["contrast_0.5"],
                                        2.0: KLD_RATIOS["contrast_2.0"]}


@dataclasses.dataclass(frozen=True)
class DomainShiftConfig(StageConfig):
    """Notebook 05 (Fig. 3, KLD ratios). Defaults: the paper's settings."""

    STAGE: ClassVar[str] = "domain_shift"  # profiles/<STAGE>.yaml resolves None parameters

    profile: str = "quick"
    source: str = "synthetic"
    folds: tuple[int, ...] = (0, 1, 2, 3, 4)
    ddpm: str = "ddpm"  # top row of Fig. 3
    cddpm: str = "cddpm-ssl"  # bottom row
    datasets: tuple[str, ...] = ("IXI", "BraTS21")  # in-domain, out-of-domain (T2 models)
    contrasts: tuple[float, ...] = (1.0, 0.5, 2.0)  # x^cl; 1.0 = original contrast
    diffusion_variant: str = "ens"  # t_test = [250, 500, 750] (Fig. 3 caption)
    n_bins: int = N_BINS
    kl_eps: float = KL_EPS
    max_volumes: int = 0  # per data set; 0 = all test volumes
    figure_fold: int = 0
    device: str = "auto"
    amp: Literal["none", "bf16", "fp16"] = "none"  # reconstruct under autocast (runtime.effective_amp)
    max_batch: int = 32
    seed: int = 0

    def validate(self) -> None:
        paths.check_profile(self.profile)
        paths.check_source(self.source)
        quality.parse_model(self.ddpm)
        quality.parse_model(self.cddpm)
        if self.figure_fold not in self.folds:
            raise ConfigError(f"parameter 'figure_fold': {self.figure_fold} is not among folds {self.folds}")
        if any(c <= 0 for c in self.contrasts) or self.n_bins < 1 or self.kl_eps < 0:
            raise ConfigError("parameters 'contrasts' > 0, 'n_bins' >= 1 and 'kl_eps' >= 0 required")


def collect_histograms(cfg: DomainShiftConfig, log=print) -> tuple[pd.DataFrame, dict[tuple, HistogramPair]]:
    """Reconstruct every test volume of ``cfg.datasets`` at each contrast with DDPM and cDDPM (T2 models) and
    pool the region's voxels (IXI: brain; unhealthy sets: brain minus annotation) per fold.

    Returns ``(kld, pairs)``: one row per (fold, model, dataset, contrast) with ``kld`` (true KL divergence) and
    ``paper_expression``; ``pairs[(fold, model, dataset, contrast)]`` the histograms.
    """
    records, pairs = [], {}
    rows = {d: quality.test_volumes(cfg, d, "t2") for d in cfg.datasets}
    amp = stage_amp(cfg.amp, default_device(cfg.device), log, "[domain shift]")  # said once for the stage
    for fold in cfg.folds:
        for spec in (cfg.ddpm, cfg.cddpm):
            model = quality.load_trained(cfg.profile, spec, "t2", fold)
            name, ssl = quality.parse_model(spec)
            kw = reconstruct.variant_kwargs(cfg.diffusion_variant)
            for dataset, table in rows.items():
                for cl in cfg.contrasts:
                    variant = cfg.diffusion_variant if cl == 1.0 else f"{cfg.diffusion_variant}_contrast{cl:g}"
                    mid = model_id(name, "t2", ssl)
                    out = paths.recon_dir(cfg.profile, mid, fold, variant, dataset)
                    parts = reconstruct.part_dirs(cfg.profile, mid, fold, variant, dataset)
                    xs, ys = [], []
                    recons = quality.reconstruct_rows(model, table, "t2", out, cfg, cl, parts, amp=amp, **kw)
                    for _, case, recon in recons:
                        seg = case["seg"] if dataset != HEALTHY else None
                        x, y = region_values(case["image"], recon, case["brain_mask"], seg)
                        xs.append(x)
                        ys.append(y)
                    pair = histogram_pair(np.concatenate(xs), np.concatenate(ys), n_bins=cfg.n_bins, eps=cfg.kl_eps)
                    pairs[(fold, spec, dataset, cl)] = pair
                    records.append({"fold": fold, "model": spec, "dataset": dataset, "contrast": cl,
                                    "kld": pair.kld, "paper_expression": pair.paper_expression,
                                    "n_voxels": pair.n_voxels, "n_volumes": len(table)})
            log(f"[domain shift] {spec} fold {fold}: {', '.join(cfg.datasets)} × contrasts {cfg.contrasts}")
    return pd.DataFrame(records), pairs


def _mean_std(values: pd.Series) -> str:
    v = values.astype(float)
    return f"{v.mean():.4f} ± {v.std(ddof=0):.4f}" if len(v) > 1 else f"{v.mean():.4f}"


def kld_table(kld: pd.DataFrame, ddpm: str, cddpm: str) -> pd.DataFrame:
    """Per data set and contrast: KLD of DDPM and cDDPM (mean ± std over folds), the ratio of the fold means
    next to the paper's ratio (IXI only), and the same for the paper's printed expression (entropy difference)."""
    rows = []
    for (dataset, cl), g in kld.groupby(["dataset", "contrast"], sort=False):
        a, b = g[g["model"] == ddpm], g[g["model"] == cddpm]
        row = {"data set": dataset, "contrast x^cl": cl,
               "KL(in‖rec) DDPM": _mean_std(a["kld"]), "KL(in‖rec) cDDPM": _mean_std(b["kld"]),
               "ratio DDPM/cDDPM (KL)": _ratio(a["kld"].mean(), b["kld"].mean()),
               "paper ratio": PAPER_RATIOS_IXI.get(float(cl), np.nan) if dataset == HEALTHY else np.nan,
               "H(in)−H(rec) DDPM": _mean_std(a["paper_expression"]),
               "H(in)−H(rec) cDDPM": _mean_std(b["paper_expression"]),
               "ratio DDPM/cDDPM (paper expression)": _ratio(a["paper_expression"].mean(),
                                                             b["paper_expression"].mean()),
               "folds": int(g["fold"].nunique())}
        rows.append(row)
    return pd.DataFrame(rows)


def _ratio(num: float, den: float) -> float:
    return float(num / den) if np.isfinite(num) and np.isfinite(den) and den != 0 else np.nan


def plot_histograms(pairs: dict[tuple, HistogramPair], cfg: DomainShiftConfig):
    """Fig. 3: DDPM (top) vs cDDPM (bottom); columns = data set × contrast; input vs reconstruction, KLD in each."""
    import matplotlib.pyplot as plt

    cols = [(d, cl) for d in cfg.datasets for cl in cfg.contrasts]
    fig, axes = plt.subplots(2, len(cols), figsize=(2.6 * len(cols), 4.6), squeeze=False, sharey="col")
    for i, spec in enumerate((cfg.ddpm, cfg.cddpm)):
        for j, (dataset, cl) in enumerate(cols):
            ax, pair = axes[i, j], pairs[(cfg.figure_fold, spec, dataset, cl)]
            ax.stairs(pair.density_input, pair.edges, label="input", color="0.3", fill=True, alpha=0.4)
            ax.stairs(pair.density_reconstruction, pair.edges, label="reconstruction", color="tab:red")
            ax.text(0.97, 0.95, f"KL = {pair.kld:.3f}\nH(in)−H(rec) = {pair.paper_expression:.3f}",
                    transform=ax.transAxes, ha="right", va="top", fontsize=7)
            ax.tick_params(labelsize=7)
            if i == 0:
                ax.set_title(f"{dataset}, contrast x^{cl:g}", fontsize=8)
            if j == 0:
                ax.set_ylabel(f"{quality.model_label(spec)}\ndensity", fontsize=8)
            if i == 1:
                ax.set_xlabel("intensity", fontsize=8)
    handles, labels = axes[0, 0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=2, fontsize=8, frameon=False)
    fig.suptitle(f"Input vs reconstruction histograms ({cfg.n_bins} bins, fold {cfg.figure_fold}; "
                 f"BraTS21: healthy-annotated voxels) — paper Fig. 3", fontsize=9)
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    return fig


def write_kld(table: pd.DataFrame, cfg: DomainShiftConfig) -> Path:
    """``results/kld.csv`` and ``kld.md`` with both readings of the paper's KLD labelled; returns the CSV path."""
    out = paths.results_dir(cfg.profile)
    save_dataframe(table, out / "kld.csv")
    lines = [
        "# KLD of input vs reconstruction intensity histograms (paper §4.5.2, §5.3, Fig. 3)", "",
        tables.markdown_table(table), "",
        f"- KL(in‖rec): true Kullback-Leibler divergence D_KL(p_input ‖ p_reconstruction) in nats of {cfg.n_bins}-bin "
        f"histograms over a range shared by both; ε = {cfg.kl_eps:g} added to every bin probability, renormalised.",
        "- H(in)−H(rec): the paper's printed formula read literally — a difference of Shannon entropies, not a "
        "divergence (signed; 0 for any two histograms of equal entropy).",
        f"- Models: {quality.model_label(cfg.ddpm)} vs {quality.model_label(cfg.cddpm)} (T2), variant "
        f"'{cfg.diffusion_variant}'; voxels pooled over the test volumes of each fold; IXI: brain; other sets: brain "
        "minus the annotated anomaly. Contrast x^cl applied to the input before reconstruction.",
        "- Ratio: of the fold means. Paper ratio: KLD(DDPM)/KLD(cDDPM) on IXI from §5.3 (2.3, 4.0, 17.0).",
    ]
    save_text("\n".join(lines) + "\n", out / "kld.md")
    return out / "kld.csv"
