"""Post-processing of residual maps and the threshold search (paper §4.3, supplement Table 4).

Paper §4.3: "First, a median filter with a kernel size of K = 5 × 5 × 5 is applied [...]. Subsequently, we perform
brain mask eroding for 3 iterations. [...] We then perform a greedy threshold search [...] on the unhealthy
validation set, as proposed in Zimmerer et al. (2019). After binarization, we use connected component filtering to
remove areas that include less than 7 voxels."

The pipeline is a list of switchable steps (nnU-Net style): ``apply_postprocessing(residual, brain_mask, spec,
threshold=...)`` runs ``spec.steps`` in order; :meth:`PostprocessingSpec.without` drops one for the ablation.

- ``"erode"`` — multiply the residual by the brain mask eroded ``erosion_iterations`` times
  (:func:`erode_brain_mask`). ``erosion_mode="slice"`` erodes each axial slice with the 2D cross (the authors'
  code: ``binary_erosion`` per slice, ``generate_binary_structure(2, 1)``, iterations ``96 // 25 = 3``);
  ``"3d"`` uses the 3D 6-neighbourhood.
- ``"median"`` — 3D median filter ``median_size³`` with SciPy's default ``reflect`` border (:func:`median_filter`).
- ``"threshold"`` — ``residual > t`` (strict, as the authors).
- ``"cc"`` — remove connected components (26-connectivity, skimage ``connectivity=3`` as the authors) smaller
  than ``cc_min_size`` voxels (:func:`remove_small_components`).

Documented choices where paper and code differ (all are parameters):

- **Order of erosion and median filter**: the text says median first, the authors' code erodes (masks) first and
  then filters. Default: the code's order ``("erode", "median", "threshold", "cc")`` — it produced the numbers;
  ``("median", "erode", ...)`` is the text's.
- **CC size**: the text says "less than 7 voxels"; the code removes components whose ``filled_area ≤ 7``, i.e.
  keeps ≥ 8. Default ``cc_min_size = 8`` (code); 7 is the text. (``filled_area`` also counts enclosed holes; a
  component of ≤ 7 voxels can enclose at most a single voxel, so counting voxels differs only for a 7-voxel
  shell around a hole — negligible, noted here.)
- **Without BE** (Table 4) the authors apply no brain mask at all; dropping ``"erode"`` does the same.

Threshold search on the pooled voxels of the unhealthy validation set (the continuous maps after the steps before
``"threshold"``; CC is applied to the test predictions only, as in the authors' code):

- :func:`bisection_threshold` — Zimmerer et al.'s iterative search on ``(0, max residual)``: 10 halvings, each
  comparing the DICE at the lower and upper quartile points of the interval (the authors' ``find_best_val``).
- :func:`exact_threshold` — the global optimum over all thresholds (one sort, :func:`metrics.pooled_rank_stats`);
  never worse than bisection on the validation set. The returned ``t`` lies midway between the optimal positive
  score and the next lower score.
"""
from __future__ import annotations

import dataclasses
from typing import Literal, Sequence

import numpy as np
from scipy import ndimage as ndi

from .metrics import dice_at, pooled_rank_stats

STEPS: tuple[str, ...] = ("erode", "median", "threshold", "cc")
#: Table 4 labels -> step names
ABLATION_STEPS: dict[str, str] = {"CC": "cc", "MF": "median", "BE": "erode"}


