"""Segmentation metrics and post-processing at BraTS size, the kit against scikit-learn / SciPy per volume.

Residual-like maps of ``--volumes`` volumes of 96 × 96 × 50 voxels (brain ellipsoid, background 0 as after the
brain-mask multiplication, one hyperintense lesion) are scored twice in this process:

- **reference**: scikit-learn ``average_precision_score`` and ``roc_auc_score`` on each volume (what the authors'
  evaluation does, volume by volume);
- **kit**: :func:`cddpm_lib.metrics.rank_stats` on the whole batch — AUPRC, AUROC and the per-volume best DICE
  from one sort per volume.

Also the 5 × 5 × 5 median filter of the post-processing (:func:`cddpm_lib.postprocessing.median_filter`, NumPy
backend) against ``scipy.ndimage.median_filter``. Medians over ``--repeats``; values must be identical (max |Δ|
reported). The projection to the 1151 BraTS21 test volumes scales the per-volume medians.

    .venv/bin/python -m benchmarks.bench_metrics [--volumes 24] [--repeats 3]
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
from scipy import ndimage as ndi
from sklearn.metrics import average_precision_score, roc_auc_score

from benchmarks import write_section
from cddpm_lib import metrics, postprocessing

RESULTS = Path(__file__).resolve().parent / "results" / "metrics.md"
SHAPE = (96, 96, 50)
BRATS_TEST = 1151


def residual_maps(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``n`` residual-like maps and annotations ``[n, 96, 96, 50]`` (float32 / bool)."""
    rng = np.random.default_rng(seed)
    grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, s) for s in SHAPE], indexing="ij"))
    brain = ((grid / np.array([0.8, 0.9, 0.95])[:, None, None, None]) ** 2).sum(0) <= 1
    maps = np.zeros((n, *SHAPE), np.float32)
    segs = np.zeros((n, *SHAPE), bool)
    for i in range(n):
        c = rng.uniform(-0.4, 0.4, 3)
        r = rng.uniform(0.12, 0.3)
        segs[i] = (((grid - c[:, None, None, None]) / r) ** 2).sum(0) <= 1
        segs[i] &= brain
        base = np.abs(rng.normal(0, 0.05, SHAPE)).astype(np.float32)
        maps[i] = np.where(segs[i], base + rng.uniform(0.05, 0.3), base) * brain
    return maps, segs


def timed(fn, repeats: int) -> tuple[float, object]:
    times, out = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def sklearn_scores(maps, segs):
    ap = [average_precision_score(s.ravel(), m.ravel()) for m, s in zip(maps, segs)]
    au = [roc_auc_score(s.ravel(), m.ravel()) for m, s in zip(maps, segs)]
    return np.array(ap), np.array(au)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--volumes", type=int, default=24)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--median-volumes", type=int, default=3)
    args = ap.parse_args(argv)
    maps, segs = residual_maps(args.volumes)
    n = args.volumes

    t_ref, (ap_ref, au_ref) = timed(lambda: sklearn_scores(maps, segs), max(1, args.repeats - 1))
    t_kit, stats = timed(lambda: metrics.rank_stats(maps, segs), args.repeats)
    d_ap = float(np.max(np.abs(stats.ap - ap_ref)))
    d_au = float(np.max(np.abs(stats.auroc - au_ref)))
    print(f"AUPRC+AUROC: sklearn {t_ref / n * 1e3:.1f} ms/vol, kit {t_kit / n * 1e3:.1f} ms/vol "
          f"({t_ref / t_kit:.1f}x), max |dAP| {d_ap:.2e}, max |dAUROC| {d_au:.2e}", flush=True)

    k = min(args.median_volumes, n)
    t_mref, mref = timed(lambda: [ndi.median_filter(m, size=5) for m in maps[:k]], max(1, args.repeats - 1))
    t_mkit, mkit = timed(lambda: [postprocessing.median_filter(m, 5, "numpy") for m in maps[:k]], args.repeats)
    same = all(np.array_equal(a, b) for a, b in zip(mref, mkit))
    print(f"median 5^3: scipy {t_mref / k:.2f} s/vol, kit {t_mkit / k:.2f} s/vol ({t_mref / t_mkit:.1f}x), "
          f"identical: {same}", flush=True)

    lines = [
        "## Segmentation metrics and median filter (`bench_metrics`)",
        "",
        f"{n} residual-like volumes of 96 × 96 × 50 voxels (BraTS size, background 0, one lesion each); "
        f"medians over {args.repeats} runs (reference: {max(1, args.repeats - 1)}), "
        f"{os.cpu_count()} CPU cores shared with other jobs. Command: `.venv/bin/python -m benchmarks.bench_metrics "
        f"--volumes {n} --repeats {args.repeats}`.",
        "",
        "| task | reference | kit | speed-up | agreement |",
        "|---|---|---|---|---|",
        f"| AUPRC + AUROC per volume | scikit-learn per volume: {t_ref / n * 1e3:.0f} ms/volume | "
        f"`metrics.rank_stats` (+ best DICE): {t_kit / n * 1e3:.0f} ms/volume | {t_ref / t_kit:.1f}× | "
        f"max abs diff AP {d_ap:.1e}, AUROC {d_au:.1e} |",
        f"| median filter 5×5×5 | `scipy.ndimage.median_filter`: {t_mref / k:.2f} s/volume | "
        f"`postprocessing.median_filter` (NumPy): {t_mkit / k:.2f} s/volume | {t_mref / t_mkit:.1f}× | "
        f"{'identical' if same else 'DIFFERENT'} |",
        "",
        f"Projected for the {BRATS_TEST} BraTS21 test volumes of one (row, fold): metrics "
        f"{t_ref / n * BRATS_TEST / 60:.1f} min (scikit-learn) vs {t_kit / n * BRATS_TEST / 60:.1f} min (kit); "
        f"median filter {t_mref / k * BRATS_TEST / 60:.1f} min (SciPy) vs {t_mkit / k * BRATS_TEST / 60:.1f} min "
        "(kit, NumPy; the `cuda` backend is used on a GPU).",
        "",
        "How: every voxel becomes an integer key (score bits · 2 + label), one vectorised NumPy sort per volume, "
        "then only the positives are visited (binary searches for their tie groups): AP, AUROC (mid-ranks) and "
        "the best DICE come from the same pass. The median filter skips windows that are more than half zeros "
        "(their median is 0 for non-negative residuals) and takes `np.partition` of the others.",
    ]
    write_section(RESULTS, lines)
    return 0


if __name__ == "__main__":
    sys.exit(main())
