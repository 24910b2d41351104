"""Diffusion math of paper §3.1: schedules, q_sample, L_rec, one-step and ensemble reconstruction, sampling."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from cddpm_lib.diffusion import GaussianDiffusion, cosine_betas, l1_loss, linear_betas, make_betas
from cddpm_lib.noise import GaussianNoise, SimplexNoise


def _cosine_alpha_bar_numpy(t, T=1000, s=0.008):
    f = lambda u: math.cos((u / T + s) / (1 + s) * math.pi / 2) ** 2  # noqa: E731
    return f(t) / f(0)


def _denoiser(x_t, t, cond=None):
    """A fixed nonlinear stand-in for the network that depends on x_t, t and cond."""
    out = torch.tanh(x_t) * (1 + t.float()[:, None, None, None] / 1000)
    if cond is not None:
        out = out + cond.reshape(-1, 1, 1, 1)
    return out


def test_cosine_schedule_matches_nichol_dhariwal_formula():
    d = GaussianDiffusion(cosine_betas(1000))
    for t in (1, 250, 500, 750, 990):
        assert float(d.alphas_cumprod[t]) == pytest.approx(_cosine_alpha_bar_numpy(t), rel=1e-9)
    assert float(d.alphas_cumprod[0]) == 1.0
    assert float(d.alphas_cumprod[1000]) < 1e-6     # t = T: pure noise
    assert float(cosine_betas(1000).max()) == pytest.approx(0.999)


def test_linear_schedule_endpoints_and_rescaling():
    b = linear_betas(1000)
    assert float(b[0]) == pytest.approx(1e-4) and float(b[-1]) == pytest.approx(0.02)
    assert float(linear_betas(500)[-1]) == pytest.approx(0.04)
    with pytest.raises(ValueError, match="unknown noise schedule"):
        make_betas("sigmoid", 10)


def test_q_sample_pinned_for_a_seed():
    d = GaussianDiffusion.from_schedule("cosine", 1000)
    torch.manual_seed(0)
    x0 = torch.linspace(0, 1, 4).reshape(1, 1, 2, 2).repeat(2, 1, 1, 1)
    eps = torch.randn(2, 1, 2, 2)
    got = d.q_sample(x0, torch.tensor([1, 500]), eps).flatten()
    expected = torch.tensor([0.009901332, 0.331441104, 0.652653515, 1.003631711,
                             -0.771579862, -0.760779381, 0.755453110, 1.298951149])
    assert torch.allclose(got, expected, atol=1e-6)
    # the same numbers from the formula, with ᾱ computed independently in NumPy
    abar = np.array([_cosine_alpha_bar_numpy(1), _cosine_alpha_bar_numpy(500)])[:, None, None, None]
    ref = np.sqrt(abar) * x0.numpy() + np.sqrt(1 - abar) * eps.numpy()
    assert np.allclose(got.numpy(), ref.ravel(), atol=1e-6)


def test_q_sample_at_t0_is_identity():
    d = GaussianDiffusion.from_schedule("cosine", 100)
    x0 = torch.rand(3, 1, 8, 8)
    assert torch.allclose(d.q_sample(x0, torch.zeros(3, dtype=torch.long), torch.randn_like(x0)), x0)


def test_timesteps_are_uniform_on_1_to_T():
    d = GaussianDiffusion.from_schedule("cosine", 10)
    t = d.sample_timesteps(5000, torch.Generator().manual_seed(0))
    assert int(t.min()) == 1 and int(t.max()) == 10
    counts = torch.bincount(t, minlength=11)[1:].float()
    assert float(counts.min()) > 400 and counts.sum() == 5000


def test_training_loss_is_l1_of_the_x0_prediction():
    """In the default [−1, 1] signal range the target is 2·x0 − 1; in (0, 1) it is x0 itself."""
    x0 = torch.rand(4, 1, 16, 16)
    for signal_range, target in (((-1.0, 1.0), 2 * x0 - 1), ((0.0, 1.0), x0)):
        d = GaussianDiffusion.from_schedule("cosine", 1000, SimplexNoise(), signal_range)
        assert float(d.training_loss(lambda x_t, t, c: target, x0)) == pytest.approx(0.0, abs=1e-7)
        zero = float(d.training_loss(lambda x_t, t, c: torch.zeros_like(x0), x0))
        assert zero == pytest.approx(float(target.abs().mean()), rel=1e-6)
        mask = torch.zeros_like(x0)
        mask[..., :4, :4] = 1
        zero = d.training_loss(lambda x_t, t, c: torch.zeros_like(x0), x0, mask=mask)
        assert float(zero) == pytest.approx(float(target[..., :4, :4].abs().mean()), rel=1e-6)


def test_images_are_diffused_in_minus_one_to_one_like_the_authors_code():
    """The denoiser sees x_t = √ᾱ_t (2·x0 − 1) + √(1 − ᾱ_t) ε and its prediction comes back on the [0, 1] scale."""
    d = GaussianDiffusion.from_schedule("cosine", 1000, SimplexNoise())
    x0 = torch.rand(2, 1, 16, 16)
    seen = []
    out = d.reconstruct(lambda x_t, t, c: seen.append(x_t) or torch.full_like(x_t, 1.0), x0, t_test=0)
    assert torch.allclose(seen[0], 2 * x0 - 1) and torch.allclose(out, torch.ones_like(x0))
    g = torch.Generator().manual_seed(3)
    eps = d.test_noise(x0, [500], torch.Generator().manual_seed(3))
    d.reconstruct(lambda x_t, t, c: seen.append(x_t) or x_t, x0, t_test=500, generator=g)
    abar = float(d.alphas_cumprod[500])
    assert torch.allclose(seen[1], abar ** 0.5 * (2 * x0 - 1) + (1 - abar) ** 0.5 * eps, atol=1e-6)
    # sampling clips x̂0 to the images' [0, 1] in the signal range and returns images in [0, 1]
    x = d.sample(lambda x_t, t, c: torch.full_like(x_t, 5.0), (2, 1, 8, 8), method="ddim", steps=3,
                 generator=torch.Generator().manual_seed(0))
    assert torch.allclose(x, torch.ones_like(x))
    with pytest.raises(ValueError, match="signal_range"):
        GaussianDiffusion.from_schedule("cosine", 10, signal_range=(1.0, -1.0))


def test_l1_loss_mask_broadcasts_over_channels():
    x = torch.ones(2, 3, 4, 4)
    mask = torch.zeros(2, 1, 4, 4)
    mask[0, :, 0, 0] = 1
    assert float(l1_loss(torch.zeros_like(x), x, mask)) == 1.0


def test_reconstruction_at_t0_of_a_perfect_model_is_identity():
    d = GaussianDiffusion.from_schedule("cosine", 1000, SimplexNoise())
    x0 = torch.rand(3, 1, 16, 16)
    # at t = 0 the network sees x0 itself, so the perfect denoiser is the identity
    assert torch.allclose(d.reconstruct(lambda x_t, t, c: x_t, x0, t_test=0), x0)
    assert not torch.allclose(d.reconstruct(lambda x_t, t, c: x_t, x0, t_test=500), x0)


def test_ensemble_is_the_mean_of_single_t_reconstructions():
    d = GaussianDiffusion.from_schedule("cosine", 1000, SimplexNoise())
    x0 = torch.rand(3, 1, 16, 16)
    ens = d.reconstruct(_denoiser, x0, [250, 500, 750], generator=torch.Generator().manual_seed(5))
    # each single-t run from the same generator state: the noise at t does not depend on the other t's
    singles = [d.reconstruct(_denoiser, x0, t, generator=torch.Generator().manual_seed(5)) for t in (250, 500, 750)]
    assert torch.allclose(ens, torch.stack(singles).mean(0), atol=1e-6)


def test_reduced_precision_predictions_are_averaged_in_the_inputs_precision():
    """A network under autocast answers in bfloat16; the ensemble mean and the map back to [0, 1] run in float32,
    so the ensemble is the mean of its single-t parts as in float32."""
    d = GaussianDiffusion.from_schedule("cosine", 1000, SimplexNoise())
    x0 = torch.rand(3, 1, 16, 16)

    def bf16_denoiser(x_t, t, cond):
        return _denoiser(x_t, t, cond).to(torch.bfloat16)

    ens = d.reconstruct(bf16_denoiser, x0, [250, 500, 750], generator=torch.Generator().manual_seed(5))
    singles = [d.reconstruct(bf16_denoiser, x0, t, generator=torch.Generator().manual_seed(5))
               for t in (250, 500, 750)]
    assert ens.dtype == torch.float32
    assert torch.allclose(ens, torch.stack(singles).mean(0), atol=1e-6)


def test_max_batch_does_not_change_the_reconstruction():
    d = GaussianDiffusion.from_schedule("cosine", 1000, SimplexNoise())
    x0 = torch.rand(5, 1, 16, 16)
    cond = torch.rand(5, 1)
    full = d.reconstruct(_denoiser, x0, [250, 750], cond, None, torch.Generator().manual_seed(1))
    for max_batch in (1, 3, 7):
        chunked = d.reconstruct(_denoiser, x0, [250, 750], cond, max_batch, torch.Generator().manual_seed(1))
        assert torch.allclose(full, chunked, atol=1e-6)


def test_conditioning_is_repeated_for_every_t():
    d = GaussianDiffusion.from_schedule("cosine", 1000)
    x0 = torch.zeros(2, 1, 4, 4)
    cond = torch.tensor([[10.0], [20.0]])
    seen = []
    d.reconstruct(lambda x_t, t, c: seen.append(c) or x_t, x0, [100, 200], cond, max_batch=None)
    assert torch.equal(seen[0].flatten(), torch.tensor([10.0, 20.0, 10.0, 20.0]))


def test_invalid_t_test_is_rejected():
    d = GaussianDiffusion.from_schedule("cosine", 100)
    with pytest.raises(ValueError, match="t_test"):
        d.reconstruct(_denoiser, torch.rand(1, 1, 4, 4), 101)
    with pytest.raises(ValueError, match="t_test"):
        d.reconstruct(_denoiser, torch.rand(1, 1, 4, 4), [])


def test_ddim_step_with_the_true_x0_stays_on_the_forward_trajectory():
    d = GaussianDiffusion.from_schedule("cosine", 1000)
    x0, eps = torch.rand(2, 1, 8, 8), torch.randn(2, 1, 8, 8)
    x_t = d.q_sample(x0, torch.full((2,), 700), eps)
    x_s = d.ddim_step(x_t, x0, 700, 300)
    assert torch.allclose(x_s, d.q_sample(x0, torch.full((2,), 300), eps), atol=1e-5)


def test_posterior_matches_ho_et_al_equation_7():
    d = GaussianDiffusion.from_schedule("linear", 1000)
    x0, x_t = torch.rand(1, 1, 2, 2), torch.randn(1, 1, 2, 2)
    t = 400
    b = linear_betas(1000).numpy()
    abar = np.cumprod(1 - b)
    beta, ab, ab_prev = b[t - 1], abar[t - 1], abar[t - 2]
    coef_x0, coef_xt = np.sqrt(ab_prev) * beta / (1 - ab), np.sqrt(1 - beta) * (1 - ab_prev) / (1 - ab)
    mean_ref = coef_x0 * x0.numpy() + coef_xt * x_t.numpy()
    mean, var = d.q_posterior_mean_variance(x0, x_t, torch.tensor([t]))
    assert np.allclose(mean.numpy(), mean_ref, atol=1e-6)
    assert float(var.flatten()[0]) == pytest.approx((1 - ab_prev) / (1 - ab) * beta, rel=1e-5)
    _, var1 = d.q_posterior_mean_variance(x0, x_t, torch.tensor([1]))
    assert float(var1.flatten()[0]) == 0.0


@pytest.mark.parametrize("method", ["ddpm", "ddim"])
def test_sampling_with_an_oracle_denoiser_returns_x0(method):
    d = GaussianDiffusion.from_schedule("cosine", 50, GaussianNoise())
    x0 = torch.rand(2, 1, 8, 8)
    oracle = d.to_signal(x0)  # the denoiser predicts in the signal range (2·x0 − 1)
    out = d.sample(lambda x, t, c: oracle, x0.shape, method=method, steps=10,
                   generator=torch.Generator().manual_seed(0))
    assert torch.allclose(out, x0, atol=1e-6)
    partial = d.sample(lambda x, t, c: oracle, x0.shape, x_start=x0, t_start=20, method=method, steps=5)
    assert torch.allclose(partial, x0, atol=1e-6)


def test_sampling_calls_the_denoiser_once_per_step():
    d = GaussianDiffusion.from_schedule("cosine", 100)
    steps = []

    def denoise(x, t, c):
        steps.append(int(t[0]))
        return torch.zeros_like(x)

    d.sample(denoise, (1, 1, 4, 4), method="ddim", steps=10)
    assert len(steps) == 10 and steps[0] == 100 and steps[-1] == 1
    steps.clear()
    d.sample(denoise, (1, 1, 4, 4), method="ddpm", t_start=30)
    assert steps == list(range(30, 0, -1))
