"""DICE, AUPRC, AUROC and the best DICE agree with scikit-learn / brute force on random volumes."""
from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import average_precision_score, f1_score, roc_auc_score

from cddpm_lib import metrics


def _random(seed: int, dtype=np.float32, n: int = 6, shape=(9, 8, 5), ties: bool = True, shift: float = 0.0):
    rng = np.random.default_rng(seed)
    s = rng.random((n, *shape)).astype(dtype)
    if ties:
        s = (np.round(s * 20) / 20).astype(dtype)
    s = (s + shift).astype(dtype)
    y = rng.random((n, *shape)) < 0.1
    m = rng.random((n, *shape)) < 0.8
    return s, y, m


@pytest.mark.parametrize("dtype,shift", [(np.float32, 0.0), (np.float32, -0.4), (np.float64, 0.0)])
def test_average_precision_matches_sklearn(dtype, shift):
    s, y, _ = _random(0, dtype, shift=shift)
    ours = metrics.average_precision(s, y)
    ref = [average_precision_score(y[i].ravel(), s[i].ravel()) for i in range(len(s))]
    np.testing.assert_allclose(ours, ref, atol=1e-6)


def test_average_precision_float64_without_ties():
    s, y, _ = _random(1, np.float64, ties=False)
    s = s + 1e-13 * np.arange(s[0].size).reshape(s.shape[1:])  # values float32 cannot separate
    ref = [average_precision_score(y[i].ravel(), s[i].ravel()) for i in range(len(s))]
    np.testing.assert_allclose(metrics.average_precision(s, y), ref, atol=1e-6)


def test_auroc_matches_sklearn():
    s, y, _ = _random(2)
    ref = [roc_auc_score(y[i].ravel(), s[i].ravel()) for i in range(len(s))]
    np.testing.assert_allclose(metrics.auroc(s, y), ref, atol=1e-6)


def test_brain_region_ranks_only_masked_voxels():
    s, y, m = _random(3)
    stats = metrics.rank_stats(s, y, m, region="brain")
    for i in range(len(s)):
        assert stats.ap[i] == pytest.approx(average_precision_score(y[i][m[i]], s[i][m[i]]), abs=1e-6)
        assert stats.auroc[i] == pytest.approx(roc_auc_score(y[i][m[i]], s[i][m[i]]), abs=1e-6)


def test_best_dice_is_the_brute_force_optimum():
    s, y, _ = _random(4)
    stats = metrics.rank_stats(s, y)
    for i in range(len(s)):
        cand = np.unique(s[i])
        dices = [2 * (y[i] & (s[i] >= t)).sum() / ((s[i] >= t).sum() + y[i].sum()) for t in cand]
        assert stats.best_dice[i] == pytest.approx(max(dices), abs=1e-12)
        assert stats.best_score[i] == cand[int(np.argmax(dices))]


def test_dice_matches_f1_and_empty_is_nan():
    rng = np.random.default_rng(5)
    p, g = rng.random((4, 6, 6, 3)) < 0.3, rng.random((4, 6, 6, 3)) < 0.3
    p[3], g[3] = False, False
    d = metrics.dice(p, g)
    for i in range(3):
        assert d[i] == pytest.approx(f1_score(g[i].ravel(), p[i].ravel()), abs=1e-12)
    assert np.isnan(d[3])


def test_volume_without_lesion_gets_sklearn_ap_and_nan_auroc():
    s, y, _ = _random(6, n=2)
    y[1] = False
    stats = metrics.rank_stats(s, y)
    assert stats.ap[1] == 0.0 and np.isnan(stats.auroc[1]) and np.isnan(stats.best_dice[1])
    assert metrics.rank_stats(s, y, no_positive_ap=np.nan).ap[1] != metrics.rank_stats(s, y).ap[1]


def test_pooled_matches_sklearn_on_concatenation():
    s, y, _ = _random(7)
    assert metrics.pooled_rank_stats(s, y).ap[0] == pytest.approx(average_precision_score(y.ravel(), s.ravel()),
                                                                   abs=1e-6)


def test_chunking_does_not_change_results():
    s, y, _ = _random(8)
    a, b = metrics.rank_stats(s, y), metrics.rank_stats(s, y, chunk_voxels=1)
    np.testing.assert_array_equal(a.ap, b.ap)
    np.testing.assert_array_equal(a.auroc, b.auroc)


def test_order_key_is_monotone_and_invertible():
    x = np.array([-np.inf, -3.5, -1e-30, -0.0, 0.0, 1e-30, 2.0, np.inf], np.float32)
    k = metrics.float32_order_key(x)
    assert np.all(np.diff(k.astype(np.int64)) >= 0) and k[3] == k[4]
    np.testing.assert_array_equal(metrics.float32_from_key(k)[[0, 1, 2, 5, 6, 7]], x[[0, 1, 2, 5, 6, 7]])


def test_bad_inputs_are_rejected():
    s, y, m = _random(9, n=2)
    with pytest.raises(ValueError, match="NaN"):
        metrics.rank_stats(np.full_like(s, np.nan), y)
    with pytest.raises(ValueError, match="brain masks"):
        metrics.rank_stats(s, y, region="brain")
    with pytest.raises(ValueError, match="differ in shape"):
        metrics.rank_stats(s, y[:, :2])
    with pytest.raises(ValueError, match="batch"):
        metrics.dice(np.zeros(5, bool), np.zeros(5, bool))
