"""DDPM and cDDPM for unsupervised anomaly detection (paper §3.1, §3.2, §4.4).

- **DDPM** (Wyatt et al. 2022 as adapted in the paper): the ADM U-Net predicts ``x0`` from ``x_t`` noised with
  structured simplex noise; ``L_rec = |x0 − x̂0|`` with ``t ~ U{1..T}``; at test time one forward pass from
  ``x_{t_test}`` (``t_test = 500``) or the ensemble mean over ``t_test = [250, 500, 750]``.
- **cDDPM** (§3.2): the same U-Net conditioned on ``c = F_enc(x0)`` (ResNet + FC, ``d = cond_dim``) by FiLM in
  every residual block; encoder and U-Net trained end to end. ``model.encoder`` is the
  :class:`~cddpm_lib.encoder.ResNetEncoder`, ready for ``encoder.load_encoder_weights(model.encoder, path)``
  (SparK pre-training, §3.3).

Defaults are the paper's / the authors' settings: widths 128·(1, 2, 2), 3 residual blocks per level, attention
in the middle block only, T = 1000, cosine schedule, simplex noise (6 octaves, persistence 0.8, base frequency
1/64 at 96 px — scaled with the image size, :func:`cddpm_lib.noise.make_noise`), ``d = 128`` (paper; the
authors' code: 512) and a ResNet-50 encoder (authors' code; the paper only says "ResNet"). Documented choices:

- Simplex noise: an independent field per slice (``noise_shared=True`` repeats one field over the batch as the
  authors' code does); fields are not normalised, as in the authors' code (std ≈ 0.6); ``noise_normalize=True``
  standardises each field.
- ``signal_range=(-1, 1)``: the [0, 1] slices are diffused mapped to [−1, 1], as in the authors' code; with their
  noise this is what makes a given ``t_test`` remove as much of the image as there (``(0, 1)`` diffuses the
  slices as they are, a much stronger corruption at the same ``t``; :mod:`cddpm_lib.diffusion`). ``L_rec`` is
  taken in that range; reconstructions come back in [0, 1].
- ``mask_loss=False``: ``L_rec`` over the whole slice as in the authors' code; ``True`` restricts it to the brain.
- ``reconstruct`` returns the raw ``x̂0`` (no clipping, no masking); post-processing masks residuals later.
"""
from __future__ import annotations

from typing import Any, ClassVar, Sequence

import torch
from torch import Tensor

from ..diffusion import GaussianDiffusion, check_signal_range, make_betas
from ..encoder import ResNetEncoder
from ..noise import make_noise
from ..unet import UNet
from .base import UADModel

#: paper §4.4: ensemble of test-time noise levels
ENSEMBLE_T_TEST: tuple[int, ...] = (250, 500, 750)


def check_image_size(image_size: Sequence[int], levels: int, where: str) -> tuple[int, int]:
    """``image_size`` as ``(H, W)``, each divisible by ``2^(levels − 1)`` (the U-Net's down-sampling)."""
    size = tuple(int(s) for s in image_size)
    factor = 2 ** (levels - 1)
    if len(size) != 2 or min(size) < 1 or any(s % factor for s in size):
        raise ValueError(f"{where}: image_size must be two positive ints divisible by {factor} "
                         f"(2^(len(channel_mult) − 1)), got {tuple(image_size)!r}")
    return size  # type: ignore[return-value]


