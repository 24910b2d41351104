"""Gaussian diffusion with an ``x0``-predicting network (paper §3.1), for DDPM, pDDPM and cDDPM.

``GaussianDiffusion(schedule, noise_fn)`` holds the forward process; the network is injected at call time as a
*denoiser* ``denoise(x_t, t, cond) -> x̂0`` (``x_t: [N, C, H, W]``, ``t: [N]`` int64, ``cond: [N, ...] | None``),
so one process serves the plain and the conditioned U-Net.

Math (paper §3.1; Ho et al. 2020):

- schedule ``β_1..β_T``, ``α_t = 1 − β_t``, ``ᾱ_t = Π_{s≤t} α_s``, ``ᾱ_0 = 1`` (t = 0: no noise);
- forward process ``q(x_t | x0) = N(√ᾱ_t x0, (1 − ᾱ_t) I)``, i.e. :meth:`GaussianDiffusion.q_sample`
  ``x_t = √ᾱ_t x0 + √(1 − ᾱ_t) ε`` with ε the structured simplex noise of §4.4 (or Gaussian);
- training: ``t ~ U{1, …, T}`` per sample, the network predicts ``x0`` directly, ``L_rec = |x0 − x̂0|``;
- test (§3.1): one forward pass from ``x_{t_test}``; a sequence of ``t_test`` is the ensemble of Graham et al.:
  the mean of the reconstructions at each ``t_test`` (paper: [250, 500, 750]).
- optional iterative sampling on the same schedule with the x0-parameterisation: DDPM ancestral steps from the
  posterior ``q(x_{t−1} | x_t, x̂0)`` (Ho et al. eq. 6–7) or deterministic DDIM steps (Song et al. 2021, eq. 12,
  η = 0); used to generate from pure noise (``t = T``) in the conditioning experiment (Fig. 2).

Schedules: ``cosine`` (Nichol & Dhariwal 2021, eq. 17, s = 0.008, β clipped at 0.999; the authors' code) and
``linear`` (Ho et al.: β from 1e-4 to 0.02, rescaled by 1000 / T).

Signal range. Images come in [0, 1]; the process runs on them mapped linearly to ``signal_range`` (default
[−1, 1], as the authors' code, which calls ``normalize_to_neg_one_to_one`` before noising and maps the prediction
back): the denoiser sees ``x_t`` and predicts ``x̂0`` in that range, ``L_rec`` is taken there (so it is twice the
[0, 1] value), and :meth:`~GaussianDiffusion.reconstruct` and :meth:`~GaussianDiffusion.sample` return images in
[0, 1]. The range sets how strongly a given ``t`` drowns the image: with the unnormalised simplex noise (std ≈ 0.6)
``t_test = 500`` keeps the signal-to-noise ratio of the authors' runs only in [−1, 1]; in [0, 1] (``signal_range =
(0, 1)``) the same ratio is reached at ``t = 292`` (and [126, 292, 558] for the ensemble).
"""
from __future__ import annotations

import math
from typing import Callable, Sequence

import torch
from torch import Tensor, nn

from .noise import GaussianNoise, NoiseFn

Denoiser = Callable[[Tensor, Tensor, "Tensor | None"], Tensor]


def linear_betas(T: int, beta_start: float = 1e-4, beta_end: float = 0.02) -> Tensor:
    """Linear β schedule of Ho et al. (2020) rescaled to ``T`` steps, β ≤ 0.999 (very short chains) -> ``[T]``."""
    scale = 1000 / T
    return torch.linspace(scale * beta_start, scale * beta_end, T, dtype=torch.float64).clamp(max=0.999)


def cosine_betas(T: int, s: float = 0.008, max_beta: float = 0.999) -> Tensor:
    """Cosine schedule (Nichol & Dhariwal 2021, eq. 17): ``ᾱ(t) = cos²((t/T + s)/(1 + s) · π/2)`` -> β ``[T]``."""
    steps = torch.arange(T + 1, dtype=torch.float64)
    f = torch.cos((steps / T + s) / (1 + s) * math.pi / 2) ** 2
    return (1 - f[1:] / f[:-1]).clamp(max=max_beta)


def make_betas(schedule: str, T: int) -> Tensor:
    """β_1..β_T of the named schedule (``cosine`` or ``linear``)."""
    if T < 1:
        raise ValueError(f"diffusion: T must be >= 1, got {T}")
    if schedule == "cosine":
        return cosine_betas(T)
    if schedule == "linear":
        return linear_betas(T)
    raise ValueError(f"unknown noise schedule {schedule!r}; use 'cosine' or 'linear'")


