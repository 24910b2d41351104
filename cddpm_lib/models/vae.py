"""Dense-bottleneck variational autoencoder (VAE) baseline.

Source: Baur et al. (2021), *Autoencoders for unsupervised anomaly segmentation in brain MR images: a
comparative study* (the dense VAE), with the cDDPM paper's setting β = 0.001 (Behrendt et al. 2023, §4.4).
Encoder and decoder are the AE's (:mod:`cddpm_lib.models.ae`); the encoder's dense head outputs
``(μ, log σ²)`` of a diagonal Gaussian posterior ``q(z | x)`` over ``z ∈ R^latent_dim``.

Loss (Kingma & Welling 2014, weighted as in a β-VAE):

    L = mean_pixels |x − Dec(z)|  +  β · mean_batch KL(q(z | x) ‖ N(0, I)),   z = μ + σ · ε

Choices where the sources are silent (builder arguments):

- the reconstruction term is the per-pixel mean ℓ1 (as the AE), the KL term is summed over the latent
  dimensions, so β = 0.001 weighs a 512-d KL against a per-pixel error;
- ``z`` is sampled only in training mode; in eval mode (validation loss, reconstruction) ``z = μ``, so the
  validation score and the reconstructions are deterministic;
- ``log σ²`` is clipped to ``[-30, 20]`` for numerical safety.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from .ae import LOSSES, ConvDecoder, ConvEncoder, ReconstructionModel, check_slices, reconstruction_error

LOGVAR_RANGE = (-30.0, 20.0)


def reparameterize(mu: Tensor, logvar: Tensor) -> Tensor:
    """``z = μ + exp(½ log σ²) · ε``, ``ε ~ N(0, I)``; ``mu, logvar: [B, d]``."""
    return mu + torch.exp(0.5 * logvar) * torch.randn_like(mu)


def kl_divergence(mu: Tensor, logvar: Tensor) -> Tensor:
    """``KL(N(μ, σ²) ‖ N(0, I))`` summed over the latent dimensions: ``[B, d] -> [B]``."""
    return -0.5 * (1.0 + logvar - mu.pow(2) - logvar.exp()).sum(dim=1)


class VAE(ReconstructionModel):
    """Dense VAE; :meth:`transform_latents` is the hook SVAE uses to mix the codes of neighbouring slices."""

    name = "vae"

    def __init__(self, image_size: Sequence[int], channels: Sequence[int] = (32, 64, 128, 128),
                 latent_dim: int = 512, beta: float = 0.001, loss: str = "l1", lr: float | None = None,
                 **extra_hparams) -> None:
        if loss not in LOSSES:
            raise ValueError(f"{self.name}: loss must be one of {LOSSES}, got {loss!r}")
        if beta < 0:
            raise ValueError(f"{self.name}: beta must be >= 0, got {beta}")
        super().__init__(image_size, lr=lr, channels=tuple(channels), latent_dim=latent_dim, beta=beta,
                         loss=loss, **extra_hparams)
        self.latent_dim = latent_dim
        self.beta = beta
        self.loss_kind = loss
        self.encoder = ConvEncoder(self.image_size, channels, 2 * latent_dim)
        self.decoder = ConvDecoder(self.image_size, channels, latent_dim)

    def encode(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """``x [B, 1, H, W] -> (μ, log σ²)``, each ``[B, latent_dim]``."""
        mu, logvar = self.encoder(x).chunk(2, dim=1)
        return mu, logvar.clamp(*LOGVAR_RANGE)

    def transform_latents(self, z: Tensor) -> Tensor:
        """Identity for the slice-wise VAE; ``z: [B, d] -> [B, d]``."""
        return z

    def forward_with_posterior(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``x -> (x̂, μ, log σ²)``; samples ``z`` in training mode, ``z = μ`` in eval mode."""
        mu, logvar = self.encode(x)
        z = reparameterize(mu, logvar) if self.training else mu
        return self.decoder(self.transform_latents(z)), mu, logvar

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_with_posterior(x)[0]

    def loss(self, batch: dict[str, Tensor]) -> Tensor:
        """ELBO-type loss ``rec + β · KL`` of a batch of slices (module docstring)."""
        x = batch["image"]
        check_slices(x, self.image_size, f"{self.name}.loss")
        x_hat, mu, logvar = self.forward_with_posterior(x)
        return reconstruction_error(x_hat, x, self.loss_kind) + self.beta * kl_divergence(mu, logvar).mean()


def build_vae(image_size: Sequence[int], channels: Sequence[int] = (32, 64, 128, 128), latent_dim: int = 512,
              beta: float = 0.001, loss: str = "l1", lr: float | None = None) -> VAE:
    """Dense VAE of Baur et al. (2021) with β = 0.001 (cDDPM paper §4.4)."""
    return VAE(image_size, channels=channels, latent_dim=latent_dim, beta=beta, loss=loss, lr=lr)