class DiffusionAD(UADModel):
    """DDPM for UAD (paper §3.1): ``GaussianDiffusion`` around an ``x0``-predicting :class:`UNet`.

    Extra keyword hyper-parameters of subclasses (``cond_dim``, encoder and patch settings) are stored in
    ``hparams`` with the rest, so ``models.build_model(name, **hparams)`` rebuilds any of them.
    """

    name = "ddpm"
    #: keyword hyper-parameters a subclass adds (anything else is an error)
    extra_hparams: ClassVar[tuple[str, ...]] = ()
    #: True when the U-Net takes the encoder's context vector c (cDDPM)
    conditioned: ClassVar[bool] = False

    def __init__(self, image_size: Sequence[int], model_channels: int = 128, channel_mult: Sequence[int] = (1, 2, 2),
                 num_res_blocks: int = 3, attention_levels: Sequence[int] = (), mid_attention: bool = True,
                 num_heads: int = 4, dropout: float = 0.0, T: int = 1000, schedule: str = "cosine",
                 noise: str = "simplex", noise_octaves: int = 6, noise_persistence: float = 0.8,
                 noise_frequency: float | None = None, noise_normalize: bool = False, noise_shared: bool = False,
                 signal_range: Sequence[float] = (-1.0, 1.0), mask_loss: bool = False, lr: float | None = None,
                 **extra: Any) -> None:
        unknown = sorted(set(extra) - set(self.extra_hparams))
        if unknown:
            raise TypeError(f"{self.name}: unknown hyper-parameter(s) {unknown}")
        size = check_image_size(image_size, len(channel_mult), self.name)
        super().__init__(image_size=size, model_channels=model_channels, channel_mult=tuple(channel_mult),
                         num_res_blocks=num_res_blocks, attention_levels=tuple(attention_levels),
                         mid_attention=mid_attention, num_heads=num_heads, dropout=dropout, T=T, schedule=schedule,
                         noise=noise, noise_octaves=noise_octaves, noise_persistence=noise_persistence,
                         noise_frequency=noise_frequency, noise_normalize=noise_normalize, noise_shared=noise_shared,
                         signal_range=check_signal_range(signal_range), mask_loss=mask_loss, lr=lr, **extra)
        if lr is not None and not lr > 0:
            raise ValueError(f"{self.name}: lr must be positive or None, got {lr!r}")
        self.image_size, self.mask_loss, self.lr = size, mask_loss, lr
        noise_fn = make_noise(noise, size, noise_octaves, noise_persistence, noise_frequency, noise_normalize,
                              noise_shared)
        self.diffusion = GaussianDiffusion(make_betas(schedule, T), noise_fn, self.hparams["signal_range"])
        self.unet = UNet(in_channels=1, out_channels=1, model_channels=model_channels,
                         channel_mult=tuple(channel_mult), num_res_blocks=num_res_blocks,
                         attention_levels=tuple(attention_levels), mid_attention=mid_attention, num_heads=num_heads,
                         dropout=dropout, use_time=True, cond_dim=extra.get("cond_dim"))

    # --- pieces -------------------------------------------------------------------------------------
    def configure_optimizers(self, lr: float) -> list[torch.optim.Optimizer]:
        """Adam (paper §4.4) with this model's ``lr`` when set, else the training stage's."""
        return [torch.optim.Adam(self.parameters(), lr=self.lr if self.lr is not None else lr)]

    def denoise(self, x_t: Tensor, t: Tensor, cond: Tensor | None = None) -> Tensor:
        """``x̂0 = UNet(x_t, t, c)``: ``x_t: [N, 1, H, W]``, ``t: [N]``, ``c: [N, d] | None`` -> ``[N, 1, H, W]``."""
        return self.unet(x_t, t, cond)

    def context(self, image: Tensor, max_batch: int | None = None) -> Tensor | None:
        """Conditioning vector ``c`` of the slices ``image`` (``None``: the plain DDPM has none)."""
        return None

    def check_slices(self, x: Tensor, where: str) -> None:
        if x.ndim != 4 or x.shape[1] != 1 or tuple(x.shape[-2:]) != self.image_size:
            raise ValueError(f"{self.name}.{where}: expected slices [B, 1, {self.image_size[0]}, "
                             f"{self.image_size[1]}], got {tuple(x.shape)}")

    # --- training -----------------------------------------------------------------------------------
    def loss(self, batch: dict[str, Tensor], generator: torch.Generator | None = None) -> Tensor:
        """``L_rec = |x0 − x̂0|`` (paper §3.1) with random ``t`` per slice; masked by the brain if ``mask_loss``."""
        x0 = batch["image"]
        self.check_slices(x0, "loss")
        mask = batch.get("mask") if self.mask_loss else None
        if self.mask_loss and mask is None:
            raise KeyError(f"{self.name}.loss: mask_loss=True needs a 'mask' entry in the batch")
        return self.diffusion.training_loss(self.denoise, x0, self.context(x0), mask, generator)

    # --- inference ----------------------------------------------------------------------------------
    @torch.no_grad()
    def reconstruct(self, x: Tensor, mask: Tensor | None = None, t_test: int | Sequence[int] = 500,
                    max_batch: int | None = 64, conditioning_image: Tensor | None = None,
                    generator: torch.Generator | None = None, **kwargs: Any) -> Tensor:
        """One-step reconstruction ``x̂0`` of ``x: [B, 1, H, W]`` from ``x_{t_test}`` (paper §3.1).

        ``t_test``: an int, or a sequence = ensemble mean (paper: [250, 500, 750]). ``max_batch`` bounds the
        slices × time steps per forward pass. ``conditioning_image`` ([B, 1, H, W], cDDPM only): the image the
        encoder sees instead of ``x`` (Fig. 2). ``mask`` is not used (kept for the common interface).
        """
        if kwargs:
            raise TypeError(f"{self.name}.reconstruct: unexpected arguments {sorted(kwargs)}")
        self.check_slices(x, "reconstruct")
        cond = self.conditioning(x, conditioning_image, max_batch)
        return self.diffusion.reconstruct(self.denoise, x, t_test, cond, max_batch, generator)

    def conditioning(self, x: Tensor, conditioning_image: Tensor | None, max_batch: int | None) -> Tensor | None:
        """``c`` from ``conditioning_image`` when given, else from the clean input ``x``."""
        if conditioning_image is not None:
            if not self.conditioned:
                raise ValueError(f"{self.name}: conditioning_image is only for the conditioned model (cddpm)")
            self.check_slices(conditioning_image, "conditioning_image")
            if conditioning_image.shape[0] != x.shape[0]:
                raise ValueError(f"{self.name}: conditioning_image has {conditioning_image.shape[0]} slices, "
                                 f"the input {x.shape[0]}")
        return self.context(x if conditioning_image is None else conditioning_image, max_batch)

    @torch.no_grad()
    def sample(self, n: int | None = None, x_start: Tensor | None = None, t_start: int | None = None,
               conditioning_image: Tensor | None = None, method: str = "ddim", steps: int | None = 50,
               generator: torch.Generator | None = None) -> Tensor:
        """Iterative generation (Fig. 2 at ``t = T``): from pure noise (``x_start=None``, ``n`` slices) or from
        ``x_start`` noised to ``t_start``; ``method`` ``ddim`` (``steps``) or ``ddpm`` (ancestral). cDDPM needs
        ``conditioning_image`` (or uses ``x_start``) -> ``[n, 1, H, W]``."""
        device = next(self.parameters()).device
        ref = x_start if x_start is not None else conditioning_image
        if n is None:
            if ref is None:
                raise ValueError(f"{self.name}.sample: give n, x_start or conditioning_image")
            n = ref.shape[0]
        cond_src = conditioning_image if conditioning_image is not None else x_start
        if self.conditioned and cond_src is None:
            raise ValueError(f"{self.name}.sample: the conditioned model needs conditioning_image or x_start")
        cond = None if cond_src is None else self.context(cond_src.to(device))
        return self.diffusion.sample(self.denoise, (n, 1, *self.image_size), cond=cond,
                                     x_start=None if x_start is None else x_start.to(device), t_start=t_start,
                                     method=method, steps=steps, generator=generator, device=device)


