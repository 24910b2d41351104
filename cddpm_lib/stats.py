"""Statistics of the tables: mean ± std over folds and permutation tests (paper §4.5.4).

Paper §4.5.4: "we utilize the MLXtend library's permutation test with 10,000 rounds of permutations and a
significance level of α = 5 %. This test computes the mean difference of the considered scores of two models for
each permutation, and the resulting p-value is computed by counting the number of times the mean differences were
equal to or greater than the sample differences, divided by the total number of permutations."

:func:`permutation_test` wraps mlxtend's ``permutation_test(x, y, func=..., method="approximate",
num_rounds=10000)`` on the per-fold scores of two models (unpaired, mlxtend's default). Which ``func`` the
authors used the paper does not say: "greater than the sample differences" reads as the one-sided
``"x_mean > y_mean"`` (model ``x``, the cDDPM, scores higher), which is the kit's default; mlxtend's own default
is the two-sided ``"x_mean != y_mean"`` (absolute differences, p about twice as large). Both are a stage
parameter (``alternative``). A star in Tables 2–3 marks a row that is significantly better than *every* baseline
(:func:`stars`).

Resolution: with ``n`` and ``m`` distinct scores an unpaired permutation test cannot give a p-value below
``1 / C(n + m, n)`` (:func:`min_p_value`): 2 folds against 2 cannot go below 1/6, 3 against 3 reaches 0.05 at
best, 5 against 5 reaches 0.004. :func:`compare_with_baselines` reports that floor beside each p-value and
:func:`stars` says whether a star was possible at all. A deterministic baseline evaluated once (Thresh: the same
value in every fold) enters with its value repeated once per fold of the target (``constant_baselines``).

Extra (not in the paper): the paired sign-flip test on per-volume scores (same test volumes, scores averaged over
folds). mlxtend's paired loop is pure Python (minutes for 1151 volumes × 10 000 rounds × many comparisons), so
:func:`paired_permutation_test` implements the same statistic and p-value vectorised in NumPy; with
``method="exact"`` it enumerates all ``2^n`` flips and equals mlxtend's exact paired result; with
``"approximate"`` it uses its own random flips (p-values agree within Monte-Carlo error).

Spread: ``std`` is NumPy's population standard deviation (``ddof = 0``) as in the authors' evaluation code; pass
``ddof=1`` for the sample standard deviation.
"""
from __future__ import annotations

import itertools
import math
from typing import Literal, Sequence

import numpy as np
import pandas as pd

#: paper §4.5.4
ROUNDS = 10_000
ALPHA = 0.05

Alternative = Literal["greater", "less", "two-sided"]
_FUNC = {"greater": "x_mean > y_mean", "less": "x_mean < y_mean", "two-sided": "x_mean != y_mean"}


def mean_std(values: Sequence[float], ddof: int = 0) -> tuple[float, float]:
    """``(mean, std)`` of the finite ``values``; NaN mean when there are none and NaN std for a single value
    (no spread is defined: the tables then print no ±, like the paper's deterministic Thresh row)."""
    v = np.asarray(values, dtype=np.float64)
    v = v[np.isfinite(v)]
    if v.size == 0:
        return float("nan"), float("nan")
    std = float(v.std(ddof=ddof)) if v.size > max(1, ddof) else float("nan")
    return float(v.mean()), std


def min_p_value(n_x: int, n_y: int, alternative: Alternative = "greater") -> float:
    """Smallest p-value an exact unpaired permutation test of ``n_x`` against ``n_y`` distinct scores can give:
    ``1 / C(n_x + n_y, n_x)`` (only the observed split is as extreme), twice that for a two-sided test of equal
    group sizes (the mirrored split is as extreme in absolute value)."""
    if n_x < 1 or n_y < 1:
        raise ValueError(f"min_p_value: needs at least one score per group, got {n_x} and {n_y}")
    splits = math.comb(n_x + n_y, n_x)
    return min(1.0, (2.0 if alternative == "two-sided" and n_x == n_y else 1.0) / splits)


def permutation_test(x: Sequence[float], y: Sequence[float], *, alternative: Alternative = "greater",
                     rounds: int = ROUNDS, method: Literal["approximate", "exact"] = "approximate",
                     paired: bool = False, seed: int | None = 0) -> float:
    """p-value of mlxtend's permutation test of ``mean(x)`` vs ``mean(y)`` (paper §4.5.4).

    ``alternative="greater"``: H1 is ``mean(x) > mean(y)`` (the paper's "equal to or greater than" count).
    """
    from mlxtend.evaluate import permutation_test as mlxtend_test

    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    if alternative not in _FUNC:
        raise ValueError(f"permutation_test: alternative must be one of {list(_FUNC)}, got {alternative!r}")
    if x.size == 0 or y.size == 0 or not (np.isfinite(x).all() and np.isfinite(y).all()):
        raise ValueError(f"permutation_test: needs non-empty finite scores, got {x.size} and {y.size} values")
    return float(mlxtend_test(x, y, func=_FUNC[alternative], method=method, num_rounds=int(rounds), seed=seed,
                              paired=paired))


def _statistic(x: np.ndarray, y: np.ndarray, alternative: str) -> np.ndarray:
    d = x.mean(-1) - y.mean(-1)
    return {"greater": d, "less": -d, "two-sided": np.abs(d)}[alternative]


