"""Permutation tests: the wrapper is mlxtend; the vectorised paired test follows mlxtend's rule."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from mlxtend.evaluate import permutation_test as mlxtend_test

from cddpm_lib import stats

X = np.array([53.1, 52.0, 55.2, 51.9, 54.6])
Y = np.array([49.0, 50.3, 48.7, 50.9, 49.5])


def test_wrapper_matches_mlxtend_approximate():
    ours = stats.permutation_test(X, Y, rounds=2000, seed=3)
    assert ours == mlxtend_test(X, Y, func="x_mean > y_mean", method="approximate", num_rounds=2000, seed=3)


@pytest.mark.parametrize("alternative,func", [("two-sided", "x_mean != y_mean"), ("less", "x_mean < y_mean")])
def test_wrapper_matches_mlxtend_exact(alternative, func):
    assert stats.permutation_test(X, Y, alternative=alternative, method="exact") == \
        mlxtend_test(X, Y, func=func, method="exact")


def test_paired_exact_equals_mlxtend():
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=9), rng.normal(size=9) - 0.3
    assert stats.paired_permutation_test(x, y, method="exact") == pytest.approx(
        mlxtend_test(x, y, func="x_mean > y_mean", method="exact", paired=True))


def test_paired_approximate_close_to_mlxtend():
    rng = np.random.default_rng(1)
    x, y = rng.normal(size=30), rng.normal(size=30) - 0.2
    ours = stats.paired_permutation_test(x, y, rounds=4000, seed=0)
    ref = mlxtend_test(x, y, func="x_mean > y_mean", method="approximate", num_rounds=4000, seed=0, paired=True)
    assert abs(ours - ref) < 0.03


def test_mean_std_population_default():
    assert stats.mean_std([1.0, 3.0, np.nan]) == (2.0, 1.0)
    assert stats.mean_std([1.0, 3.0], ddof=1)[1] == pytest.approx(np.sqrt(2))
    assert stats.mean_std([5.0])[0] == 5.0 and np.isnan(stats.mean_std([5.0])[1])  # one fold: no spread
    assert np.isnan(stats.mean_std([])[0])


def test_stars_only_when_all_baselines_beaten():
    rows = []
    for fold in range(5):
        rows += [{"row": "best", "fold": fold, "dataset": "D", "metric": "DICE", "value": 60 + fold * 0.1},
                 {"row": "weak", "fold": fold, "dataset": "D", "metric": "DICE", "value": 40 + fold * 0.1},
                 {"row": "tie", "fold": fold, "dataset": "D", "metric": "DICE", "value": 60 + fold * 0.1}]
    tests = stats.compare_with_baselines(pd.DataFrame(rows), "best", ["weak", "tie"], rounds=2000)
    assert tests.set_index("baseline")["significant"].to_dict() == {"weak": True, "tie": False}
    assert not stats.stars(tests)["star"].iloc[0]
    only_weak = stats.stars(tests[tests["baseline"] == "weak"])
    assert only_weak["star"].iloc[0]


@pytest.mark.parametrize("n,m", [(2, 2), (3, 3), (5, 5), (5, 1), (2, 1)])
@pytest.mark.parametrize("alternative", ["greater", "two-sided"])
def test_min_p_value_is_the_exact_tests_floor(n, m, alternative):
    # the most extreme possible data: every target score above every baseline score
    x, y = np.arange(n) + 100.0, np.arange(m) * 1.0
    func = {"greater": "x_mean > y_mean", "two-sided": "x_mean != y_mean"}[alternative]
    exact = mlxtend_test(x, y, func=func, method="exact")
    assert stats.min_p_value(n, m, alternative) == pytest.approx(exact)


def test_constant_baseline_counts_once_per_target_fold():
    rows = [{"row": "best", "fold": f, "dataset": "D", "metric": "DICE", "value": 60 + f * 0.1} for f in range(5)]
    rows += [{"row": "Thresh", "fold": 0, "dataset": "D", "metric": "DICE", "value": 20.0}]
    df = pd.DataFrame(rows)
    once = stats.compare_with_baselines(df, "best", ["Thresh"], rounds=2000).iloc[0]
    assert once["n_baseline"] == 1 and not once["significant"]  # 5 values against 1 cannot reach 0.05
    assert once["min_p_value"] == pytest.approx(1 / 6)
    assert not stats.stars(pd.DataFrame([once]))["possible"].iloc[0]
    const = stats.compare_with_baselines(df, "best", ["Thresh"], rounds=2000, constant_baselines=["Thresh"]).iloc[0]
    assert const["n_baseline"] == 5 and const["significant"] and const["min_p_value"] == pytest.approx(1 / 252)
    star = stats.stars(pd.DataFrame([const]))
    assert star["star"].iloc[0] and star["possible"].iloc[0]
    varied = pd.concat([df, pd.DataFrame([{**rows[-1], "fold": 1, "value": 21.0}])])
    with pytest.raises(ValueError, match="declared constant"):
        stats.compare_with_baselines(varied, "best", ["Thresh"], constant_baselines=["Thresh"])


def test_no_star_below_the_floor_even_when_the_monte_carlo_p_dips_under_alpha():
    rows = [{"row": r, "fold": f, "dataset": "D", "metric": "DICE", "value": v + f}
            for f in range(3) for r, v in (("best", 60.0), ("weak", 10.0))]
    tests = stats.compare_with_baselines(pd.DataFrame(rows), "best", ["weak"], rounds=10_000)
    assert tests["min_p_value"].iloc[0] == pytest.approx(0.05)  # 3 against 3: 1/20, exactly α
    star = stats.stars(tests)
    assert not star["possible"].iloc[0] and not star["star"].iloc[0]


def test_bad_input_is_rejected():
    with pytest.raises(ValueError, match="alternative"):
        stats.permutation_test(X, Y, alternative="bigger")
    with pytest.raises(ValueError, match="equal-length"):
        stats.paired_permutation_test(X, Y[:3])
