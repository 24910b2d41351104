"""Segmentation metrics of paper §4.5.3 — DICE, AUPRC (average precision), AUROC — vectorised over volumes.

Scores and labels come as batches of volumes ``[N, ...]`` (e.g. ``[N, X, Y, Z]``), flattened to ``[N, V]``.
All metrics are computed **per volume** and averaged over volumes by the caller (the authors' protocol).

- ``dice(pred, target) = 2 |A ∩ B| / (|A| + |B|)``; a volume with an empty prediction and an empty annotation
  is ``nan`` (0/0) and skipped by ``nanmean`` — exactly the authors' code.
- ``average_precision`` = ``Σ_r (R(r) − R(r−1)) · P(r)`` over the distinct thresholds (paper §4.5.3; equals
  scikit-learn's ``average_precision_score``). ``region="volume"`` ranks all voxels of the volume (the authors'
  code); ``region="brain"`` only those inside a mask. A volume without positives gets ``no_positive_ap``
  (default 0.0: scikit-learn's value, which the authors' mean includes).
- ``auroc`` = the Mann–Whitney statistic ``P(s⁺ > s⁻) + ½ P(s⁺ = s⁻)`` (= scikit-learn's ``roc_auc_score``);
  ``nan`` when a volume lacks positives or negatives.

Algorithm (:func:`rank_stats`, one sort per volume for all three): every voxel becomes one integer key
``(order-preserving bits of its float32 score) · 2 + label`` and the ``[N, V]`` key matrix is sorted along
``V`` (NumPy's vectorised sort — on CPU about 10× faster than ``torch.sort``). For the tie group ``G`` of a
voxel, ``n⁺(G)`` and ``n(G)`` count the positives / all voxels scoring ``≥`` its score; then

    AP = (1/P) Σ_{positives i} n⁺(G_i) / n(G_i)          (precision at the end of each tie group, as sklearn)
    AUROC = (Σ_{positives} midrank − P(P+1)/2) / (P · N⁻)
    best DICE = max_{positives i} 2 n⁺(G_i) / (n(G_i) + P)

The last holds because an optimal predicted set is always ``{s ≥ s_i}`` for some positive ``i``; it gives the
per-volume oracle DICE and the exact pooled threshold search of :mod:`cddpm_lib.postprocessing` from the same
pass. Scores that are not exactly float32 fall back to an ``argsort`` of float64 keys (same results).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np

Region = Literal["volume", "brain"]
#: voxels per chunk of volumes sorted at once (bounds memory: ~35 BraTS-sized volumes)
CHUNK_VOXELS = 16_000_000


def _as_batch(x, dtype=None) -> np.ndarray:
    """``[N, ...]`` array (or torch tensor) -> ``[N, V]`` NumPy array."""
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    a = np.asarray(x)
    if dtype is not None:
        a = a.astype(dtype, copy=False)
    if a.ndim < 2:
        raise ValueError(f"metrics: expected a batch [N, ...] of volumes, got shape {a.shape}")
    return a.reshape(a.shape[0], -1)


# --------------------------------------------------------------------------------------------------------------
# DICE


def dice(pred, target) -> np.ndarray:
    """Per-volume DICE of binary ``pred`` and ``target`` ``[N, ...]`` -> ``[N]`` float64 (nan for 0/0)."""
    p, g = _as_batch(pred, bool), _as_batch(target, bool)
    if p.shape != g.shape:
        raise ValueError(f"dice: prediction {p.shape} and target {g.shape} differ in shape")
    inter = np.count_nonzero(p & g, axis=1).astype(np.float64)
    denom = (np.count_nonzero(p, axis=1) + np.count_nonzero(g, axis=1)).astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        return 2 * inter / denom


def dice_at(scores, labels, threshold: float) -> float:
    """DICE of ``scores > threshold`` against ``labels``, all voxels pooled (the threshold search's objective)."""
    s = np.asarray(scores).reshape(-1)
    g = np.asarray(labels).reshape(-1).astype(bool, copy=False)
    p = s > threshold
    denom = np.count_nonzero(p) + np.count_nonzero(g)
    return float("nan") if denom == 0 else 2.0 * np.count_nonzero(p & g) / denom


# --------------------------------------------------------------------------------------------------------------
# Order-preserving integer keys


def float32_order_key(x: np.ndarray) -> np.ndarray:
    """Monotone map of finite float32 to uint32 in ``[1, 2^32)``: ``a < b ⇔ key(a) < key(b)``, ``−0 ≡ +0``."""
    u = (np.asarray(x, np.float32) + np.float32(0.0)).view(np.uint32)  # + 0: -0.0 -> +0.0
    return u ^ ((u >> np.uint32(31)) * np.uint32(0x7FFFFFFF) | np.uint32(0x80000000))


def float32_from_key(key: np.ndarray) -> np.ndarray:
    """Inverse of :func:`float32_order_key`."""
    k = np.asarray(key).astype(np.uint32)
    return (k ^ (((k >> np.uint32(31)) ^ np.uint32(1)) * np.uint32(0x7FFFFFFF) | np.uint32(0x80000000))
            ).view(np.float32)


def _is_float32_exact(s: np.ndarray) -> bool:
    if s.dtype == np.float32 or (s.dtype.kind in "iub" and s.dtype.itemsize <= 2):
        return True
    return bool(np.all(s.astype(np.float32).astype(s.dtype) == s))


def _sorted_keys(s: np.ndarray, y: np.ndarray, valid: np.ndarray):
    """Per row, the ascending keys ``2 · group + label`` (group 0 = voxels outside ``valid``) and a decoder
    ``score(row, sorted index, key)`` of a voxel's score.

    Fast path (scores exactly float32): the key is computed from the float bits; non-negative scores (residuals)
    fit in uint32, others use uint64. Otherwise float64 scores are arg-sorted and the groups numbered.
    """
    if _is_float32_exact(s):
        s32 = np.asarray(s, np.float32)
        if s32.size and s32.min() >= 0:
            u = (s32 + np.float32(0.0)).view(np.uint32)               # monotone bits of non-negative floats
            key = ((u + np.uint32(1)) << np.uint32(1)) | y.view(np.uint8)
            decode = lambda r, i, k: (np.uint32(k >> 1) - np.uint32(1)).view(np.float32)  # noqa: E731
        else:
            key = (float32_order_key(s32).astype(np.uint64) << np.uint64(1)) | y.astype(np.uint64)
            decode = lambda r, i, k: float32_from_key(np.asarray(k >> np.uint64(1)))  # noqa: E731
        key[~valid] = 0
        return np.sort(key, axis=1), decode
    s64 = np.where(valid, s.astype(np.float64), -np.inf)
    order = np.argsort(s64, axis=1, kind="stable")
    ss = np.take_along_axis(s64, order, 1)
    ys = np.take_along_axis(y & valid, order, 1)
    group = np.zeros(ss.shape, np.int64)
    group[:, 1:] = np.cumsum(ss[:, 1:] != ss[:, :-1], axis=1)
    group += np.isfinite(ss[:, :1]).astype(np.int64)                  # first row entry valid -> group 1
    return 2 * group + ys, (lambda r, i, k: ss[r, i])


# --------------------------------------------------------------------------------------------------------------
# Ranking statistics: AP, AUROC, best DICE from one sort


@dataclass(frozen=True)
class RankStats:
    """Per-volume results of :func:`rank_stats`, ``[N]`` float64 each (``n_pos`` int)."""

    ap: np.ndarray
    auroc: np.ndarray
    best_dice: np.ndarray
    best_score: np.ndarray  # s_i of the best set {s ≥ s_i}: any threshold in [next lower score, s_i) attains it
    n_pos: np.ndarray


def _row_stats(keys: np.ndarray, n_valid: int, decode, r: int) -> tuple[float, float, float, float, int]:
    """Statistics of one sorted key row; only the positives are visited (``O(V)`` to find them, then
    ``O(P log V)``)."""
    v = keys.shape[0]
    pos_idx = np.flatnonzero(keys & 1)                               # sorted indices of the positives, ascending
    p = pos_idx.size
    n_neg = n_valid - p
    if p == 0:
        return np.nan, np.nan, np.nan, np.nan, 0
    k = keys[pos_idx]
    g0 = np.searchsorted(keys, k - 1, side="left")                   # tie-group start (key of label 0 is k − 1)
    g1 = np.searchsorted(keys, k, side="right") - 1                  # tie-group end
    pos_ge = p - np.searchsorted(pos_idx, g0, side="left")           # n⁺(G): positives at or after g0
    all_ge = v - g0                                                  # n(G): voxels at or after g0
    ap = float(np.mean(pos_ge / all_ge))
    n_invalid = v - n_valid
    midrank = (g0 + g1) / 2.0 + 1.0 - n_invalid
    auroc = (midrank.sum() - p * (p + 1) / 2.0) / (p * n_neg) if n_neg > 0 else np.nan
    dsc = 2.0 * pos_ge / (all_ge + p)
    j = int(np.argmax(dsc))
    return ap, float(auroc), float(dsc[j]), float(decode(r, pos_idx[j], k[j])), p


def _chunk_stats(s: np.ndarray, y: np.ndarray, valid: np.ndarray) -> list[tuple]:
    keys, decode = _sorted_keys(s, y & valid, valid)
    n_valid = np.count_nonzero(valid, axis=1)
    return [_row_stats(keys[r], int(n_valid[r]), decode, r) for r in range(keys.shape[0])]


def rank_stats(scores, labels, mask=None, *, region: Region = "volume", no_positive_ap: float = 0.0,
               chunk_voxels: int = CHUNK_VOXELS) -> RankStats:
    """AP, AUROC and best DICE of every volume from one sort per volume.

    scores: ``[N, ...]`` finite anomaly scores; labels: ``[N, ...]`` binary annotation; mask: ``[N, ...]`` brain
    masks, required for ``region="brain"`` (then only voxels inside it are ranked). Volumes without positives get
    ``ap = no_positive_ap`` and ``auroc = best_dice = best_score = nan``.
    """
    s = _as_batch(scores)
    if s.dtype.kind not in "fiub":
        raise ValueError(f"rank_stats: scores must be numeric, got dtype {s.dtype}")
    y = _as_batch(labels, bool)
    if region == "brain":
        if mask is None:
            raise ValueError("rank_stats: region='brain' needs the brain masks")
        m = _as_batch(mask, bool)
    elif region == "volume":
        m = np.ones(y.shape, bool)
    else:
        raise ValueError(f"rank_stats: region must be 'volume' or 'brain', got {region!r}")
    if not s.shape == y.shape == m.shape:
        raise ValueError(f"rank_stats: scores {s.shape}, labels {y.shape} and mask {m.shape} differ in shape")
    if s.dtype.kind == "f" and not np.isfinite(s).all():
        raise ValueError("rank_stats: scores contain NaN or infinite values")
    step = max(1, int(chunk_voxels) // max(1, s.shape[1]))
    rows = [r for i in range(0, s.shape[0], step) for r in _chunk_stats(s[i:i + step], y[i:i + step], m[i:i + step])]
    ap, au, best, best_score = (np.array([r[j] for r in rows], np.float64) for j in range(4))
    n_pos = np.array([r[4] for r in rows], np.int64)
    ap = np.where(n_pos == 0, float(no_positive_ap), ap)
    return RankStats(ap=ap, auroc=au, best_dice=best, best_score=best_score, n_pos=n_pos)


def average_precision(scores, labels, mask=None, *, region: Region = "volume", no_positive_ap: float = 0.0
                      ) -> np.ndarray:
    """Per-volume AUPRC (= scikit-learn ``average_precision_score``) -> ``[N]``."""
    return rank_stats(scores, labels, mask, region=region, no_positive_ap=no_positive_ap).ap


def auroc(scores, labels, mask=None, *, region: Region = "volume") -> np.ndarray:
    """Per-volume AUROC (= scikit-learn ``roc_auc_score``) -> ``[N]``."""
    return rank_stats(scores, labels, mask, region=region).auroc


def pooled_rank_stats(scores, labels, mask=None, *, region: Region = "volume") -> RankStats:
    """AP / AUROC / best DICE over the voxels of all volumes pooled in one ranking (the "pooled AUPRC" extra)."""
    s = _as_batch(scores).reshape(1, -1)
    y = _as_batch(labels).reshape(1, -1)
    m = None if mask is None else _as_batch(mask).reshape(1, -1)
    return rank_stats(s, y, m, region=region, chunk_voxels=max(CHUNK_VOXELS, s.size))
