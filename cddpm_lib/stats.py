"""Statistics of the tables: mean ± std over folds and permutation tests (paper §4.5.4).

Paper §4.5.4: "we utilize the MLXtend library's permutation test with 10,000 rounds of permutations and a
significance level of α = 5 %. This test computes the mean difference of the considered scores of two models for
each permutation, and the resulting p-value is computed by counting the number of times the mean differences were
equal to or greater than the sample differences, divided by the total number of permutations."

That is mlxtend's ``permutation_test(x, y, func="x_mean > y_mean", method="approximate", num_rounds=10000)``:
a one-sided test that model ``x`` (cDDPM) scores higher than ``y`` (a baseline), on the per-fold scores of the two
models (unpaired, mlxtend's default). :func:`permutation_test` wraps exactly that call. A star in Tables 2–3 marks
a row that is significantly better than *every* baseline (:func:`stars`).

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
                           seed: int = 0) -> pd.DataFrame:
    """One-sided tests ``target > baseline`` per group (e.g. data set × metric).

    scores: long DataFrame with ``label_col`` (model row), ``unit_col`` (fold or subject), ``group_cols`` and
    ``value_col``. Unpaired (per-fold, the paper) uses mlxtend; ``paired=True`` matches units by ``unit_col``
    (per-volume extra) and uses :func:`paired_permutation_test`. A baseline without scores in a group is skipped.
    Returns ``*group_cols, target, baseline, n_target, n_baseline, p_value, significant``.
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
            else:
                p = permutation_test(tgt[value_col], other[value_col], alternative=alternative, rounds=rounds,
                                     seed=seed)
                nx, ny = len(tgt), len(other)
            out.append({**dict(zip(group_cols, key)), "target": target, "baseline": base, "n_target": nx,
                        "n_baseline": ny, "p_value": p, "significant": bool(p < alpha)})
    cols = [*group_cols, "target", "baseline", "n_target", "n_baseline", "p_value", "significant"]
    return pd.DataFrame(out, columns=cols)


def stars(tests: pd.DataFrame, group_cols: Sequence[str] = ("dataset", "metric")) -> pd.DataFrame:
    """Per group: ``star = True`` when the target beat every tested baseline significantly (the paper's ``*``)."""
    if tests.empty:
        return pd.DataFrame(columns=[*group_cols, "target", "star", "max_p_value"])
    g = tests.groupby([*group_cols, "target"], sort=False)
    return g.agg(star=("significant", "all"), max_p_value=("p_value", "max")).reset_index()
