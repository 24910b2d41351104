"""Thresh baseline: the (optionally histogram-equalised) input intensity itself is the anomaly map.

Source: Meissen, Kaissis, Rueckert (2022), *Challenging current semi-supervised anomaly segmentation methods
for brain MRI*, MICCAI BrainLes workshop (and their MIDL 2022 note *On the pitfalls of using the residual as
anomaly score*): on FLAIR scans, thresholding the intensity of the input — lesions are hyperintense — rivals
reconstruction-based detectors. The cDDPM paper (Behrendt et al. 2023, Table 3) reports it as the deterministic
row "Thresh". Nothing is learnt (``trainable = False``); the threshold itself is found downstream by the same
greedy DICE search as for every model (Zimmerer et al. 2019).

    A(x) = mask · g(x),   g(x) = x (``polarity = +1``)  or  1 − x (``polarity = −1``),

optionally after histogram equalisation ``x ← F̂(x)`` with ``F̂`` the empirical CDF of the brain voxels of the
call (Meissen et al. equalise the histograms of their scans). ``A`` is deterministic and lies in ``[0, 1]``.

Choices where the sources are silent (builder arguments):

- ``polarity``: Meissen et al. only treat hyperintense lesions (FLAIR). Tumours and MS lesions are hyperintense
  in the T2 scans of BraTS21/MSLUB, so ``polarity = +1`` (default) is the method as published. Stroke lesions
  (ATLAS) and white-matter hyperintensities seen on T1 (WMH) are *hypointense* on T1; ``polarity = −1``
  (inverted intensity) is the natural transfer of the idea to T1 and what a T1 evaluation should pass. Note that
  with ``−1`` cerebrospinal fluid (dark on T1) also scores high: the baseline stays intentionally naive.
- ``equalize = False`` by default (the kit's volumes are already percentile-normalised to ``[0, 1]``). With
  ``equalize = True`` the CDF is taken over the brain voxels of all slices passed in one call, so the model asks
  for whole volumes (``needs_whole_volume``) to make the map independent of batching.
- ``mask=None`` falls back to the foreground ``x > 0`` (background is 0 after preprocessing).
- :meth:`reconstruct` returns ``x − A(x)`` so that ``|x − x̂| = A`` holds like for every other model; it is not
  an image (Thresh has no reconstruction and is absent from Table 2).
"""
from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import Tensor

from .ae import check_slices
from .base import UADModel


def empirical_cdf(x: Tensor, mask: Tensor) -> Tensor:
    """Histogram equalisation by the empirical CDF of the masked voxels: each voxel of ``x`` maps to the fraction
    of masked voxels ``≤`` its value (in ``[0, 1]``). ``x, mask: [B, 1, H, W]``; unmasked voxels map the same way."""
    values = torch.sort(x[mask > 0].flatten()).values
    if values.numel() == 0:
        return torch.zeros_like(x)
    ranks = torch.searchsorted(values, x.contiguous(), right=True)
    return ranks.to(x.dtype) / values.numel()


class Thresh(UADModel):
    """Intensity thresholding (Meissen et al. 2022): ``A(x) = mask · g(x)``; no parameters, no training."""

    name = "thresh"
    trainable = False

    def __init__(self, image_size: Sequence[int], polarity: int = 1, equalize: bool = False) -> None:
        if polarity not in (1, -1):
            raise ValueError(f"thresh: polarity must be +1 (hyperintense lesions, T2/FLAIR) or -1 "
                             f"(hypointense lesions, T1), got {polarity!r}")
        super().__init__(image_size=tuple(int(s) for s in image_size), polarity=polarity, equalize=bool(equalize))
        self.image_size = tuple(int(s) for s in image_size)
        self.polarity = polarity
        self.equalize = bool(equalize)
        self.needs_whole_volume = self.equalize  # instance value shadows the class default

    def loss(self, batch: dict[str, Tensor]) -> Tensor:
        raise RuntimeError("thresh has nothing to train (trainable = False); the training stage skips it")

    @torch.no_grad()
    def validation_loss(self, batch: dict[str, Tensor]) -> float:
        raise RuntimeError("thresh has nothing to validate (trainable = False); the training stage skips it")

    @torch.no_grad()
    def anomaly_map(self, x: Tensor, mask: Tensor | None = None, **kwargs: Any) -> Tensor:
        """``A(x) = mask · g(x)`` in ``[0, 1]`` for ``x: [B, 1, H, W]`` (module docstring)."""
        check_slices(x, self.image_size, "thresh.anomaly_map")
        mask = (x > 0) if mask is None else mask
        if mask.shape != x.shape:
            raise ValueError(f"thresh.anomaly_map: mask shape {list(mask.shape)} != image shape {list(x.shape)}")
        mask = (mask > 0).to(x.dtype)
        intensity = empirical_cdf(x, mask) if self.equalize else x.clamp(0.0, 1.0)
        score = intensity if self.polarity == 1 else 1.0 - intensity
        return score * mask

    @torch.no_grad()
    def reconstruct(self, x: Tensor, mask: Tensor | None = None, **kwargs: Any) -> Tensor:
        """``x − A(x)``: only there so that ``|x − x̂| = A``; not an image (module docstring)."""
        return x - self.anomaly_map(x, mask)


def build_thresh(image_size: Sequence[int], polarity: int = 1, equalize: bool = False) -> Thresh:
    """Thresh of Meissen et al. (2022); ``polarity = -1`` for T1 evaluations (module docstring)."""
    return Thresh(image_size, polarity=polarity, equalize=equalize)
