"""Dense-bottleneck autoencoder (AE) baseline, and the convolutional building blocks the other baselines share.

Source: Baur, Denner, Wiestler, Navab, Albarqouni (2021), *Autoencoders for unsupervised anomaly segmentation
in brain MR images: a comparative study*, Med. Image Anal. 69:101952 — the "dense AE" family. The cDDPM paper
(Behrendt et al. 2023, §4.4, Tables 2–3) uses it as the row "AE".

Architecture (shared with VAE, SVAE and f-AnoGAN through :class:`ConvEncoder` / :class:`ConvDecoder`):

- encoder: ``len(channels)`` convolutions, kernel 5×5, stride 2, each followed by batch norm and LeakyReLU(0.2),
  as in Baur et al.'s dense models; the last feature map is flattened and a linear layer maps it to the
  bottleneck. Image sides must be divisible by ``2 ** len(channels)`` (96 → 6×6 with the default 4 levels).
- decoder: mirror image — linear layer back to the last feature map, transposed convolutions (kernel 5×5,
  stride 2) with batch norm and LeakyReLU, a final 1×1 convolution to one channel.

Choices where the sources are silent (each a builder argument):

- ``channels = (32, 64, 128, 128)`` and ``latent_dim = 512`` (our choice, a dense bottleneck of the size used
  for Baur et al.'s dense models; the cDDPM paper gives no width).
- Reconstruction loss L1 (``loss="l1"``): the comparative study trains all its models with the ℓ1 distance,
  and ℓ1 is also the residual the anomaly map uses. ``loss="l2"`` is offered. The loss is the mean over all
  pixels of the slice (background included, as in Baur et al.).
- Linear output layer; :meth:`reconstruct` clips ``x̂`` to ``[0, 1]`` (the intensity range of the data).
- ``lr``: ``None`` uses the training stage's learning rate; a number overrides it for this model only.
"""
from __future__ import annotations

import math
from typing import Any, Sequence

import torch
from torch import Tensor, nn

from .base import UADModel

LOSSES = ("l1", "l2")


def as_image_size(image_size: Sequence[int], levels: int, where: str) -> tuple[int, int]:
    """Validate ``image_size = (H, W)``: two positive ints, each divisible by ``2 ** levels``."""
    if len(image_size) != 2 or not all(isinstance(s, int) and s > 0 for s in image_size):
        raise ValueError(f"{where}: image_size must be two positive integers (H, W), got {image_size!r}")
    factor = 2**levels
    if any(s % factor for s in image_size):
        raise ValueError(
            f"{where}: image_size {tuple(image_size)} must be divisible by 2**{levels} = {factor} "
            f"({levels} stride-2 levels); change image_size or the number of channels/levels"
        )
    return int(image_size[0]), int(image_size[1])


def reconstruction_error(x_hat: Tensor, x: Tensor, kind: str, mask: Tensor | None = None) -> Tensor:
    """Mean pixel-wise ``|x̂ − x|`` (``l1``) or ``(x̂ − x)²`` (``l2``) over ``[B, 1, H, W]``; with ``mask``
    the error outside the mask is zeroed before the mean (Kascenas et al. 2022)."""
    diff = x_hat - x
    err = diff.abs() if kind == "l1" else diff.pow(2)
    if mask is not None:
        err = err * mask
    return err.mean()


def check_slices(x: Tensor, image_size: tuple[int, int], where: str) -> None:
    """Raise a clear error unless ``x`` is ``[B, 1, H, W]`` with ``(H, W) == image_size``."""
    if x.ndim != 4 or x.shape[1] != 1 or tuple(x.shape[-2:]) != tuple(image_size):
        raise ValueError(
            f"{where}: expected slices of shape [B, 1, {image_size[0]}, {image_size[1]}], got {list(x.shape)}"
        )


def _norm(kind: str, channels: int) -> nn.Module:
    if kind == "batch":
        return nn.BatchNorm2d(channels)
    if kind == "none":
        return nn.Identity()
    raise ValueError(f"norm must be 'batch' or 'none', got {kind!r}")


class ConvEncoder(nn.Module):
    """Strided-convolution encoder with a dense head: ``x [B, C_in, H, W] -> [B, out_dim]``.

    ``features(x)`` returns the flattened last feature map ``[B, C_last · H/2^n · W/2^n]`` (the critic
    features of f-AnoGAN's izif loss). ``norm="none"`` gives the batch-norm-free critic WGAN-GP requires.
    """

    def __init__(self, image_size: tuple[int, int], channels: Sequence[int], out_dim: int, in_channels: int = 1,
                 kernel_size: int = 5, norm: str = "batch") -> None:
        super().__init__()
        if kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be odd, got {kernel_size}")
        h, w = as_image_size(image_size, len(channels), "ConvEncoder")
        layers: list[nn.Module] = []
        prev = in_channels
        for c in channels:
            layers += [nn.Conv2d(prev, c, kernel_size, stride=2, padding=kernel_size // 2),
                       _norm(norm, c), nn.LeakyReLU(0.2)]
            prev = c
        self.convs = nn.Sequential(*layers)
        self.feature_dim = prev * (h >> len(channels)) * (w >> len(channels))
        self.head = nn.Linear(self.feature_dim, out_dim)

    def features(self, x: Tensor) -> Tensor:
        return self.convs(x).flatten(1)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))


