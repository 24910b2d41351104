"""quality: SSIM, PSNR, l1-error, l1-ratio against independent formulas (paper §4.5.1, Table 2)."""
from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.ndimage import gaussian_filter

from cddpm_lib import quality as Q


def _ssim_map_reference(x: np.ndarray, y: np.ndarray, data_range: float = 1.0) -> np.ndarray:
    """Wang et al. (2004) Eq. 13 with an 11-tap Gaussian window (σ = 1.5), written out with scipy."""
    f = lambda a: gaussian_filter(a, sigma=1.5, truncate=3.5, mode="reflect")  # noqa: E731
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    mx, my = f(x), f(y)
    vx, vy, cxy = f(x * x) - mx**2, f(y * y) - my**2, f(x * y) - mx * my
    return ((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx**2 + my**2 + c1) * (vx + vy + c2))


def _pair(seed=0, shape=(16, 16, 12)):
    rng = np.random.default_rng(seed)
    x = rng.random(shape)
    y = np.clip(x + 0.1 * rng.standard_normal(shape), 0, 1)
    mask = np.zeros(shape, dtype=np.uint8)
    mask[3:13, 2:14, 1:11] = 1
    return x, y, mask


def test_ssim_one_for_identical_volumes():
    x, _, mask = _pair()
    assert Q.ssim(x, x.copy(), mask) == pytest.approx(1.0)
    assert Q.ssim(x, x.copy(), mask, dims="2d") == pytest.approx(1.0)


@pytest.mark.parametrize("dims", ["3d", "2d"])
def test_ssim_map_matches_wang_formula_on_random_images(dims):
    x, y, _ = _pair()
    if dims == "3d":
        ref = _ssim_map_reference(x, y)
    else:
        ref = np.stack([_ssim_map_reference(x[..., z], y[..., z]) for z in range(x.shape[-1])], -1)
    np.testing.assert_allclose(Q.ssim_map(x, y, dims=dims), ref, atol=1e-10)


def test_ssim_masked_mean_uses_brain_voxels_only():
    x, y, mask = _pair()
    ref = _ssim_map_reference(x, y)[mask > 0].mean()
    assert Q.ssim(x, y, mask) == pytest.approx(ref, abs=1e-10)
    y2 = y.copy()
    y2[mask == 0] = 0.0  # changing the background does not move the brain mean much
    assert Q.ssim(x, y2, mask) != pytest.approx(Q.ssim(x, y2, np.ones_like(mask)))


def test_ssim_constant_images():
    a = np.full((12, 12, 12), 0.4)
    assert Q.ssim(a, a.copy()) == pytest.approx(1.0)
    b = np.full((12, 12, 12), 0.6)
    c1 = 0.01**2
    assert Q.ssim(a, b) == pytest.approx((2 * 0.4 * 0.6 + c1) / (0.4**2 + 0.6**2 + c1))


def test_psnr_matches_formula_inside_mask():
    x, y, mask = _pair()
    m = mask > 0
    mse = np.mean((x[m] - y[m]) ** 2)
    assert Q.psnr(x, y, mask) == pytest.approx(10 * math.log10(1.0 / mse))


def test_psnr_identical_is_infinite_or_capped():
    x, _, mask = _pair()
    assert Q.psnr(x, x.copy(), mask) == math.inf
    assert Q.psnr(x, x.copy(), mask, cap_db=60.0) == 60.0
    assert Q.psnr(x, x + 1e-9, mask, cap_db=60.0) == 60.0


def test_psnr_constant_images():
    a, b = np.full((4, 4, 4), 0.2), np.full((4, 4, 4), 0.3)
    assert Q.psnr(a, b) == pytest.approx(20.0)  # mse = 0.01


def test_l1_error_and_split():
    x = np.zeros((4, 4, 4))
    y = np.zeros_like(x)
    brain = np.zeros_like(x, dtype=np.uint8)
    brain[1:3, 1:3, :] = 1
    seg = np.zeros_like(brain)
    seg[1, 1, :] = 1
    y[1, 1, :] = 0.8  # anomaly poorly reconstructed
    y[2, 2, :] = 0.2  # one healthy brain voxel per slice wrong
    y[0, 0, :] = 0.5  # background error: outside the brain
    unhealthy, healthy = Q.l1_split(x, y, brain, seg)
    assert unhealthy == pytest.approx(0.8)
    assert healthy == pytest.approx(0.2 / 3)
    u_vol, h_vol = Q.l1_split(x, y, brain, seg, region="volume")
    assert u_vol == pytest.approx(0.8) and h_vol == pytest.approx((0.2 + 0.5) / 15)
    assert Q.l1_error(x, y, brain) == pytest.approx((0.8 + 0.2) / 4)


def test_l1_ratio_is_ratio_of_means_ignoring_empty():
    assert Q.l1_ratio([0.4, math.nan, 0.2], [0.1, 0.1, 0.1]) == pytest.approx(3.0)
    assert math.isnan(Q.l1_ratio([math.nan], [0.1]))


def test_errors_name_the_problem():
    x, y, mask = _pair()
    with pytest.raises(ValueError, match="differ in shape"):
        Q.ssim(x, y[:-1], None)
    with pytest.raises(ValueError, match="mask is empty"):
        Q.psnr(x, y, np.zeros_like(mask))
    with pytest.raises(ValueError, match="'2d' or '3d'"):
        Q.ssim_map(x, y, dims="4d")
