"""Tables in the paper's layout with the paper's values side by side."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from cddpm_lib import reference, tables


def _ours():
    folds = pd.DataFrame({"model": ["ae"] * 3 + ["dae"] * 3, "ssl": False, "ens": False, "dataset": "BraTS21",
                          "metric": "DICE", "fold": [0, 1, 2] * 2, "value": [30.0, 32.0, 34.0, 40.0, 44.0, np.nan]})
    return tables.summarize(folds, ["model", "ssl", "ens", "dataset", "metric"])


def test_summarize_population_std_and_nan_skip():
    s = _ours().set_index("model")
    assert s.loc["ae", "mean"] == 32.0 and s.loc["ae", "std"] == pytest.approx(np.std([30, 32, 34]))
    assert s.loc["dae", "n"] == 2 and s.loc["dae", "mean"] == 42.0


def test_side_by_side_keeps_missing_rows_and_diffs():
    paper = reference.table3()
    paper = paper[(paper["dataset"] == "BraTS21") & (paper["metric"] == "DICE")]
    sbs = tables.side_by_side(_ours(), paper, ["model", "ssl", "ens", "dataset", "metric"])
    assert len(sbs) == 13 and list(sbs["model"][:2]) == ["thresh", "fanogan"]  # paper order, all rows kept
    ae = sbs[sbs["model"] == "ae"].iloc[0]
    assert ae["diff"] == pytest.approx(32.0 - 31.51) and ae["paper_std"] == 1.94
    assert np.isnan(sbs[sbs["model"] == "vae"].iloc[0]["mean"])


def test_wide_and_markdown_layout(tmp_path):
    paper = reference.table3()
    paper = paper[paper["model"].isin(["ae", "dae"]) & (paper["dataset"] == "BraTS21")]
    sbs = tables.side_by_side(_ours(), paper, ["model", "ssl", "ens", "dataset", "metric"])
    wide = tables.to_wide(sbs, ["model"], ["dataset", "metric"])
    assert list(wide.columns[:7]) == ["model", "BraTS21 DICE", "BraTS21 DICE ±", "BraTS21 DICE *",
                                      "BraTS21 DICE paper", "BraTS21 DICE paper ±", "BraTS21 DICE Δ"]
    assert wide.set_index("model").loc["dae", "BraTS21 AUPRC paper"] == 49.38
    md = tables.to_markdown(sbs, ["model"], ["dataset", "metric"], title="T")
    assert "| model | BraTS21 DICE | BraTS21 AUPRC |" in md
    assert "32.00±1.63 (paper 31.51±1.94, Δ +0.49)" in md and "– (paper 28.80±1.92)" in md
    csv, mdp = tables.write_table(wide, md, tmp_path / "t3")
    assert pd.read_csv(csv).shape == wide.shape and mdp.read_text() == md


def test_format_value():
    assert tables.format_value(53.371, 1.8, True) == "53.37±1.80*"
    assert tables.format_value(19.69, float("nan")) == "19.69"
    assert tables.format_value(float("nan")) == "–"


def test_side_by_side_needs_key_columns():
    with pytest.raises(ValueError, match="lacks"):
        tables.side_by_side(pd.DataFrame({"mean": [1.0]}), reference.table3(), ["model"])
