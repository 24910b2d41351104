"""pDDPM: patched diffusion models for UAD (Behrendt et al. 2023, arXiv 2303.03758; baseline of paper §4.4).

Same U-Net, schedule and simplex noise as the DDPM (:mod:`cddpm_lib.models.ddpm`); only the region that is
noised changes:

- **training**: one patch of a regular grid, drawn uniformly per slice, is noised to ``x_t`` while the rest of the
  slice stays clean, ``x_in = (1 − m) · x0 + m · x_t`` (all of it in the DDPM's ``signal_range``); the network
  predicts ``x0`` and ``L_rec`` is the mean ``|x0 − x̂0|`` over the patch (and the brain when ``mask_loss``);
- **test**: each patch in turn is noised with the others clean, reconstructed in one pass at ``t_test``, and the
  patch reconstructions are stitched together (pixels covered by several patches — only with overlapping strides —
  are averaged); a sequence of ``t_test`` averages the stitched reconstructions (ENS).

All patches × slices × time steps of a volume go through the network in batches of at most ``max_batch``. One
noise field is drawn per (slice, t) and shared by that slice's patches.

Patch size: the authors use 48-px patches with stride 48 at 96 px (a 2 × 2 grid). Here
``patch_fraction = 0.5`` (of the image side) and ``stride_fraction = None`` (= the patch size) keep that grid at
any image size; the last patch of a row/column is moved inwards when the stride does not tile the image.
"""
from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import Tensor

from ..diffusion import as_timesteps, l1_loss
from .ddpm import DiffusionAD, check_image_size


def patch_starts(length: int, patch: int, stride: int) -> list[int]:
    """Start positions of patches of size ``patch`` every ``stride`` pixels covering ``0..length − 1``."""
    if not 1 <= patch <= length or stride < 1:
        raise ValueError(f"pddpm: need 1 <= patch <= image side and stride >= 1, got patch={patch}, "
                         f"side={length}, stride={stride}")
    starts = list(range(0, length - patch + 1, stride))
    if starts[-1] != length - patch:
        starts.append(length - patch)
    return starts


def patch_masks(image_size: Sequence[int], patch_size: Sequence[int], stride: Sequence[int]) -> Tensor:
    """Binary masks ``[P, 1, H, W]`` of the patch grid, row-major."""
    (h, w), (ph, pw), (sh, sw) = image_size, patch_size, stride
    masks = []
    for y in patch_starts(h, ph, sh):
        for x in patch_starts(w, pw, sw):
            m = torch.zeros(1, h, w)
            m[:, y:y + ph, x:x + pw] = 1
            masks.append(m)
    return torch.stack(masks)


def stitch(patch_x0: Tensor, masks: Tensor) -> Tensor:
    """Stitch per-patch reconstructions: ``Σ_p m_p · x̂0^(p) / Σ_p m_p``.

    patch_x0: [P, B, C, H, W] (reconstruction with patch p noised); masks: [P, 1, H, W] -> [B, C, H, W].
    """
    m = masks.to(patch_x0.dtype)[:, None]
    return (m * patch_x0).sum(0) / m.sum(0).clamp_min(1.0)