def paired_permutation_test(x: Sequence[float], y: Sequence[float], *, alternative: Alternative = "greater",
                            rounds: int = ROUNDS, method: Literal["approximate", "exact"] = "approximate",
                            seed: int = 0, chunk: int = 1000) -> float:
    """Paired sign-flip permutation test, vectorised (same statistic and p-value rule as mlxtend, paired=True).

    Each round swaps ``x_i`` and ``y_i`` for a random subset of pairs; p = (#rounds with statistic ≥ observed,
    ``np.isclose`` counting as equal, + 1) / (rounds + 1). ``method="exact"`` enumerates all ``2^n`` flips
    (n ≤ 20) without the +1, like mlxtend.
    """
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    if x.shape != y.shape or x.ndim != 1 or x.size == 0:
        raise ValueError(f"paired_permutation_test: x and y must be equal-length 1D, got {x.shape}, {y.shape}")
    if not (np.isfinite(x).all() and np.isfinite(y).all()):
        raise ValueError("paired_permutation_test: scores must be finite")
    ref = _statistic(x, y, alternative)
    if method == "exact":
        if x.size > 20:
            raise ValueError(f"paired_permutation_test: exact enumeration of 2^{x.size} flips is too large")
        flips = np.array(list(itertools.product([True, False], repeat=x.size)))
        sx, sy = np.where(flips, y, x), np.where(flips, x, y)
        stat = _statistic(sx, sy, alternative)
        return float(((stat > ref) | np.isclose(stat, ref)).sum() / len(flips))
    rng = np.random.default_rng(seed)
    count, done = 0, 0
    while done < rounds:
        n = min(chunk, rounds - done)
        flips = rng.random((n, x.size)) < 0.5
        stat = _statistic(np.where(flips, y, x), np.where(flips, x, y), alternative)
        count += int(((stat > ref) | np.isclose(stat, ref)).sum())
        done += n
    return (count + 1.0) / (rounds + 1.0)


def compare_with_baselines(scores: pd.DataFrame, target: str, baselines: Sequence[str], *, label_col: str = "row",
                           value_col: str = "value", unit_col: str = "fold",
                           group_cols: Sequence[str] = ("dataset", "metric"), paired: bool = False,
                           alternative: Alternative = "greater", rounds: int = ROUNDS, alpha: float = ALPHA,
                           seed: int = 0, constant_baselines: Sequence[str] = ()) -> pd.DataFrame:
    """Tests ``target`` against each baseline per group (e.g. data set × metric); ``alternative="greater"``: H1 is
    ``target > baseline``.

    scores: long DataFrame with ``label_col`` (model row), ``unit_col`` (fold or subject), ``group_cols`` and
    ``value_col``. Unpaired (per-fold, the paper) uses mlxtend; ``paired=True`` matches units by ``unit_col``
    (per-volume extra) and uses :func:`paired_permutation_test`. A baseline without scores in a group is skipped.
    ``constant_baselines``: deterministic baselines scored once (Thresh); unpaired, their single value stands for
    every unit of the target (what scoring them in each fold would give).
    Returns ``*group_cols, target, baseline, n_target, n_baseline, p_value, min_p_value, significant``
    (``min_p_value``: the test's floor, :func:`min_p_value`; NaN for paired tests).
    """
    out = []
    for key, grp in scores.groupby(list(group_cols), sort=False):
        key = key if isinstance(key, tuple) else (key,)
        tgt = grp[grp[label_col] == target].dropna(subset=[value_col])
        if tgt.empty:
            continue
        for base in baselines:
            other = grp[grp[label_col] == base].dropna(subset=[value_col])
            if other.empty:
                continue
            if paired:
                merged = tgt.merge(other, on=unit_col, suffixes=("_x", "_y"))
                if merged.empty:
                    continue
                p = paired_permutation_test(merged[f"{value_col}_x"], merged[f"{value_col}_y"],
                                            alternative=alternative, rounds=rounds, seed=seed)
                nx = ny = len(merged)
                floor = math.nan
            else:
                y = other[value_col].to_numpy(np.float64)
                if base in constant_baselines:
                    if len(np.unique(y)) != 1:
                        raise ValueError(f"compare_with_baselines: {base!r} is declared constant but has "
                                         f"{len(np.unique(y))} different scores in group {key}")
                    y = np.repeat(y[:1], len(tgt))
                p = permutation_test(tgt[value_col], y, alternative=alternative, rounds=rounds, seed=seed)
                nx, ny = len(tgt), len(y)
                floor = min_p_value(nx, ny, alternative)
            out.append({**dict(zip(group_cols, key)), "target": target, "baseline": base, "n_target": nx,
                        "n_baseline": ny, "p_value": p, "min_p_value": floor, "significant": bool(p < alpha)})
    cols = [*group_cols, "target", "baseline", "n_target", "n_baseline", "p_value", "min_p_value", "significant"]
    return pd.DataFrame(out, columns=cols)


def stars(tests: pd.DataFrame, group_cols: Sequence[str] = ("dataset", "metric"), alpha: float = ALPHA
          ) -> pd.DataFrame:
    """Per group: ``star = True`` when the target beat every tested baseline significantly (the paper's ``*``);
    ``possible = False`` when some comparison could not reach ``alpha`` whatever the scores (too few folds,
    :func:`min_p_value`), and then no star either."""
    if tests.empty:
        return pd.DataFrame(columns=[*group_cols, "target", "star", "max_p_value", "possible"])
    t = tests.assign(_reachable=~(tests["min_p_value"] >= alpha)) if "min_p_value" in tests else \
        tests.assign(_reachable=True)
    g = t.groupby([*group_cols, "target"], sort=False)
    out = g.agg(star=("significant", "all"), max_p_value=("p_value", "max"),
                possible=("_reachable", "all")).reset_index()
    # the approximate test's Monte-Carlo p can fall just below a floor at α (3 folds against 3: 0.0495 < 0.05)
    out["star"] = out["star"] & out["possible"]
    return out