@dataclasses.dataclass(frozen=True)
class PostprocessingSpec:
    """The post-processing pipeline (paper §4.3; defaults: the authors' code, module docstring)."""

    steps: tuple[str, ...] = STEPS
    erosion_iterations: int = 3
    erosion_mode: Literal["slice", "3d"] = "slice"
    median_size: int = 5
    cc_min_size: int = 8
    cc_connectivity: int = 3

    def __post_init__(self) -> None:
        steps = tuple(self.steps)
        object.__setattr__(self, "steps", steps)
        unknown = [s for s in steps if s not in STEPS]
        if unknown or len(set(steps)) != len(steps):
            raise ValueError(f"postprocessing: steps must be distinct names from {STEPS}, got {steps}")
        if "cc" in steps and ("threshold" not in steps or steps.index("cc") < steps.index("threshold")):
            raise ValueError("postprocessing: 'cc' works on the binary map and must come after 'threshold'")
        if "threshold" in steps and any(steps.index(s) > steps.index("threshold") for s in ("erode", "median")
                                        if s in steps):
            raise ValueError("postprocessing: 'erode' and 'median' act on the continuous residual, before "
                             "'threshold'")
        if self.median_size < 1 or self.median_size % 2 == 0:
            raise ValueError(f"postprocessing: median_size must be odd and >= 1, got {self.median_size}")
        if self.erosion_iterations < 0 or self.erosion_mode not in ("slice", "3d"):
            raise ValueError(f"postprocessing: erosion_iterations >= 0 and erosion_mode 'slice'|'3d', got "
                             f"{self.erosion_iterations}, {self.erosion_mode!r}")
        if self.cc_connectivity not in (1, 2, 3) or self.cc_min_size < 1:
            raise ValueError("postprocessing: cc_connectivity in {1, 2, 3} and cc_min_size >= 1")

    @property
    def continuous_steps(self) -> tuple[str, ...]:
        """Steps applied before binarisation (those the threshold search sees)."""
        return tuple(s for s in self.steps if s in ("erode", "median"))

    def without(self, *steps: str) -> "PostprocessingSpec":
        """The same pipeline with ``steps`` (names or Table 4 labels CC/MF/BE) removed."""
        drop = {ABLATION_STEPS.get(s, s) for s in steps}
        return dataclasses.replace(self, steps=tuple(s for s in self.steps if s not in drop))


# --------------------------------------------------------------------------------------------------------------
# The steps


def erode_brain_mask(mask: np.ndarray, iterations: int = 3, mode: Literal["slice", "3d"] = "slice") -> np.ndarray:
    """Binary erosion of ``mask [X, Y, Z]``: per axial slice (2D cross) or in 3D (6-neighbourhood) -> bool."""
    m = np.asarray(mask) > 0
    if iterations == 0:
        return m
    if mode == "slice":
        structure = ndi.generate_binary_structure(2, 1)[:, :, None]  # in-plane only: each z slice on its own
    elif mode == "3d":
        structure = ndi.generate_binary_structure(3, 1)
    else:
        raise ValueError(f"erode_brain_mask: mode must be 'slice' or '3d', got {mode!r}")
    return ndi.binary_erosion(m, structure=structure, iterations=int(iterations))


def _box_sum(a: np.ndarray, size: int) -> np.ndarray:
    """Sums of all ``size³`` windows of ``a`` (valid part: shape ``a.shape − size + 1``), exact integers."""
    c = np.zeros(tuple(s + 1 for s in a.shape), np.int64)
    c[1:, 1:, 1:] = a.astype(np.int64).cumsum(0).cumsum(1).cumsum(2)
    n = tuple(s - size + 1 for s in a.shape)
    lo = [slice(0, n[i]) for i in range(3)]
    hi = [slice(size, size + n[i]) for i in range(3)]
    out = np.zeros(n, np.int64)
    for corner in np.ndindex(2, 2, 2):
        sl = tuple(hi[i] if corner[i] else lo[i] for i in range(3))
        out += (-1) ** (3 - sum(corner)) * c[sl]
    return out