def as_timesteps(t_test: int | Sequence[int], T: int) -> list[int]:
    """``t_test`` (an int or a sequence = ensemble) as a list of time steps in ``[0, T]``; clear error otherwise."""
    ts = [int(t_test)] if isinstance(t_test, (int, float)) else [int(t) for t in t_test]
    if not ts or any(not 0 <= t <= T for t in ts):
        raise ValueError(f"t_test must be one or more integers in [0, {T}], got {t_test!r}")
    return ts


def _extract(values: Tensor, t: Tensor, like: Tensor) -> Tensor:
    """``values[t]`` shaped ``[N, 1, 1, 1]`` to broadcast against ``like`` ([N, C, H, W])."""
    return values.to(like.device)[t].to(like.dtype).reshape(-1, *([1] * (like.ndim - 1)))


class GaussianDiffusion(nn.Module):
    """Forward process, training loss and reconstruction of paper §3.1 for an injected ``x0``-denoiser."""

    def __init__(self, betas: Tensor, noise_fn: NoiseFn | None = None,
                 signal_range: Sequence[float] = (-1.0, 1.0)) -> None:
        super().__init__()
        betas = torch.as_tensor(betas, dtype=torch.float64)
        if betas.ndim != 1 or (betas <= 0).any() or (betas >= 1).any():
            raise ValueError("GaussianDiffusion: betas must be a 1D tensor with values in (0, 1)")
        lo, hi = check_signal_range(signal_range)
        #: images in [0, 1] are diffused as ``lo + (hi − lo) · x`` (module docstring)
        self.signal_range = (lo, hi)
        self.T = int(betas.numel())
        self.noise_fn: NoiseFn = noise_fn if noise_fn is not None else GaussianNoise()
        alphas_cumprod = torch.cat([torch.ones(1, dtype=torch.float64), torch.cumprod(1 - betas, 0)])
        # index t = 0..T; betas padded with β_0 = 0 so that index t is step t
        self.register_buffer("betas", torch.cat([torch.zeros(1, dtype=torch.float64), betas]), persistent=False)
        self.register_buffer("alphas_cumprod", alphas_cumprod, persistent=False)
        # square roots in float64 before casting: 1 − ᾱ_t is tiny at small t
        self.register_buffer("sqrt_alphas_cumprod", alphas_cumprod.sqrt(), persistent=False)
        self.register_buffer("sqrt_one_minus_alphas_cumprod", (1 - alphas_cumprod).sqrt(), persistent=False)

    @classmethod
    def from_schedule(cls, schedule: str = "cosine", T: int = 1000, noise_fn: NoiseFn | None = None,
                      signal_range: Sequence[float] = (-1.0, 1.0)) -> "GaussianDiffusion":
        return cls(make_betas(schedule, T), noise_fn, signal_range)

    # --- signal range ---------------------------------------------------------------------------------
    def to_signal(self, x: Tensor) -> Tensor:
        """Image in [0, 1] -> the range the process runs in (``signal_range``)."""
        lo, hi = self.signal_range
        return x if (lo, hi) == (0.0, 1.0) else lo + (hi - lo) * x

    def from_signal(self, y: Tensor) -> Tensor:
        """Inverse of :meth:`to_signal`: a prediction in ``signal_range`` -> the image's [0, 1] scale."""
        lo, hi = self.signal_range
        return y if (lo, hi) == (0.0, 1.0) else (y - lo) / (hi - lo)

    # --- forward process ------------------------------------------------------------------------------
    def sample_timesteps(self, n: int, generator: torch.Generator | None = None,
                         device: torch.device | str | None = None) -> Tensor:
        """``t ~ U{1, …, T}`` (paper §3.1), ``[n]`` int64."""
        src = generator.device if generator is not None else device
        return torch.randint(1, self.T + 1, (n,), generator=generator, device=src).to(device)

    def q_sample(self, x0: Tensor, t: Tensor, noise: Tensor) -> Tensor:
        """``x_t = √ᾱ_t x0 + √(1 − ᾱ_t) ε`` (paper §3.1); ``x0, noise: [N, C, H, W]``, ``t: [N]``, 0 ≤ t ≤ T."""
        return (_extract(self.sqrt_alphas_cumprod, t, x0) * x0
                + _extract(self.sqrt_one_minus_alphas_cumprod, t, x0) * noise)

    def noise_like(self, x: Tensor, generator: torch.Generator | None = None) -> Tensor:
        return self.noise_fn(x.shape, generator=generator, device=x.device).to(x.dtype)

    def test_noise(self, x: Tensor, ts: Sequence[int], generator: torch.Generator | None = None) -> Tensor:
        """Noise fields of one-step reconstructions of ``x: [B, ...]`` at each of ``ts`` -> ``[len(ts) · B, ...]``
        (t-major).

        With a ``generator``, one number is drawn from it and the fields of each ``t`` come from a generator seeded
        with (that number, ``t``): the noise at ``t`` does not depend on the other time steps reconstructed with
        it, so an ensemble equals the mean of single-``t`` reconstructions made from the same generator state,
        and saved single-``t`` reconstructions can be averaged into the ensemble (``reconstruct.ensemble_from_parts``).
        """
        if generator is None:
            return torch.cat([self.noise_like(x) for _ in ts])
        base = int(torch.randint(0, 2**40, (1,), generator=generator, device=generator.device))
        per_t = [torch.Generator(device=generator.device).manual_seed(base * (self.T + 1) + int(t)) for t in ts]
        return torch.cat([self.noise_like(x, g) for g in per_t])

    # --- training -------------------------------------------------------------------------------------
    def training_loss(self, denoise: Denoiser, x0: Tensor, cond: Tensor | None = None, mask: Tensor | None = None,
                      generator: torch.Generator | None = None) -> Tensor:
        """``L_rec = |x0 − x̂0(x_t, t)|`` with ``t ~ U{1..T}`` per sample (paper §3.1), in the signal range.

        ``x0``: images in [0, 1]; ``mask`` ([N, 1|C, H, W]): mean over the mask's pixels only (``None``: over all
        pixels).
        """
        t = self.sample_timesteps(x0.shape[0], generator, x0.device)
        x0 = self.to_signal(x0)
        x_t = self.q_sample(x0, t, self.noise_like(x0, generator))
        return l1_loss(denoise(x_t, t, cond), x0, mask)

    # --- one-step reconstruction (paper §3.1) ---------------------------------------------------------
    def predict_x0(self, denoise: Denoiser, x_t: Tensor, t: Tensor, cond: Tensor | None = None,
                   max_batch: int | None = None) -> Tensor:
        """``x̂0 = denoise(x_t, t, cond)`` in chunks of at most ``max_batch`` samples (same result as one pass), in
        ``x_t``'s dtype (a network run under autocast answers in reduced precision; the result is cast back)."""
        n = x_t.shape[0]
        step = n if not max_batch else int(max_batch)
        if step < 1:
            raise ValueError(f"max_batch must be a positive integer or None, got {max_batch!r}")
        # Cast back to the input's dtype: under autocast the network answers in bfloat16/float16, and the
        # ensemble mean and the map out of the signal range should run in the input's precision.
        outs = [denoise(x_t[i:i + step], t[i:i + step], None if cond is None else cond[i:i + step]).to(x_t.dtype)
                for i in range(0, n, step)]
        return torch.cat(outs) if outs else x_t.clone()

    def reconstruct(self, denoise: Denoiser, x0: Tensor, t_test: int | Sequence[int] = 500,
                    cond: Tensor | None = None, max_batch: int | None = None,
                    generator: torch.Generator | None = None) -> Tensor:
        """Pseudo-healthy reconstruction (paper §3.1): noise ``x0`` to each ``t_test``, predict ``x̂0`` in one pass,
        average over the ``t_test`` (ensemble). ``x0: [B, C, H, W]`` in [0, 1], ``cond: [B, ...]`` ->
        ``[B, C, H, W]`` on the same scale (the prediction mapped back from the signal range, not clipped).

        All slices × time steps go through the network in batches of at most ``max_batch``; the noise of every
        (t, slice) pair is drawn before batching, so ``max_batch`` does not change the result.
        """
        ts = as_timesteps(t_test, self.T)
        b = x0.shape[0]
        t = torch.tensor(ts, device=x0.device).repeat_interleave(b)          # [len(ts) · B], t-major
        x0_rep = self.to_signal(x0).repeat(len(ts), *([1] * (x0.ndim - 1)))
        noise = self.test_noise(x0, ts, generator)
        cond_rep = None if cond is None else cond.repeat(len(ts), *([1] * (cond.ndim - 1)))
        x_hat = self.predict_x0(denoise, self.q_sample(x0_rep, t, noise), t, cond_rep, max_batch)
        return self.from_signal(x_hat.reshape(len(ts), *x0.shape).mean(0))

    # --- iterative sampling ---------------------------------------------------------------------------
    def q_posterior_mean_variance(self, x0: Tensor, x_t: Tensor, t: Tensor) -> tuple[Tensor, Tensor]:
        """Mean and variance of ``q(x_{t−1} | x_t, x0)`` (Ho et al. 2020, eq. 6–7), ``t ≥ 1``."""
        beta, abar, abar_prev = self.betas[t], self.alphas_cumprod[t], self.alphas_cumprod[t - 1]   # float64
        coef_x0 = beta * abar_prev.sqrt() / (1 - abar)
        coef_xt = (1 - abar_prev) * (1 - beta).sqrt() / (1 - abar)
        var = beta * (1 - abar_prev) / (1 - abar)
        shape = (-1, *([1] * (x_t.ndim - 1)))
        mean = (coef_x0.to(x_t.dtype).reshape(shape) * x0 + coef_xt.to(x_t.dtype).reshape(shape) * x_t)
        return mean, var.to(x_t.dtype).reshape(shape)

    @torch.no_grad()
    def sample(self, denoise: Denoiser, shape: Sequence[int], cond: Tensor | None = None,
               x_start: Tensor | None = None, t_start: int | None = None, method: str = "ddim",
               steps: int | None = 50, clip: tuple[float, float] | None = (0.0, 1.0),
               generator: torch.Generator | None = None, device: torch.device | str | None = None) -> Tensor:
        """Iterative generation from ``x_{t_start}`` down to ``x0`` (``[B, C, H, W]``).

        ``x_start=None``: start from pure noise (``t_start = T``); else ``x_{t_start} = q_sample(x_start, t_start)``.
        ``method="ddpm"``: ancestral sampling over every step; ``"ddim"``: deterministic DDIM (η = 0) over
        ``steps`` evenly spaced steps. ``clip`` clamps ``x̂0`` at each step, on the images' [0, 1] scale. ``x_start``
        and the result are images in [0, 1].
        """
        t_start = self.T if t_start is None else int(t_start)
        as_timesteps(t_start, self.T)
        if clip is not None:
            clip = tuple(float(c) for c in self.to_signal(torch.tensor(clip, dtype=torch.float64)))
        if x_start is not None:
            device = x_start.device
            x = self.q_sample(self.to_signal(x_start), torch.full((x_start.shape[0],), t_start, device=device),
                              self.noise_like(x_start, generator))
        else:
            x = self.noise_fn(shape, generator=generator, device=device)
            x = x * self.sqrt_one_minus_alphas_cumprod[t_start].to(x.dtype)
        if method == "ddpm":
            schedule = list(range(t_start, 0, -1))
        elif method == "ddim":
            n = min(steps or t_start, t_start)
            schedule = sorted({int(round(v)) for v in torch.linspace(t_start, 1, max(n, 1)).tolist()}, reverse=True)
        else:
            raise ValueError(f"sample: method must be 'ddpm' or 'ddim', got {method!r}")
        schedule = schedule + [0]
        for t_now, t_next in zip(schedule[:-1], schedule[1:]):
            t = torch.full((x.shape[0],), t_now, device=x.device, dtype=torch.long)
            x0_hat = denoise(x, t, cond)
            if clip is not None:
                x0_hat = x0_hat.clamp(*clip)
            if t_next == 0:
                x = x0_hat
            elif method == "ddpm":
                mean, var = self.q_posterior_mean_variance(x0_hat, x, t)
                x = mean + var.sqrt() * self.noise_like(x, generator)
            else:
                x = self.ddim_step(x, x0_hat, t_now, t_next)
        return self.from_signal(x)

    def ddim_step(self, x_t: Tensor, x0_hat: Tensor, t: int, s: int) -> Tensor:
        """DDIM step ``t -> s`` (η = 0, Song et al. 2021 eq. 12): ``x_s = √ᾱ_s x̂0 + √(1 − ᾱ_s) ε̂`` with
        ``ε̂ = (x_t − √ᾱ_t x̂0) / √(1 − ᾱ_t)``."""
        a_t, s_t = self.sqrt_alphas_cumprod[t].to(x_t.dtype), self.sqrt_one_minus_alphas_cumprod[t].to(x_t.dtype)
        a_s, s_s = self.sqrt_alphas_cumprod[s].to(x_t.dtype), self.sqrt_one_minus_alphas_cumprod[s].to(x_t.dtype)
        return a_s * x0_hat + s_s * (x_t - a_t * x0_hat) / s_t


def check_signal_range(signal_range: Sequence[float]) -> tuple[float, float]:
    """``(lo, hi)`` with ``lo < hi`` as floats, or a clear error naming ``signal_range``."""
    try:
        lo, hi = (float(v) for v in signal_range)
    except (TypeError, ValueError):
        raise ValueError(f"signal_range must be two numbers (lo, hi), got {signal_range!r}") from None
    if not (math.isfinite(lo) and math.isfinite(hi) and lo < hi):
        raise ValueError(f"signal_range must be finite with lo < hi, got {signal_range!r}")
    return lo, hi


def l1_loss(x_hat: Tensor, x0: Tensor, mask: Tensor | None = None) -> Tensor:
    """``mean |x0 − x̂0|``, over the pixels where ``mask`` is 1 when a mask is given (paper §3.1, ``L_rec``)."""
    err = (x_hat - x0).abs()
    if mask is None:
        return err.mean()
    mask = mask.to(err.dtype).expand_as(err)
    return (err * mask).sum() / mask.sum().clamp_min(1.0)


__all__ = ["GaussianDiffusion", "as_timesteps", "check_signal_range", "linear_betas", "cosine_betas", "make_betas",
           "l1_loss"]
