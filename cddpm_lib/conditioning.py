"""The conditioning effect of cDDPM (paper §4.5.2, §5.2, Fig. 2): crop and contrast of the conditioning image.

Paper §4.5.2: "we crop the conditioning image at a given width of 50 % and 100 % where 100 % indicates that the
full input image is used as the conditioning image. Furthermore, we simulate different contrast levels
cl ∈ [0.3, 0.7, 1.0, 1.5, 2.0] … derived by potentiating the gray values by the respective contrast level,
i.e. x^{cl=2} = x^2". Fig. 2 shows, per contrast level (rows), the input, cDDPM reconstructions at 50 % noise
(t_test = 500) for each crop, and cDDPM vs DDPM at 100 % noise (t_test = T = 1000), where the noisy input carries
no information and only the conditioning image can tell the model what to reconstruct.

Choices where the paper is silent (parameters of :func:`conditioning_experiment`):

- "Width" is the left-right axis ``X`` of the ``[X, Y, Z]`` volumes, i.e. axis −2 of a ``[B, 1, X, Y]`` slice,
  which the kit's figures (``np.rot90``) show horizontally. Cropping keeps the first ``fraction · X`` columns (the
  left part of the figure) and sets the rest to 0 (background), so the encoder keeps its input size. The same
  contrast is applied to the input and to the conditioning image, as in the paper.
- Reconstructions are the kit's one-step reconstruction from ``x_t`` (the paper's test-time procedure), also at
  t = 1000; every reconstruction of one row draws the same noise (one seed), so columns differ only by model,
  noise level and conditioning.
- The slice is the axial slice with the largest brain area of the first healthy test volume.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import numpy as np
import torch
from torch import Tensor

from .runtime import autocast, effective_amp

#: contrast levels cl of Fig. 2 (paper §4.5.2)
CONTRAST_LEVELS: tuple[float, ...] = (0.3, 0.7, 1.0, 1.5, 2.0)
#: widths of the conditioning image kept (paper §4.5.2)
CROP_FRACTIONS: tuple[float, ...] = (0.5, 1.0)


def apply_contrast(x, cl: float):
    """Simulated contrast ``x^cl`` (paper §4.5.2), for numpy arrays or tensors with values in [0, 1].

    Negative values (none in preprocessed data) are clipped to 0 first so that fractional powers stay real.
    """
    if not cl > 0:
        raise ValueError(f"contrast level must be > 0, got {cl}")
    if isinstance(x, Tensor):
        return x.clamp(min=0).pow(cl)
    return np.power(np.clip(np.asarray(x, dtype=np.float32), 0, None), cl, dtype=np.float32)


def crop_width(x, fraction: float, axis: int = -2):
    """Keep the first ``fraction`` of the width (``axis``, default the ``X`` axis of ``[..., X, Y]`` slices) and
    zero the rest; same shape as ``x``. ``fraction = 1`` returns the image unchanged (the full conditioning
    image), ``0.5`` its left half as the figures show it."""
    if not 0 < fraction <= 1:
        raise ValueError(f"crop fraction must be in (0, 1], got {fraction}")
    keep = int(round(fraction * x.shape[axis]))
    out = x.clone() if isinstance(x, Tensor) else np.array(x, copy=True)
    index = [slice(None)] * out.ndim
    index[axis] = slice(keep, None)
    out[tuple(index)] = 0
    return out


def largest_brain_slice(brain_mask: np.ndarray) -> int:
    """Index of the axial slice (last axis of ``[X, Y, Z]``) with the most brain voxels."""
    area = (np.asarray(brain_mask) > 0).reshape(-1, brain_mask.shape[-1]).sum(axis=0)
    if area.max() == 0:
        raise ValueError("largest_brain_slice: the brain mask is empty")
    return int(np.argmax(area))


@dataclasses.dataclass
class ConditioningGrid:
    """Images of Fig. 2: ``panels[column]`` is ``[n_contrasts, H, W]``, rows follow ``contrasts``."""

    contrasts: tuple[float, ...]
    columns: list[str]
    panels: dict[str, np.ndarray]
    blocks: list[tuple[str, list[str]]]  # (block title, its columns) in display order


def _reconstruct(model, x: Tensor, mask: Tensor, t_test: int, seed: int, conditioning: Tensor | None,
                 max_batch: int, amp: str) -> np.ndarray:
    torch.manual_seed(seed)
    kwargs: dict[str, Any] = {"t_test": t_test, "max_batch": max_batch}
    if conditioning is not None:
        kwargs["conditioning_image"] = conditioning
    with torch.no_grad(), autocast(amp, x.device):
        out = model.reconstruct(x, mask, **kwargs)
    return out[0, 0].detach().float().cpu().numpy()


def conditioning_experiment(cddpm, ddpm, image: np.ndarray, brain_mask: np.ndarray, *,
                            contrasts: Sequence[float] = CONTRAST_LEVELS, crops: Sequence[float] = CROP_FRACTIONS,
                            t_half: int = 500, t_full: int = 1000, seed: int = 0,
                            device: str | torch.device = "cpu", max_batch: int = 32,
                            amp: str = "none") -> ConditioningGrid:
    """Fig. 2: reconstructions of one slice under cropped/contrast-changed conditioning.

    cddpm: model whose ``reconstruct(x, mask, t_test=, max_batch=, conditioning_image=)`` feeds
    ``conditioning_image`` to its encoder; ddpm: the unconditioned model (``None`` skips its column).
    image, brain_mask: one axial slice ``[H, W]`` (image in [0, 1]). amp: mixed precision of the
    reconstructions (:func:`runtime.effective_amp`: float32 where it cannot run on ``device``; a stage says so
    once with :func:`runtime.stage_amp`).
    """
    if image.ndim != 2 or image.shape != brain_mask.shape:
        raise ValueError(f"conditioning_experiment: expected one [H, W] slice and its mask, got {image.shape} "
                         f"and {brain_mask.shape}")
    amp = effective_amp(amp, torch.device(device))[0]
    to4d = torch.as_tensor(np.asarray(image, np.float32), device=device)[None, None]
    mask = torch.as_tensor((np.asarray(brain_mask) > 0).astype(np.float32), device=device)[None, None]
    cddpm.to(device).eval()
    if ddpm is not None:
        ddpm.to(device).eval()
    pct = [f"{int(round(100 * c))} %" for c in crops]
    blocks = [("input and conditioning images", ["input x^cl"] + [f"conditioning {p}" for p in pct]),
              (f"cDDPM, t = {t_half}", [f"cDDPM {p}, t={t_half}" for p in pct]),
              (f"cDDPM vs DDPM, t = {t_full} (pure noise)", [f"cDDPM {p}, t={t_full}" for p in pct]
               + ([f"DDPM, t={t_full}"] if ddpm is not None else []))]
    columns = [c for _, cols in blocks for c in cols]
    rows: dict[str, list[np.ndarray]] = {c: [] for c in columns}
    for cl in contrasts:
        x = apply_contrast(to4d, cl) * mask
        rows["input x^cl"].append(x[0, 0].cpu().numpy())
        for frac, p in zip(crops, pct):
            cond = crop_width(x, frac)
            rows[f"conditioning {p}"].append(cond[0, 0].cpu().numpy())
            for t in (t_half, t_full):
                rows[f"cDDPM {p}, t={t}"].append(_reconstruct(cddpm, x, mask, t, seed, cond, max_batch, amp))
        if ddpm is not None:
            rows[f"DDPM, t={t_full}"].append(_reconstruct(ddpm, x, mask, t_full, seed, None, max_batch, amp))
    panels = {c: np.stack(v) for c, v in rows.items()}
    return ConditioningGrid(tuple(float(c) for c in contrasts), columns, panels, blocks)


def plot_conditioning(grid: ConditioningGrid, cell: float = 1.4):
    """Fig. 2 as a grid: rows = contrast levels, columns grouped in the paper's three blocks."""
    import matplotlib.pyplot as plt

    n_rows, n_cols = len(grid.contrasts), len(grid.columns)
    fig, axes = plt.subplots(n_rows, n_cols, figsize=(cell * n_cols, cell * n_rows + 0.6), squeeze=False)
    for j, col in enumerate(grid.columns):
        for i, cl in enumerate(grid.contrasts):
            ax = axes[i, j]
            ax.imshow(np.rot90(grid.panels[col][i]), cmap="gray", vmin=0, vmax=1)
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_title(col, fontsize=7)
            if j == 0:
                ax.set_ylabel(f"cl = {cl:g}", fontsize=8)
    titles = "   |   ".join(title for title, _ in grid.blocks)
    fig.suptitle(f"Conditioning effect (paper Fig. 2), rows: contrast x^cl of input and conditioning image — "
                 f"{titles}", fontsize=8)
    fig.tight_layout()
    return fig
