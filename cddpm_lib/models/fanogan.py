"""f-AnoGAN baseline: WGAN-GP generator/critic, then an encoder trained with the izif loss.

Source: Schlegl, Seeböck, Waldstein, Langs, Schmidt-Erfurth (2019), *f-AnoGAN: Fast unsupervised anomaly
detection with generative adversarial networks*, Med. Image Anal. 54:30–44; the GAN is a WGAN-GP (Gulrajani et
al. 2017). The cDDPM paper (Behrendt et al. 2023, §4.4) sets latent size 128 and learning rate 1e-4.

One training run covers both phases of the method, switched by the global step:

1. ``step < gan_steps`` — GAN phase. Each :meth:`training_step` makes ``n_critic`` critic updates (fresh ``z``,
   same real batch) and one generator update (Gulrajani et al., Alg. 1):
   ``L_D = D(G(z)) − D(x) + λ (‖∇D(x̃)‖₂ − 1)²``, ``L_G = −D(G(z))``, ``x̃`` on random lines between real and fake.
2. ``step ≥ gan_steps`` — encoder phase. ``G`` (eval mode) and ``D`` are frozen; the encoder ``E`` minimises the
   izif loss (Schlegl et al. §2.2.3)  ``L_izif = mean (x − G(E(x)))² + κ · mean (f(x) − f(G(E(x))))²``,
   with ``f`` the critic's last convolutional feature map.

At test, ``x̂ = G(E(x))`` and the anomaly map is ``|x − x̂|`` (base class), as in the cDDPM paper's residuals.

Checkpoint selection (``best.pt``): :meth:`validation_loss` is ``+inf`` during the GAN phase (no usable
encoder yet, so no checkpoint of that phase can be the best) and the izif loss on the validation slices in the
encoder phase, where ``G`` and ``D`` are fixed and the scores are comparable. The phase is stored in the
buffer ``steps_done`` (part of the state dict, so a resumed run knows it). GAN-phase progress is visible in
the logged ``wasserstein`` estimate ``D(x) − D(G(z))``.

Choices where the sources are silent (builder arguments): DCGAN-style networks from
:mod:`cddpm_lib.models.ae` with widths ``(64, 128, 256, 256)`` (critic without normalisation, as WGAN-GP
requires; generator and encoder with batch norm; generator output sigmoid, so images stay in ``[0, 1]``);
prior ``z ~ U(−1, 1)^128`` and a tanh encoder output covering it; ``λ = 10``, ``n_critic = 5``,
Adam β = (0, 0.9) for ``G`` and ``D`` (Gulrajani et al.), default Adam β for ``E``; ``κ = 1``;
``gan_steps = 12000`` — two thirds of the kit's default 17,900 training steps; it must stay below the run's
``max_steps``, else no ``best.pt`` is ever selected. ``lr = 1e-4`` (paper) is used for all three networks
whatever the training stage's rate, unless ``lr=None``.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .ae import ConvDecoder, ConvEncoder, ReconstructionModel, check_slices


@contextmanager
def frozen(*modules: nn.Module, eval_mode: bool = False) -> Iterator[None]:
    """Disable gradients of ``modules`` (and optionally switch them to eval mode) inside the block."""
    states = [(m, m.training, [p.requires_grad for p in m.parameters()]) for m in modules]
    for m in modules:
        m.requires_grad_(False)
        if eval_mode:
            m.eval()
    try:
        yield
    finally:
        for m, training, flags in states:
            m.train(training)
            for p, flag in zip(m.parameters(), flags):
                p.requires_grad_(flag)


def gradient_penalty(critic: nn.Module, real: Tensor, fake: Tensor) -> Tensor:
    """WGAN-GP penalty ``mean (‖∇_x̃ D(x̃)‖₂ − 1)²`` at ``x̃ = α x + (1 − α) x_fake``, ``α ~ U(0, 1)`` per sample."""
    alpha = torch.rand(real.shape[0], 1, 1, 1, device=real.device, dtype=real.dtype)
    mixed = (alpha * real + (1 - alpha) * fake).requires_grad_(True)
    (grad,) = torch.autograd.grad(critic(mixed).sum(), mixed, create_graph=True)
    return (grad.flatten(1).norm(dim=1) - 1).pow(2).mean()


class FAnoGAN(ReconstructionModel):
    """Generator ``G: z -> x``, critic ``D: x -> R``, encoder ``E: x -> z`` (Schlegl et al. 2019)."""

    name = "fanogan"

    def __init__(self, image_size: Sequence[int], channels: Sequence[int] = (64, 128, 256, 256),
                 latent_dim: int = 128, gan_steps: int = 12000, n_critic: int = 5, gp_weight: float = 10.0,
                 kappa: float = 1.0, lr: float | None = 1e-4) -> None:
        if gan_steps < 0 or n_critic < 1:
            raise ValueError(f"fanogan: need gan_steps >= 0 and n_critic >= 1, got {gan_steps}, {n_critic}")
        super().__init__(image_size, lr=lr, channels=tuple(channels), latent_dim=latent_dim, gan_steps=gan_steps,
                         n_critic=n_critic, gp_weight=gp_weight, kappa=kappa)
        self.latent_dim, self.gan_steps, self.n_critic = latent_dim, gan_steps, n_critic
        self.gp_weight, self.kappa = gp_weight, kappa
        self.generator = ConvDecoder(self.image_size, channels, latent_dim, output="sigmoid")
        self.critic = ConvEncoder(self.image_size, channels, 1, norm="none")
        self.encoder = ConvEncoder(self.image_size, channels, latent_dim)
        self.register_buffer("steps_done", torch.zeros((), dtype=torch.long))

    # --- the three networks ---------------------------------------------------------------------------
    def sample_latents(self, n: int) -> Tensor:
        """Prior ``z ~ U(−1, 1)^latent_dim``: ``[n, latent_dim]``."""
        return torch.rand(n, self.latent_dim, device=self.steps_done.device) * 2 - 1

    def encode(self, x: Tensor) -> Tensor:
        """``E(x) = tanh(·) ∈ (−1, 1)^latent_dim``."""
        return torch.tanh(self.encoder(x))

    def forward(self, x: Tensor) -> Tensor:
        """``G(E(x))``: ``[B, 1, H, W] -> [B, 1, H, W]`` in ``[0, 1]``."""
        return self.generator(self.encode(x))

    @property
    def in_encoder_phase(self) -> bool:
        return int(self.steps_done) > self.gan_steps

    # --- losses ---------------------------------------------------------------------------------------
    def izif_terms(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Image residual ``mean (x − G(E(x)))²`` and critic-feature residual ``mean (f(x) − f(G(E(x))))²``."""
        x_rec = self(x)
        return F.mse_loss(x_rec, x), F.mse_loss(self.critic.features(x_rec), self.critic.features(x))

    def loss(self, batch: dict[str, Tensor]) -> Tensor:
        """izif loss of the encoder phase (Schlegl et al. §2.2.3)."""
        x = batch["image"]
        check_slices(x, self.image_size, "fanogan.loss")
        image_term, feature_term = self.izif_terms(x)
        return image_term + self.kappa * feature_term

    def configure_optimizers(self, lr: float) -> list[torch.optim.Optimizer]:
        """``[opt_G, opt_D, opt_E]``; WGAN-GP's Adam β = (0, 0.9) for G and D."""
        lr = self.lr if self.lr is not None else lr
        return [torch.optim.Adam(self.generator.parameters(), lr=lr, betas=(0.0, 0.9)),
                torch.optim.Adam(self.critic.parameters(), lr=lr, betas=(0.0, 0.9)),
                torch.optim.Adam(self.encoder.parameters(), lr=lr)]

    @staticmethod
    def _update(opt: torch.optim.Optimizer, loss: Tensor, params, grad_clip: float | None) -> None:
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if grad_clip:
            torch.nn.utils.clip_grad_norm_(params, grad_clip)
        opt.step()

    def gan_step(self, x: Tensor, opt_g, opt_d, grad_clip: float | None) -> dict[str, float]:
        """``n_critic`` critic updates then one generator update (WGAN-GP, Gulrajani et al. Alg. 1)."""
        for _ in range(self.n_critic):
            with torch.no_grad():
                fake = self.generator(self.sample_latents(x.shape[0]))
            wasserstein = self.critic(x).mean() - self.critic(fake).mean()
            gp = gradient_penalty(self.critic, x, fake)
            self._update(opt_d, -wasserstein + self.gp_weight * gp, self.critic.parameters(), grad_clip)
        with frozen(self.critic):
            g_loss = -self.critic(self.generator(self.sample_latents(x.shape[0]))).mean()
            self._update(opt_g, g_loss, self.generator.parameters(), grad_clip)
        d_loss = -wasserstein + self.gp_weight * gp
        return {"loss": float(d_loss.detach()), "wasserstein": float(wasserstein.detach()),
                "gradient_penalty": float(gp.detach()), "generator": float(g_loss.detach())}

    def encoder_step(self, x: Tensor, opt_e, grad_clip: float | None) -> dict[str, float]:
        """One izif update of ``E`` with ``G`` (eval mode) and ``D`` frozen."""
        with frozen(self.generator, self.critic, eval_mode=True):
            image_term, feature_term = self.izif_terms(x)
            loss = image_term + self.kappa * feature_term
            self._update(opt_e, loss, self.encoder.parameters(), grad_clip)
        return {"loss": float(loss.detach()), "izif_image": float(image_term.detach()),
                "izif_feature": float(feature_term.detach())}

    def training_step(self, batch: dict[str, Tensor], optimizers: Sequence[torch.optim.Optimizer], step: int,
                      grad_clip: float | None = None) -> dict[str, float]:
        """GAN phase for ``step < gan_steps``, encoder phase after; logs ``phase`` (0 = GAN, 1 = encoder)."""
        if len(optimizers) != 3:
            raise ValueError(f"fanogan.training_step: expected [opt_G, opt_D, opt_E], got {len(optimizers)} optimisers")
        x = batch["image"]
        check_slices(x, self.image_size, "fanogan.training_step")
        opt_g, opt_d, opt_e = optimizers
        if step < self.gan_steps:
            logs = {"phase": 0.0, **self.gan_step(x, opt_g, opt_d, grad_clip)}
        else:
            logs = {"phase": 1.0, **self.encoder_step(x, opt_e, grad_clip)}
        self.steps_done.fill_(step + 1)
        return logs

    @torch.no_grad()
    def validation_loss(self, batch: dict[str, Tensor]) -> float:
        """``+inf`` in the GAN phase, the izif loss in the encoder phase (module docstring)."""
        if not self.in_encoder_phase:
            return float("inf")
        return float(self.loss(batch))


def build_fanogan(image_size: Sequence[int], channels: Sequence[int] = (64, 128, 256, 256), latent_dim: int = 128,
                  gan_steps: int = 12000, n_critic: int = 5, gp_weight: float = 10.0, kappa: float = 1.0,
                  lr: float | None = 1e-4) -> FAnoGAN:
    """f-AnoGAN of Schlegl et al. (2019), latent 128, lr 1e-4 (cDDPM paper §4.4); module docstring for choices."""
    return FAnoGAN(image_size, channels=channels, latent_dim=latent_dim, gan_steps=gan_steps, n_critic=n_critic,
                   gp_weight=gp_weight, kappa=kappa, lr=lr)
