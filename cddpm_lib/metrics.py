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
    """Monotone map of finite float32 to uint64 in ``[1, 2^32)``: ``a < b ⇔ key(a) < key(b)``, ``−0 ≡ +0``."""
    x = np.asarray(x, np.float32) + np.float32(0.0)  # -0.0 -> +0.0
    u = x.view(np.uint32)
    key = np.where(u >> 31, ~u, u | np.uint32(0x80000000))
    return key.astype(np.uint64)


def float32_from_key(key: np.ndarray) -> np.ndarray:
    """Inverse of :func:`float32_order_key`."""
    k = np.asarray(key, np.uint64).astype(np.uint32)
    u = np.where(k >> 31, k & np.uint32(0x7FFFFFFF), ~k)
    return u.astype(np.uint32).view(np.float32)


def _is_float32_exact(s: np.ndarray) -> bool:
    if s.dtype == np.float32 or s.dtype.kind in "iub":
        return s.dtype.itemsize <= 2 or s.dtype == np.float32 or bool(
            np.all(s.astype(np.float32).astype(s.dtype) == s))
    return bool(np.all(s.astype(np.float32).astype(np.float64) == s))


def _sorted_groups(s: np.ndarray, y: np.ndarray, valid: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Sort every row by score -> ``(group_key, y, score)`` ``[B, V]``; invalid voxels first with group key 0."""
    if _is_float32_exact(s):
        key = (float32_order_key(s) << np.uint64(1)) | y.astype(np.uint64)
        key[~valid] = 0
        key = np.sort(key, axis=1)
        group = key >> np.uint64(1)
        return group, (key & np.uint64(1)).astype(bool), float32_from_key(np.maximum(group, 1))
    s64 = np.where(valid, s.astype(np.float64), -np.inf)
    order = np.argsort(s64, axis=1, kind="stable")
    ss = np.take_along_axis(s64, order, 1)
    ys = np.take_along_axis(y & valid, order, 1)
    group = np.empty(ss.shape, np.uint64)
    group[:, 0] = 0
    group[:, 1:] = np.cumsum(ss[:, 1:] != ss[:, :-1], axis=1, dtype=np.uint64)
    group += np.isfinite(ss[:, :1]).astype(np.uint64)  # invalid rows start at group 0
    return group, ys, ss


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


def _chunk_stats(s: np.ndarray, y: np.ndarray, valid: np.ndarray) -> tuple[np.ndarray, ...]:
    b, v = s.shape
    group, ys, ss = _sorted_groups(s, y, valid)
    n_pos = np.count_nonzero(ys, axis=1)
    n_valid = np.count_nonzero(valid, axis=1)
    n_neg = n_valid - n_pos
    n_invalid = v - n_valid
    idx = np.arange(v, dtype=np.int64)
    start = np.ones((b, v), bool)
    start[:, 1:] = group[:, 1:] != group[:, :-1]
    g0 = np.maximum.accumulate(np.where(start, idx, 0), axis=1)                    # tie-group start
    end = np.ones((b, v), bool)
    end[:, :-1] = start[:, 1:]
    g1 = np.minimum.accumulate(np.where(end, idx, v - 1)[:, ::-1], axis=1)[:, ::-1]  # tie-group end
    cy = np.cumsum(ys, axis=1, dtype=np.int64)
    pos_ge = n_pos[:, None] - (np.take_along_axis(cy, g0, 1) - np.take_along_axis(ys, g0, 1))  # n⁺(G)
    all_ge = v - g0                                                                            # n(G)
    with np.errstate(invalid="ignore", divide="ignore"):
        prec = np.where(ys, pos_ge / np.maximum(all_ge, 1), 0.0)
        ap = prec.sum(1) / n_pos
        midrank = (g0 + g1) / 2.0 + 1.0 - n_invalid[:, None]
        r_pos = np.where(ys, midrank, 0.0).sum(1)
        auroc = (r_pos - n_pos * (n_pos + 1) / 2.0) / (n_pos.astype(np.float64) * n_neg)
        dsc = np.where(ys, 2.0 * pos_ge / (all_ge + n_pos[:, None]), -1.0)
    arg = dsc.argmax(1)
    best = dsc[np.arange(b), arg]
    best_score = np.asarray(ss[np.arange(b), arg], np.float64)
    none = n_pos == 0
    auroc = np.where(none | (n_neg == 0), np.nan, auroc)
    return (np.where(none, np.nan, ap), auroc, np.where(none, np.nan, best), np.where(none, np.nan, best_score),
            n_pos)


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
    parts = [_chunk_stats(s[i:i + step], y[i:i + step], m[i:i + step]) for i in range(0, s.shape[0], step)]
    ap, au, best, best_score, n_pos = (np.concatenate([p[j] for p in parts]) for j in range(5))
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