def _median_numpy(x: np.ndarray, size: int, chunk: int = 1 << 16) -> np.ndarray:
    """Exact median filter (SciPy semantics) by ``np.partition`` over the windows; for non-negative inputs the
    windows holding more than half zeros are 0 without sorting (most of a masked residual)."""
    p, n = size // 2, size ** 3
    k = n // 2
    xp = np.pad(x, p, mode="symmetric")  # = SciPy's mode "reflect"
    out = np.zeros_like(x)
    if x.size and x.min() >= 0:
        active = np.flatnonzero(_box_sum(xp == 0, size) <= k)
    else:
        active = np.arange(x.size)
    windows = np.lib.stride_tricks.sliding_window_view(xp, (size, size, size))
    flat = out.reshape(-1)
    for i in range(0, active.size, chunk):
        idx = active[i:i + chunk]
        w = windows[np.unravel_index(idx, x.shape)].reshape(idx.size, n)
        flat[idx] = np.partition(w, k, axis=1)[:, k]
    return out


def _median_torch(x: np.ndarray, size: int, device: str) -> np.ndarray:
    import torch

    p = size // 2
    t = torch.from_numpy(np.pad(x, p, mode="symmetric")).to(device)
    u = t.unfold(0, size, 1).unfold(1, size, 1).unfold(2, size, 1)
    out = torch.empty(x.shape, dtype=t.dtype, device=device)
    step = max(1, (1 << 22) // (x.shape[1] * x.shape[2] * size ** 3))
    for i in range(0, x.shape[0], step):
        out[i:i + step] = u[i:i + step].reshape(*out[i:i + step].shape, -1).median(-1).values
    return out.cpu().numpy()


def median_filter(volume: np.ndarray, size: int = 5, backend: Literal["numpy", "scipy", "torch", "cuda"] = "numpy"
                  ) -> np.ndarray:
    """3D median filter ``size³`` (SciPy's ``median_filter`` with mode ``reflect``); all backends are exact.

    ``numpy`` (default; ~2–5× SciPy on masked residuals), ``scipy`` (reference), ``torch`` / ``cuda``
    (``Tensor.unfold`` + ``median``; fast on a GPU).
    """
    x = np.asarray(volume)
    if x.ndim != 3 or size % 2 == 0:
        raise ValueError(f"median_filter: expected a 3D volume and an odd size, got {x.shape}, {size}")
    if backend == "scipy":
        return ndi.median_filter(x, size=size, mode="reflect")
    if backend == "numpy":
        return _median_numpy(x, size)
    if backend in ("torch", "cuda"):
        return _median_torch(x, size, "cuda" if backend == "cuda" else "cpu")
    raise ValueError(f"median_filter: unknown backend {backend!r}")


def remove_small_components(binary: np.ndarray, min_size: int = 8, connectivity: int = 3) -> np.ndarray:
    """Drop connected components with fewer than ``min_size`` voxels (``connectivity`` 3 = 26-neighbourhood)."""
    b = np.asarray(binary) > 0
    labels, n = ndi.label(b, structure=ndi.generate_binary_structure(b.ndim, connectivity))
    if n == 0:
        return b
    keep = np.bincount(labels.ravel()) >= min_size
    keep[0] = False
    return keep[labels]


def apply_postprocessing(residual: np.ndarray, brain_mask: np.ndarray | None, spec: PostprocessingSpec, *,
                         threshold: float | None = None, median_backend: str = "numpy") -> np.ndarray:
    """Run ``spec.steps`` on ``residual [X, Y, Z]``: float32 continuous map (no ``"threshold"`` step or
    ``threshold=None`` stops before it) or bool segmentation."""
    out = np.asarray(residual, dtype=np.float32)
    for step in spec.steps:
        if step == "erode":
            if brain_mask is None:
                raise ValueError("apply_postprocessing: the 'erode' step needs the brain mask")
            out = out * erode_brain_mask(brain_mask, spec.erosion_iterations, spec.erosion_mode)
        elif step == "median":
            out = median_filter(out, spec.median_size, median_backend)
        elif step == "threshold":
            if threshold is None:
                return out
            out = out > threshold
        elif step == "cc":
            out = remove_small_components(out, spec.cc_min_size, spec.cc_connectivity)
    return out


def binarize(continuous: np.ndarray, threshold: float, spec: PostprocessingSpec) -> np.ndarray:
    """Steps after the continuous ones: ``> threshold`` and, if in ``spec``, the CC filter -> bool."""
    out = np.asarray(continuous) > threshold
    if "cc" in spec.steps:
        out = remove_small_components(out, spec.cc_min_size, spec.cc_connectivity)
    return out


# --------------------------------------------------------------------------------------------------------------
# Threshold search on the pooled unhealthy validation voxels


def bisection_threshold(scores: np.ndarray, labels: np.ndarray, *, low: float = 0.0, high: float | None = None,
                        steps: int = 10) -> tuple[float, float]:
    """Zimmerer et al.'s iterative search (the authors' ``find_best_val``) -> ``(threshold, validation DICE)``.

    Each step evaluates the DICE of ``scores > q`` at the quartile points ``q`` of the current interval, keeps the
    better half and remembers the best point seen (ties keep the later one, NaN DICE never wins). As in the
    authors' code an interval that collapsed to a point is reopened to ``(low, 1)``.
    """
    s = np.asarray(scores, np.float32).reshape(-1)
    g = np.asarray(labels).reshape(-1).astype(bool)
    hi = float(s.max()) if high is None else float(high)
    lo = float(low)
    keep = s > lo                            # every candidate q ≥ lo: other voxels are never predicted
    n_g = int(g.sum())
    s_k, g_k = s[keep], g[keep]

    def dice(q: float) -> float:
        pred = s_k > q
        denom = int(pred.sum()) + n_g
        return float("nan") if denom == 0 else 2.0 * int((pred & g_k).sum()) / denom

    best, best_t = 0.0, 0.0
    for _ in range(int(steps)):
        if lo == hi:
            hi = 1.0
        q_lo, q_hi = lo + (hi - lo) * 0.25, lo + (hi - lo) * 0.75
        d_lo, d_hi = dice(q_lo), dice(q_hi)
        center = lo + (hi - lo) * 0.5
        if d_lo >= d_hi:
            if d_lo >= best:
                best, best_t = d_lo, q_lo
            hi = center
        else:
            if d_hi >= best:
                best, best_t = d_hi, q_hi
            lo = center
    return best_t, best


def exact_threshold(scores: np.ndarray, labels: np.ndarray) -> tuple[float, float]:
    """Global optimum of the pooled DICE over all thresholds -> ``(threshold, validation DICE)``."""
    s = np.asarray(scores, np.float32).reshape(-1)
    g = np.asarray(labels).reshape(-1).astype(bool)
    stats = pooled_rank_stats(s[None], g[None])
    if stats.n_pos[0] == 0:
        raise ValueError("exact_threshold: the validation set has no annotated voxel")
    top = np.float32(stats.best_score[0])
    lower = s[s < top]
    if lower.size == 0:
        t = np.nextafter(top, np.float32(-np.inf))
    else:
        below = lower.max()
        mid = np.float32((np.float64(below) + np.float64(top)) / 2.0)
        t = mid if below < mid < top else below  # a float32 strictly between, else the lower score itself
    t = float(t)  # exactly representable in float32: `s > t` selects {s ≥ top} for float32 scores
    return t, float(dice_at(s, g, t))


def search_threshold(scores: np.ndarray, labels: np.ndarray, method: Literal["bisection", "exact"] = "bisection",
                     steps: int = 10) -> tuple[float, float]:
    """The threshold of ``method`` on pooled validation voxels -> ``(threshold, validation DICE)``."""
    if method == "bisection":
        return bisection_threshold(scores, labels, steps=steps)
    if method == "exact":
        return exact_threshold(scores, labels)
    raise ValueError(f"search_threshold: method must be 'bisection' or 'exact', got {method!r}")


def stack_pooled(volumes: Sequence[np.ndarray]) -> np.ndarray:
    """Concatenate flattened volumes (pooling for the threshold search)."""
    return np.concatenate([np.asarray(v).reshape(-1) for v in volumes]) if len(volumes) else np.zeros(0)
