"""Post-processing steps match SciPy / scikit-image; the threshold searches find their optima."""
from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage as ndi
from skimage.measure import label, regionprops

from cddpm_lib import postprocessing as pp
from cddpm_lib.metrics import dice_at


def _vol(seed=0, shape=(14, 12, 7), zeros=0.5):
    rng = np.random.default_rng(seed)
    x = rng.random(shape).astype(np.float32)
    x[rng.random(shape) < zeros] = 0
    return x


def test_slice_erosion_equals_per_slice_scipy():
    m = np.random.default_rng(0).random((14, 12, 7)) < 0.85
    ref = np.stack([ndi.binary_erosion(m[..., z], ndi.generate_binary_structure(2, 1), iterations=3)
                    for z in range(m.shape[-1])], -1)
    np.testing.assert_array_equal(pp.erode_brain_mask(m, 3, "slice"), ref)


def test_3d_erosion_equals_scipy():
    m = np.random.default_rng(1).random((10, 10, 8)) < 0.9
    ref = ndi.binary_erosion(m, ndi.generate_binary_structure(3, 1), iterations=2)
    np.testing.assert_array_equal(pp.erode_brain_mask(m, 2, "3d"), ref)


@pytest.mark.parametrize("backend", ["numpy", "torch"])
@pytest.mark.parametrize("size,offset", [(5, 0.0), (3, -0.5)])
def test_median_filter_equals_scipy(backend, size, offset):
    x = _vol(2) + np.float32(offset)
    np.testing.assert_array_equal(pp.median_filter(x, size, backend), ndi.median_filter(x, size=size))


def test_small_components_removed_like_skimage():
    rng = np.random.default_rng(3)
    b = rng.random((16, 16, 8)) < 0.12
    ref = b.copy()
    lab = label(b, connectivity=3)
    for prop in regionprops(lab):
        if prop.area <= 7:  # the authors' rule (area instead of filled_area, see module docstring)
            ref[lab == prop.label] = False
    np.testing.assert_array_equal(pp.remove_small_components(b, min_size=8, connectivity=3), ref)


def test_spec_validates_and_ablates():
    spec = pp.PostprocessingSpec()
    assert spec.steps == ("erode", "median", "threshold", "cc")
    assert spec.without("MF").steps == ("erode", "threshold", "cc")
    assert spec.without("BE", "CC").continuous_steps == ("median",)
    with pytest.raises(ValueError, match="after 'threshold'"):
        pp.PostprocessingSpec(steps=("cc", "threshold"))
    with pytest.raises(ValueError, match="odd"):
        pp.PostprocessingSpec(median_size=4)


def test_apply_postprocessing_is_the_composition_of_steps():
    x = _vol(4, zeros=0.2)
    mask = np.random.default_rng(4).random(x.shape) < 0.95
    spec = pp.PostprocessingSpec(median_size=3, cc_min_size=3)
    cont = ndi.median_filter(x * pp.erode_brain_mask(mask, 3, "slice"), size=3)
    np.testing.assert_array_equal(pp.apply_postprocessing(x, mask, spec), cont)
    ref = pp.remove_small_components(cont > 0.4, 3, 3)
    np.testing.assert_array_equal(pp.apply_postprocessing(x, mask, spec, threshold=0.4), ref)
    np.testing.assert_array_equal(pp.binarize(cont, 0.4, spec), ref)
    other = pp.PostprocessingSpec(steps=("median", "erode", "threshold"), median_size=3)
    np.testing.assert_array_equal(pp.apply_postprocessing(x, mask, other),
                                  ndi.median_filter(x, size=3) * pp.erode_brain_mask(mask, 3, "slice"))


def _find_best_val(x, y, lo, hi, steps, step=0, best=0.0, best_t=0.0):
    """Zimmerer et al.'s recursive search, written independently of the kit for comparison."""
    if step == steps:
        return best, best_t
    if lo == hi:
        hi = 1
    q_lo, q_hi, center = lo + (hi - lo) * 0.25, lo + (hi - lo) * 0.75, lo + (hi - lo) * 0.5
    with np.errstate(invalid="ignore"):
        d_lo = 2 * np.sum((x > q_lo) & y) / (np.sum(x > q_lo) + np.sum(y))
        d_hi = 2 * np.sum((x > q_hi) & y) / (np.sum(x > q_hi) + np.sum(y))
    if d_lo >= d_hi:
        best, best_t = (d_lo, q_lo) if d_lo >= best else (best, best_t)
        return _find_best_val(x, y, lo, center, steps, step + 1, best, best_t)
    best, best_t = (d_hi, q_hi) if d_hi >= best else (best, best_t)
    return _find_best_val(x, y, center, hi, steps, step + 1, best, best_t)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_bisection_equals_the_recursive_search(seed):
    rng = np.random.default_rng(seed)
    s = (rng.random(20000) ** 2).astype(np.float32)
    y = s * rng.random(20000) > 0.25
    d, t = _find_best_val(s, y, 0.0, float(s.max()), 10)
    assert pp.bisection_threshold(s, y, steps=10) == pytest.approx((t, d))


def test_searches_find_a_perfect_separation():
    rng = np.random.default_rng(5)
    y = rng.random(5000) < 0.1
    s = np.where(y, 0.6 + 0.3 * rng.random(5000), 0.4 * rng.random(5000)).astype(np.float32)
    t_b, d_b = pp.bisection_threshold(s, y)
    t_e, d_e = pp.exact_threshold(s, y)
    assert d_b == 1.0 and d_e == 1.0
    assert s[~y].max() < t_e < s[y].min()


@pytest.mark.parametrize("seed", range(4))
def test_exact_is_optimal_and_never_worse_than_bisection(seed):
    rng = np.random.default_rng(seed)
    s = np.round(rng.random(3000) ** 3, 3).astype(np.float32)
    y = s + 0.3 * rng.random(3000) > 0.5
    t_e, d_e = pp.exact_threshold(s, y)
    brute = max(dice_at(s, y, t) for t in np.unique(np.concatenate([[-1.0], s])))
    assert d_e == pytest.approx(brute) and dice_at(s, y, t_e) == pytest.approx(d_e)
    assert d_e >= pp.bisection_threshold(s, y)[1] - 1e-12
    assert pp.search_threshold(s, y, "exact") == (t_e, d_e)
