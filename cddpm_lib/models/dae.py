"""Denoising autoencoder (DAE) baseline: a U-Net trained to remove coarse noise.

Source: Kascenas, Pugeault, O'Neil (2022), *Denoising autoencoders for unsupervised anomaly detection in brain
MRI*, MIDL (PMLR 172) — the row "DAE" of the cDDPM paper (Behrendt et al. 2023, §4.4, Tables 2–4).

Training (Kascenas et al. §2): corrupt a healthy slice with *coarse* noise and regress the clean slice,

    ε_low ~ N(0, σ² I) on a ``noise_res`` grid,  ε = roll(upsample_bilinear(ε_low), random shift) · mask,
    L = mean_pixels( mask · (U(x + ε) − x)² ),     σ = 0.2,

so the network learns to "heal" blob-like intensity deviations. At test time the clean input is passed through
``U`` and the residual ``|x − U(x)|`` is the anomaly map (base class).

Choices (builder arguments):

- ``noise_res``: Kascenas et al. draw 16×16 noise for 128-px slices; ``None`` keeps that ratio,
  ``round(16 · side / 128)`` per side (12 at 96 px, 8 at 64 px, 4 at 32 px) — :func:`cddpm_lib.noise.coarse_noise`.
  The noise field is translated by one random cyclic shift per batch (as in the authors' code) and applied
  inside the brain mask only.
- Network: the kit's U-Net (:class:`cddpm_lib.unet.UNet`) without time embedding or conditioning, widths
  64·(1, 2, 4, 8) — the depth-4, 64-channel U-Net of Kascenas et al.'s experiments — one residual block per
  level, no attention.
- Loss: masked ℓ2 as in the authors' code (``loss="l1"`` offered). The validation loss draws its noise from a
  fixed seed, so ``best.pt`` is chosen on the same corruptions every epoch.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from ..noise import coarse_noise
from ..unet import UNet
from .ae import LOSSES, ReconstructionModel, as_image_size, check_slices, reconstruction_error

#: seed of the coarse noise in :meth:`DAE.validation_loss` (deterministic model selection)
VALIDATION_SEED = 0


def random_cyclic_shift(noise: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """Translate ``[B, C, H, W]`` by one random cyclic shift per batch (Kascenas et al.'s code), so that the
    coarse grid of the noise does not sit at the same pixels in every training batch."""
    shift = [int(torch.randint(0, n, (1,), generator=generator)) for n in noise.shape[-2:]]
    return torch.roll(noise, shifts=shift, dims=(-2, -1))


class DAE(ReconstructionModel):
    """U-Net denoiser ``U`` (Kascenas et al. 2022): trained on ``x + ε_coarse``, reconstructs ``x̂ = U(x)``."""

    name = "dae"

    def __init__(self, image_size: Sequence[int], model_channels: int = 64, channel_mult: Sequence[int] = (1, 2, 4, 8),
                 num_res_blocks: int = 1, noise_res: Sequence[int] | int | None = None, noise_std: float = 0.2,
                 loss: str = "l2", lr: float | None = None) -> None:
        if loss not in LOSSES:
            raise ValueError(f"dae: loss must be one of {LOSSES}, got {loss!r}")
        if noise_std < 0:
            raise ValueError(f"dae: noise_std must be >= 0, got {noise_std}")
        if isinstance(noise_res, int):
            noise_res = (noise_res, noise_res)
        if noise_res is not None and (len(noise_res) != 2 or min(noise_res) < 1):
            raise ValueError(f"dae: noise_res must be a positive int, two positive ints or None, got {noise_res!r}")
        super().__init__(image_size, lr=lr, model_channels=model_channels, channel_mult=tuple(channel_mult),
                         num_res_blocks=num_res_blocks,
                         noise_res=None if noise_res is None else tuple(int(n) for n in noise_res),
                         noise_std=noise_std, loss=loss)
        as_image_size(self.image_size, len(channel_mult) - 1, "dae")
        self.noise_res = None if noise_res is None else tuple(int(n) for n in noise_res)
        self.noise_std = noise_std
        self.loss_kind = loss
        self.unet = UNet(in_channels=1, out_channels=1, model_channels=model_channels,
                         channel_mult=tuple(channel_mult), num_res_blocks=num_res_blocks, attention_levels=(),
                         mid_attention=False, use_time=False, cond_dim=None)

    def forward(self, x: Tensor) -> Tensor:
        return self.unet(x)

    def corrupt(self, x: Tensor, mask: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """``x + ε_coarse · mask`` (module docstring); ``x, mask: [B, 1, H, W]``."""
        noise = coarse_noise(x.shape, resolution=self.noise_res, std=self.noise_std, generator=generator)
        return x + random_cyclic_shift(noise, generator).to(x.device, x.dtype) * mask

    def denoising_loss(self, batch: dict[str, Tensor], generator: torch.Generator | None = None) -> Tensor:
        """Masked denoising loss ``mean(mask · (U(x + ε) − x)²)``."""
        x = batch["image"]
        check_slices(x, self.image_size, "dae.loss")
        if "mask" not in batch:
            raise KeyError("dae.loss: the batch needs a 'mask' entry (brain mask) to place the coarse noise")
        mask = batch["mask"].to(x.dtype)
        return reconstruction_error(self(self.corrupt(x, mask, generator)), x, self.loss_kind, mask)

    def loss(self, batch: dict[str, Tensor]) -> Tensor:
        return self.denoising_loss(batch)

    @torch.no_grad()
    def validation_loss(self, batch: dict[str, Tensor]) -> float:
        """Denoising loss with noise from a fixed seed, so that scores of different epochs are comparable."""
        return float(self.denoising_loss(batch, torch.Generator().manual_seed(VALIDATION_SEED)))


def build_dae(image_size: Sequence[int], model_channels: int = 64, channel_mult: Sequence[int] = (1, 2, 4, 8),
              num_res_blocks: int = 1, noise_res: Sequence[int] | int | None = None, noise_std: float = 0.2,
              loss: str = "l2", lr: float | None = None) -> DAE:
    """DAE of Kascenas et al. (2022) with coarse noise σ = 0.2; see the module docstring for every choice."""
    return DAE(image_size, model_channels=model_channels, channel_mult=channel_mult, num_res_blocks=num_res_blocks,
               noise_res=noise_res, noise_std=noise_std, loss=loss, lr=lr)
