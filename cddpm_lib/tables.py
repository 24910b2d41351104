"""Tables in the paper's layout, with the paper's values side by side and the difference (Tables 2, 3, 4).

The kit's results and :mod:`cddpm_lib.reference` both come as *long* DataFrames: key columns (e.g. ``model, ssl,
ens, dataset, metric``) plus ``mean, std`` (and optionally ``star``). The functions:

- :func:`summarize` — per-fold scores -> ``mean, std, n`` over folds (:func:`cddpm_lib.stats.mean_std`);
- :func:`side_by_side` — ours next to the paper's on the key columns: ``mean, std, star, paper_mean, paper_std,
  paper_star, diff`` (``diff = mean − paper_mean``); rows present on one side only are kept (NaN on the other),
  so a model that was not run shows up as missing instead of vanishing;
- :func:`to_wide` — the paper's layout as a numeric table (CSV): one row per table row, for every column cell the
  columns ``<cell>``, ``<cell> ±``, ``<cell> paper``, ``<cell> paper ±``, ``<cell> Δ``;
- :func:`to_markdown` — the same layout as Markdown, each cell ``ours ± std* (paper ± std*, Δ ±d)``;
- :func:`write_table` — CSV + Markdown into the results folder (atomic writes).
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import pandas as pd

from .stats import mean_std
from .volumes import save_dataframe, save_text


def summarize(per_fold: pd.DataFrame, keys: Sequence[str], value_col: str = "value", ddof: int = 0
              ) -> pd.DataFrame:
    """Mean ± std of ``value_col`` over the remaining rows (folds) per ``keys`` -> ``keys, mean, std, n``."""
    rows = []
    for key, grp in per_fold.groupby(list(keys), sort=False, dropna=False):
        key = key if isinstance(key, tuple) else (key,)
        vals = pd.to_numeric(grp[value_col], errors="coerce").to_numpy(np.float64)
        mean, std = mean_std(vals, ddof=ddof)
        rows.append({**dict(zip(keys, key)), "mean": mean, "std": std, "n": int(np.isfinite(vals).sum())})
    return pd.DataFrame(rows, columns=[*keys, "mean", "std", "n"])


def side_by_side(ours: pd.DataFrame, paper: pd.DataFrame, on: Sequence[str]) -> pd.DataFrame:
    """Outer join of ours and the paper's scores on ``on``; paper rows first, in the paper's order.

    Returns ``*on, mean, std, star, paper_mean, paper_std, paper_star, diff``.
    """
    on = list(on)
    for name, df in (("ours", ours), ("paper", paper)):
        missing = [c for c in [*on, "mean"] if c not in df.columns]
        if missing:
            raise ValueError(f"side_by_side: {name} lacks column(s) {missing}")
    left = ours[on + [c for c in ("mean", "std", "star") if c in ours.columns]].copy()
    right = paper[on + [c for c in ("mean", "std", "star") if c in paper.columns]].copy()
    right = right.rename(columns={"mean": "paper_mean", "std": "paper_std", "star": "paper_star"})
    right["_order"] = np.arange(len(right))
    left["_order_ours"] = np.arange(len(left))
    merged = right.merge(left, on=on, how="outer")
    merged["_order"] = merged["_order"].fillna(len(right) + merged["_order_ours"])
    merged = merged.sort_values("_order", kind="stable").drop(columns=["_order", "_order_ours"])
    for col in ("std", "paper_std"):
        if col not in merged.columns:
            merged[col] = np.nan
    for col in ("star", "paper_star"):
        merged[col] = merged[col].fillna(False).astype(bool) if col in merged.columns else False
    merged["mean"] = pd.to_numeric(merged.get("mean"), errors="coerce")
    merged["paper_mean"] = pd.to_numeric(merged["paper_mean"], errors="coerce")
    merged["diff"] = merged["mean"] - merged["paper_mean"]
    cols = [*on, "mean", "std", "star", "paper_mean", "paper_std", "paper_star", "diff"]
    return merged[cols].reset_index(drop=True)


def format_value(mean: float, std: float | None = None, star: bool = False, digits: int = 2) -> str:
    """``53.37±1.80*``; ``–`` for a missing value; no ``±`` when ``std`` is missing."""
    if mean is None or (isinstance(mean, float) and math.isnan(mean)):
        return "–"
    text = f"{mean:.{digits}f}"
    if std is not None and not (isinstance(std, float) and math.isnan(std)):
        text += f"±{std:.{digits}f}"
    return text + ("*" if star else "")


def format_cell(r: pd.Series, digits: int = 2) -> str:
    """``ours (paper …, Δ …)`` of one side-by-side row."""
    ours = format_value(r["mean"], r.get("std"), bool(r.get("star", False)), digits)
    if pd.isna(r.get("paper_mean")):
        return ours
    paper = format_value(r["paper_mean"], r.get("paper_std"), bool(r.get("paper_star", False)), digits)
    diff = "" if pd.isna(r.get("diff")) else f", Δ {r['diff']:+.{digits}f}"
    return f"{ours} (paper {paper}{diff})"


def _label(v) -> str:
    if isinstance(v, (bool, np.bool_)):
        return "✓" if v else ""
    return "" if v is None or (isinstance(v, float) and math.isnan(v)) else str(v)


def _pivot(sbs: pd.DataFrame, rows: Sequence[str], cols: Sequence[str]):
    row_keys = list(dict.fromkeys(tuple(r) for r in sbs[list(rows)].itertuples(index=False)))
    col_keys = list(dict.fromkeys(tuple(c) for c in sbs[list(cols)].itertuples(index=False)))
    index = {(tuple(r[list(rows)]), tuple(r[list(cols)])): r for _, r in sbs.iterrows()}
    return row_keys, col_keys, index


def to_wide(sbs: pd.DataFrame, rows: Sequence[str], cols: Sequence[str], extra: Sequence[str] = ()) -> pd.DataFrame:
    """The paper's layout as numbers (for CSV): ``rows`` keys, then per column cell (``cols`` joined by a space)
    ``<cell>, <cell> ±, <cell> *, <cell> paper, <cell> paper ±, <cell> Δ`` and ``<cell> <extra>`` for each
    further column named in ``extra``."""
    row_keys, col_keys, index = _pivot(sbs, rows, cols)
    out = []
    for rk in row_keys:
        rec = dict(zip(rows, rk))
        for ck in col_keys:
            name = " ".join(str(c) for c in ck)
            r = index.get((rk, ck))
            get = (lambda k: r[k]) if r is not None else (lambda k: np.nan)
            rec.update({name: get("mean"), f"{name} ±": get("std"), f"{name} *": get("star"),
                        f"{name} paper": get("paper_mean"), f"{name} paper ±": get("paper_std"),
                        f"{name} Δ": get("diff")})
            rec.update({f"{name} {e}": get(e) for e in extra})
        out.append(rec)
    return pd.DataFrame(out)


def markdown_table(df: pd.DataFrame) -> str:
    """A plain GitHub-flavoured Markdown table of ``df`` (no external dependency)."""
    head = "| " + " | ".join(str(c) for c in df.columns) + " |"
    sep = "|" + "|".join("---" for _ in df.columns) + "|"
    body = ["| " + " | ".join(_label(v) if not isinstance(v, float) else (f"{v:.4g}" if math.isfinite(v) else "–")
                              for v in row) + " |" for row in df.itertuples(index=False)]
    return "\n".join([head, sep, *body])


def to_markdown(sbs: pd.DataFrame, rows: Sequence[str], cols: Sequence[str], *, title: str = "", note: str = "",
                digits: int = 2, cell: Callable[[pd.Series, int], str] | None = None) -> str:
    """The paper's layout as Markdown: one line per row key, one column per ``cols`` key, cells from ``cell``
    (default :func:`format_cell`: ours, then the paper's value and the difference)."""
    cell = cell or format_cell
    row_keys, col_keys, index = _pivot(sbs, rows, cols)
    table = []
    for rk in row_keys:
        rec = {k: _label(v) for k, v in zip(rows, rk)}
        for ck in col_keys:
            r = index.get((rk, ck))
            rec[" ".join(str(c) for c in ck)] = "–" if r is None else cell(r, digits)
        table.append(rec)
    text = markdown_table(pd.DataFrame(table))
    parts = [f"## {title}\n" if title else "", text, f"\n{note}" if note else ""]
    return "\n".join(p for p in parts if p) + "\n"


def write_table(wide: pd.DataFrame, markdown: str, stem: str | Path) -> tuple[Path, Path]:
    """Write ``<stem>.csv`` (numbers) and ``<stem>.md`` atomically; returns both paths."""
    stem = Path(stem)
    return save_dataframe(wide, stem.with_suffix(".csv")), save_text(markdown, stem.with_suffix(".md"))