class PatchedDiffusionAD(DiffusionAD):
    """pDDPM (Behrendt et al. 2023): DDPM trained and applied on one noised patch at a time."""

    name = "pddpm"
    extra_hparams = ("patch_fraction", "stride_fraction")

    def __init__(self, image_size: Sequence[int], patch_fraction: float = 0.5, stride_fraction: float | None = None,
                 **kwargs: Any) -> None:
        super().__init__(image_size, patch_fraction=patch_fraction, stride_fraction=stride_fraction, **kwargs)
        if not 0 < patch_fraction <= 1 or (stride_fraction is not None and not 0 < stride_fraction <= 1):
            raise ValueError(f"pddpm: patch_fraction and stride_fraction must lie in (0, 1], "
                             f"got {patch_fraction}, {stride_fraction}")
        patch = tuple(max(1, round(s * patch_fraction)) for s in self.image_size)
        stride = patch if stride_fraction is None else tuple(max(1, round(s * stride_fraction))
                                                              for s in self.image_size)
        self.patch_size, self.stride = patch, stride
        self.register_buffer("masks", patch_masks(self.image_size, patch, stride), persistent=False)

    def noise_patch(self, x0: Tensor, x_t: Tensor, m: Tensor) -> Tensor:
        """``(1 − m) · x0 + m · x_t``: noise inside the patch, clean elsewhere."""
        return torch.where(m.bool(), x_t, x0)

    def loss(self, batch: dict[str, Tensor], generator: torch.Generator | None = None) -> Tensor:
        """``mean_{patch} |x0 − x̂0|`` with one random grid patch noised to a random ``t`` per slice."""
        x0 = batch["image"]
        self.check_slices(x0, "loss")
        d = self.diffusion
        b = x0.shape[0]
        t = d.sample_timesteps(b, generator, x0.device)
        src = generator.device if generator is not None else x0.device
        which = torch.randint(0, self.masks.shape[0], (b,), generator=generator, device=src).to(x0.device)
        m = self.masks[which]
        x0 = d.to_signal(x0)  # the whole slice in the signal range, as the authors' code (clean part included)
        x_in = self.noise_patch(x0, d.q_sample(x0, t, d.noise_like(x0, generator)), m)
        region = m
        if self.mask_loss:
            if "mask" not in batch:
                raise KeyError("pddpm.loss: mask_loss=True needs a 'mask' entry in the batch")
            region = m * batch["mask"].to(m.dtype)
        return l1_loss(self.denoise(x_in, t), x0, region)

    @torch.no_grad()
    def reconstruct(self, x: Tensor, mask: Tensor | None = None, t_test: int | Sequence[int] = 500,
                    max_batch: int | None = 64, conditioning_image: Tensor | None = None,
                    generator: torch.Generator | None = None, **kwargs: Any) -> Tensor:
        """Patch-wise one-step reconstruction, stitched, averaged over ``t_test`` (ENS); ``x: [B, 1, H, W]``."""
        if kwargs:
            raise TypeError(f"pddpm.reconstruct: unexpected arguments {sorted(kwargs)}")
        if conditioning_image is not None:
            raise ValueError("pddpm.reconstruct: the patched DDPM takes no conditioning_image")
        self.check_slices(x, "reconstruct")
        d = self.diffusion
        ts = as_timesteps(t_test, d.T)
        n_t, n_p, b = len(ts), self.masks.shape[0], x.shape[0]
        t = torch.tensor(ts, device=x.device).repeat_interleave(b)                        # [n_t · B]
        x_rep = d.to_signal(x).repeat(n_t, 1, 1, 1)
        x_t = d.q_sample(x_rep, t, d.test_noise(x, ts, generator))
        # order (t, patch, slice)
        m = self.masks[None, :, None]                                                     # [1, P, 1, 1, H, W]
        x_in = self.noise_patch(x_rep.view(n_t, 1, b, *x.shape[1:]), x_t.view(n_t, 1, b, *x.shape[1:]), m)
        t_in = t.view(n_t, 1, b).expand(n_t, n_p, b)
        x_hat = d.predict_x0(self.denoise, x_in.reshape(-1, *x.shape[1:]), t_in.reshape(-1), None, max_batch)
        x_hat = x_hat.view(n_t, n_p, b, *x.shape[1:])
        return d.from_signal(torch.stack([stitch(x_hat[i], self.masks) for i in range(n_t)]).mean(0))


def build_pddpm(image_size: Sequence[int], patch_fraction: float = 0.5, stride_fraction: float | None = None,
                **kwargs: Any) -> PatchedDiffusionAD:
    """pDDPM of Behrendt et al. (2023): :func:`~cddpm_lib.models.ddpm.build_ddpm`'s arguments plus the patch grid
    (``patch_fraction`` of the image side, default 0.5 = the authors' 48 px at 96 px; ``stride_fraction=None``:
    stride = patch size, a non-overlapping grid)."""
    check_image_size(image_size, len(kwargs.get("channel_mult", (1, 2, 2))), "pddpm")
    return PatchedDiffusionAD(image_size, patch_fraction=patch_fraction, stride_fraction=stride_fraction, **kwargs)
