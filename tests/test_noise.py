"""Noise of the diffusion process: vectorised OpenSimplex against scalar references, statistics, determinism."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from cddpm_lib.noise import (GaussianNoise, SimplexNoise, coarse_noise, fractal_simplex, make_noise, opensimplex2d,
                             random_permutations)

S = (math.sqrt(3) - 1) / 2          # squish
K = (1 / math.sqrt(3) - 1) / 2      # stretch
GRAD = [5, 2, 2, 5, -5, 2, -2, 5, 5, -2, 2, -5, -5, -2, -2, -5]


def _contribution(perm, xsv, ysv, dx, dy):
    attn = 2 - dx * dx - dy * dy
    if attn <= 0:
        return 0.0
    index = perm[(perm[xsv & 0xFF] + ysv) & 0xFF] & 0x0E
    return attn ** 4 * (GRAD[index] * dx + GRAD[index + 1] * dy)


def reference_opensimplex2d(x: float, y: float, perm: list[int]) -> float:
    """Plain scalar 2D OpenSimplex: find the triangle, then add the vertices that can contribute, one by one."""
    xs, ys = x + (x + y) * K, y + (x + y) * K
    xsb, ysb = math.floor(xs), math.floor(ys)
    xins, yins = xs - xsb, ys - ysb
    dx0 = x - (xsb + (xsb + ysb) * S)
    dy0 = y - (ysb + (xsb + ysb) * S)

    def at(i, j):
        return _contribution(perm, xsb + i, ysb + j, dx0 - i - (i + j) * S, dy0 - j - (i + j) * S)

    value = at(1, 0) + at(0, 1)
    s = xins + yins
    if s <= 1:
        value += at(0, 0)
        if 1 - s > xins or 1 - s > yins:
            value += at(1, -1) if xins > yins else at(-1, 1)
        else:
            value += at(1, 1)
    else:
        value += at(1, 1)
        if 2 - s < xins or 2 - s < yins:
            value += at(2, 0) if xins > yins else at(0, 2)
        else:
            value += at(0, 0)
    return value / 47


def _random_points(n, seed=0, spread=300.0):
    rng = np.random.default_rng(seed)
    return rng.uniform(-spread, spread, size=(n, 2))


def test_vectorised_simplex_matches_scalar_reference():
    perm = random_permutations(1, torch.Generator().manual_seed(3))
    pts = _random_points(600)
    ref = np.array([reference_opensimplex2d(a, b, perm[0].tolist()) for a, b in pts])
    got = opensimplex2d(torch.tensor(pts[:, 0])[None], torch.tensor(pts[:, 1])[None], perm)[0].numpy()
    assert np.abs(got - ref).max() <= 1e-9  # float64; the required agreement is 1e-5
    assert ref.std() > 0.1  # the points exercise a non-trivial field


def test_vectorised_simplex_matches_opensimplex_package():
    opensimplex = pytest.importorskip("opensimplex")
    gen = opensimplex.OpenSimplex(seed=1234)
    perm = torch.from_numpy(np.array(gen._perm, dtype=np.int64))[None]
    pts = _random_points(400, seed=1)
    ref = np.array([gen.noise2(a, b) for a, b in pts])
    got = opensimplex2d(torch.tensor(pts[:, 0])[None], torch.tensor(pts[:, 1])[None], perm)[0].numpy()
    assert np.abs(got - ref).max() <= 1e-9  # float64; the required agreement is 1e-5


def test_float32_simplex_agrees_with_float64():
    perm = random_permutations(2, torch.Generator().manual_seed(0))
    off = torch.tensor([[12.3, 200.1], [0.5, 77.7]])
    a = fractal_simplex(24, 24, perm, off, dtype=torch.float64, backend="torch")
    b = fractal_simplex(24, 24, perm, off, dtype=torch.float32, backend="torch")
    assert torch.allclose(a.float(), b, atol=1e-4)


def test_compiled_kernel_matches_the_array_form():
    """The CPU kernel (numba) against the torch array form, which the scalar references above pin: same fields
    in float64 for any offsets, including negative ones and beyond the lattice period."""
    pytest.importorskip("numba")
    perm = random_permutations(3, torch.Generator().manual_seed(5))
    off = torch.tensor([[0.0, 0.0], [-37.25, 901.5], [255.9, -0.1]])
    for octaves, frequency in ((6, 1 / 64), (3, 1 / 5)):
        a = fractal_simplex(17, 23, perm, off, octaves, 0.8, frequency, torch.float64, backend="torch")
        b = fractal_simplex(17, 23, perm, off, octaves, 0.8, frequency, torch.float64, backend="numba")
        assert b.shape == (3, 17, 23) and b.dtype == torch.float64
        assert (a - b).abs().max() <= 1e-9 and a.std() > 0.05
    auto = fractal_simplex(17, 23, perm, off, 3, 0.8, 1 / 5)  # auto on a CPU: the kernel, cast to float32
    torch.testing.assert_close(auto, b.float(), rtol=0, atol=0)


def test_backend_is_checked():
    perm, off = random_permutations(1, torch.Generator().manual_seed(0)), torch.zeros(1, 2)
    with pytest.raises(ValueError, match="backend must be one of"):
        fractal_simplex(4, 4, perm, off, backend="cuda")
    with pytest.raises(ValueError, match="backend must be one of"):
        SimplexNoise(backend="numpy")
    with pytest.raises(ValueError, match=r"expected perm \[B, 256\] and offset \[B, 2\], got \(1, 256\) and \(2, 2\)"):
        fractal_simplex(4, 4, perm, torch.zeros(2, 2))


def test_without_numba_the_array_form_runs(monkeypatch):
    from cddpm_lib import noise

    perm, off = random_permutations(2, torch.Generator().manual_seed(1)), torch.tensor([[3.5, 7.0], [100.0, 1.0]])
    monkeypatch.setattr(noise, "_compiled_fractal", lambda: None)
    torch.testing.assert_close(fractal_simplex(8, 8, perm, off), fractal_simplex(8, 8, perm, off, backend="torch"),
                               rtol=0, atol=0)
    with pytest.raises(RuntimeError, match="needs numba installed"):
        fractal_simplex(8, 8, perm, off, backend="numba")


def test_normalised_fields_have_zero_mean_unit_variance():
    eps = SimplexNoise(normalize=True)((6, 1, 48, 48), generator=torch.Generator().manual_seed(0))
    assert eps.shape == (6, 1, 48, 48)
    assert torch.allclose(eps.mean(dim=(-2, -1)), torch.zeros(6, 1), atol=1e-5)
    assert torch.allclose(eps.std(dim=(-2, -1)), torch.ones(6, 1), atol=1e-4)


def test_unnormalised_fields_are_centred_and_bounded():
    eps = SimplexNoise(frequency=1 / 8)((32, 1, 32, 32), generator=torch.Generator().manual_seed(1))
    amplitude = sum(0.8 ** k for k in range(6))
    assert eps.abs().max() < amplitude
    assert abs(float(eps.mean())) < 0.05
    assert 0.1 < float(eps.std()) < 1.0


def _correlation_length(eps: torch.Tensor) -> int:
    """First horizontal lag at which the mean autocorrelation of the fields drops below 0.5."""
    z = (eps - eps.mean(dim=(-2, -1), keepdim=True)) / eps.std(dim=(-2, -1), keepdim=True)
    for lag in range(1, z.shape[-1]):
        if float((z[..., :-lag] * z[..., lag:]).mean()) < 0.5:
            return lag
    return z.shape[-1]


def test_correlation_length_grows_as_frequency_drops():
    g = torch.Generator().manual_seed(2)
    lengths = [_correlation_length(SimplexNoise(octaves=1, frequency=f)((16, 1, 64, 64), generator=g))
               for f in (1 / 4, 1 / 8, 1 / 16)]
    assert lengths[0] < lengths[1] < lengths[2]


def test_fields_are_independent_per_sample_unless_shared():
    g = torch.Generator().manual_seed(4)
    eps = SimplexNoise(frequency=1 / 8)((16, 1, 48, 48), generator=g).flatten(1)
    corr = torch.corrcoef(eps)
    off_diag = corr[~torch.eye(16, dtype=torch.bool)]
    assert float(off_diag.abs().mean()) < 0.15
    shared = SimplexNoise(shared_across_batch=True)((4, 1, 32, 32), generator=g)
    assert torch.equal(shared[0], shared[3])


def test_same_generator_seed_gives_same_noise():
    f = SimplexNoise()
    a = f((3, 1, 32, 32), generator=torch.Generator().manual_seed(7))
    b = f((3, 1, 32, 32), generator=torch.Generator().manual_seed(7))
    c = f((3, 1, 32, 32), generator=torch.Generator().manual_seed(8))
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)


def test_gaussian_noise_is_standard_normal_and_deterministic():
    a = GaussianNoise()((64, 1, 32, 32), generator=torch.Generator().manual_seed(0))
    b = GaussianNoise()((64, 1, 32, 32), generator=torch.Generator().manual_seed(0))
    assert torch.equal(a, b)
    assert abs(float(a.mean())) < 0.01 and abs(float(a.std()) - 1) < 0.01


def test_coarse_noise_is_smooth_masked_and_has_the_given_std():
    mask = torch.zeros(64, 1, 64, 64)
    mask[..., 8:56, 8:56] = 1
    eps = coarse_noise((64, 1, 64, 64), mask=mask, std=0.2, generator=torch.Generator().manual_seed(0))
    assert torch.all(eps[mask == 0] == 0)
    inside = eps[..., 8:56, 8:56]
    assert 0.1 < float(inside.std()) < 0.25          # bilinear upsampling smooths N(0, 0.2²) a little
    assert _correlation_length(inside) >= 3          # drawn on an 8×8 grid at 64 px


def test_make_noise_scales_the_base_frequency_with_the_image_size():
    assert make_noise("simplex", (96, 96)).frequency == pytest.approx(1 / 64)
    assert make_noise("simplex", (48, 48)).frequency == pytest.approx(1 / 32)
    assert make_noise("simplex", (64, 64), frequency=0.1).frequency == 0.1
    assert isinstance(make_noise("gaussian"), GaussianNoise)
    with pytest.raises(ValueError, match="unknown noise"):
        make_noise("pink")