class ConditionedDiffusionAD(DiffusionAD):
    """cDDPM (paper §3.2): DDPM whose U-Net is FiLM-conditioned on ``c = F_enc(x0) ∈ R^d``."""

    name = "cddpm"
    extra_hparams = ("encoder_depth", "cond_dim", "encoder_width", "encoder_norm")
    conditioned = True

    def __init__(self, image_size: Sequence[int], encoder_depth: int = 50, cond_dim: int = 128,
                 encoder_width: int = 64, encoder_norm: str = "group", **kwargs: Any) -> None:
        super().__init__(image_size, encoder_depth=encoder_depth, cond_dim=cond_dim, encoder_width=encoder_width,
                         encoder_norm=encoder_norm, **kwargs)
        #: F_enc (ResNet + FC); SparK weights: ``encoder.load_encoder_weights(model.encoder, path)``
        self.encoder = ResNetEncoder(depth=encoder_depth, in_channels=1, out_dim=cond_dim, base_width=encoder_width,
                                     norm=encoder_norm)

    def context(self, image: Tensor, max_batch: int | None = None) -> Tensor:
        """``c = F_enc(image)``: ``[B, 1, H, W] -> [B, d]``, in chunks of ``max_batch``."""
        step = image.shape[0] if not max_batch else int(max_batch)
        return torch.cat([self.encoder(image[i:i + step]) for i in range(0, image.shape[0], step)])


def build_ddpm(image_size: Sequence[int], model_channels: int = 128, channel_mult: Sequence[int] = (1, 2, 2),
               num_res_blocks: int = 3, attention_levels: Sequence[int] = (), mid_attention: bool = True,
               num_heads: int = 4, dropout: float = 0.0, T: int = 1000, schedule: str = "cosine",
               noise: str = "simplex", noise_octaves: int = 6, noise_persistence: float = 0.8,
               noise_frequency: float | None = None, noise_normalize: bool = False, noise_shared: bool = False,
               signal_range: Sequence[float] = (-1.0, 1.0), mask_loss: bool = False,
               lr: float | None = None) -> DiffusionAD:
    """DDPM of paper §3.1/§4.4 (module docstring for every choice); ``image_size = (H, W)``."""
    return DiffusionAD(image_size, model_channels=model_channels, channel_mult=channel_mult,
                       num_res_blocks=num_res_blocks, attention_levels=attention_levels, mid_attention=mid_attention,
                       num_heads=num_heads, dropout=dropout, T=T, schedule=schedule, noise=noise,
                       noise_octaves=noise_octaves, noise_persistence=noise_persistence,
                       noise_frequency=noise_frequency, noise_normalize=noise_normalize, noise_shared=noise_shared,
                       signal_range=signal_range, mask_loss=mask_loss, lr=lr)


def build_cddpm(image_size: Sequence[int], encoder_depth: int = 50, cond_dim: int = 128, encoder_width: int = 64,
                encoder_norm: str = "group", **kwargs: Any) -> ConditionedDiffusionAD:
    """cDDPM of paper §3.2: :func:`build_ddpm`'s arguments plus the encoder ``F_enc`` — ResNet ``encoder_depth``
    (18/34/50; authors: 50) of base width ``encoder_width``, norm ``group``/``batch``, ``d = cond_dim``
    (paper: 128; authors' code: 512)."""
    return ConditionedDiffusionAD(image_size, encoder_depth=encoder_depth, cond_dim=cond_dim,
                                  encoder_width=encoder_width, encoder_norm=encoder_norm, **kwargs)