class ConvDecoder(nn.Module):
    """Mirror of :class:`ConvEncoder`: ``z [B, in_dim] -> [B, 1, H, W]`` (``output="sigmoid"`` bounds it)."""

    def __init__(self, image_size: tuple[int, int], channels: Sequence[int], in_dim: int, kernel_size: int = 5,
                 norm: str = "batch", output: str = "linear") -> None:
        super().__init__()
        if output not in ("linear", "sigmoid"):
            raise ValueError(f"output must be 'linear' or 'sigmoid', got {output!r}")
        h, w = as_image_size(image_size, len(channels), "ConvDecoder")
        n = len(channels)
        self.start_shape = (channels[-1], h >> n, w >> n)
        self.head = nn.Linear(in_dim, math.prod(self.start_shape))
        outs = list(reversed(channels))[1:] + [channels[0]]
        layers: list[nn.Module] = []
        prev = channels[-1]
        for c in outs:  # each transposed conv doubles the side exactly: 2(s-1) - (k-1) + k + 1 = 2s
            layers += [nn.ConvTranspose2d(prev, c, kernel_size, stride=2, padding=kernel_size // 2,
                                          output_padding=1), _norm(norm, c), nn.LeakyReLU(0.2)]
            prev = c
        layers.append(nn.Conv2d(prev, 1, 1))
        if output == "sigmoid":
            layers.append(nn.Sigmoid())
        self.deconvs = nn.Sequential(*layers)

    def forward(self, z: Tensor) -> Tensor:
        return self.deconvs(self.head(z).view(z.shape[0], *self.start_shape))


class ReconstructionModel(UADModel):
    """Common base of the trained baselines: optional per-model learning rate, input checks, clipped ``x̂``."""

    def __init__(self, image_size: Sequence[int], lr: float | None = None, **hparams: Any) -> None:
        super().__init__(image_size=tuple(int(s) for s in image_size), lr=lr, **hparams)
        if lr is not None and not lr > 0:
            raise ValueError(f"{type(self).__name__}: lr must be positive or None, got {lr!r}")
        self.image_size = tuple(int(s) for s in image_size)
        self.lr = lr

    def configure_optimizers(self, lr: float) -> list[torch.optim.Optimizer]:
        """Adam with this model's ``lr`` when set, else the training stage's ``lr``."""
        return [torch.optim.Adam(self.parameters(), lr=self.lr if self.lr is not None else lr)]

    def forward(self, x: Tensor) -> Tensor:
        """Raw (unclipped) reconstruction used by the loss; subclasses implement it."""
        raise NotImplementedError

    @torch.no_grad()
    def reconstruct(self, x: Tensor, mask: Tensor | None = None, **kwargs: Any) -> Tensor:
        """``x̂ = clip(model(x), 0, 1)`` for ``x: [B, 1, H, W]``; ``mask`` is not used by the network."""
        check_slices(x, self.image_size, f"{self.name}.reconstruct")
        return self(x).clamp(0.0, 1.0)


class AE(ReconstructionModel):
    """Dense-bottleneck AE (Baur et al. 2021): ``x̂ = Dec(Enc(x))``, trained with an ℓ1 (or ℓ2) loss."""

    name = "ae"

    def __init__(self, image_size: Sequence[int], channels: Sequence[int] = (32, 64, 128, 128),
                 latent_dim: int = 512, loss: str = "l1", lr: float | None = None) -> None:
        if loss not in LOSSES:
            raise ValueError(f"ae: loss must be one of {LOSSES}, got {loss!r}")
        super().__init__(image_size, lr=lr, channels=tuple(channels), latent_dim=latent_dim, loss=loss)
        self.loss_kind = loss
        self.encoder = ConvEncoder(self.image_size, channels, latent_dim)
        self.decoder = ConvDecoder(self.image_size, channels, latent_dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.decoder(self.encoder(x))

    def loss(self, batch: dict[str, Tensor]) -> Tensor:
        x = batch["image"]
        check_slices(x, self.image_size, "ae.loss")
        return reconstruction_error(self(x), x, self.loss_kind)


def build_ae(image_size: Sequence[int], channels: Sequence[int] = (32, 64, 128, 128), latent_dim: int = 512,
             loss: str = "l1", lr: float | None = None) -> AE:
    """Dense AE of Baur et al. (2021); see the module docstring for every choice."""
    return AE(image_size, channels=channels, latent_dim=latent_dim, loss=loss, lr=lr)
