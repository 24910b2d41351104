"""The paper's numbers as data: spot checks against paper/TABLES.md and internal consistency."""
from __future__ import annotations

import pytest

from cddpm_lib import reference


def _row(table, **keys):
    return reference.paper_value(table, **keys)


def test_table3_headline_value_and_star():
    r = _row(reference.table3(), model="cddpm", ssl=True, ens=True, dataset="BraTS21", metric="DICE")
    assert (r["mean"], r["std"], r["star"]) == (53.37, 1.80, True)


def test_table3_thresh_has_no_std():
    r = _row(reference.table3(), model="thresh", ssl=False, ens=False, dataset="WMH", metric="AUPRC")
    assert r["mean"] == 4.72 and r["std"] != r["std"] and not r["star"]  # NaN std


def test_table3_ddpm_block_assignment():
    t3 = reference.table3()
    assert _row(t3, model="ddpm", ssl=False, ens=True, dataset="MSLUB", metric="DICE")["mean"] == 6.46
    assert _row(t3, model="pddpm", ssl=False, ens=False, dataset="ATLAS", metric="AUPRC")["mean"] == 17.37
    assert _row(t3, model="fanogan", ssl=False, ens=False, dataset="BraTS21", metric="DICE")["std"] == 6.15


def test_table3_rows_in_paper_order():
    labels = [reference.row_label(*r) for r in reference.TABLE3_ROWS]
    assert labels == ["Thresh", "AnoGAN", "VAE", "SVAE", "AE", "DAE", "DDPM", "DDPM+ENS", "pDDPM", "pDDPM+ENS",
                      "cDDPM", "cDDPM+SSL", "cDDPM+SSL+ENS"]
    assert len(reference.table3()) == 13 * 4 * 2


def test_table2_values():
    t2 = reference.table2()
    dae = _row(t2, model="dae", metric="SSIM")
    assert (dae["mean"], dae["std"], dae["star"]) == (98.69, 0.15, True)
    assert _row(t2, model="cddpm", metric="ratio_MSLUB")["mean"] == 4.49
    assert _row(t2, model="pddpm", metric="LPIPS")["star"]
    assert len(t2) == 7 * 8


def test_table4_values():
    r = _row(reference.table4(), model="pddpm", removed="MF", dataset="BraTS21")
    assert (r["mean"], r["std"], r["delta"], r["ens"]) == (36.09, 0.35, -13.69, True)


def test_table4_deltas_match_table3_full_rows():
    t3 = reference.table3()
    full = t3[t3["metric"] == "DICE"].set_index(["model", "ssl", "ens", "dataset"])["mean"]
    for r in reference.table4().itertuples():
        assert r.mean - full[(r.model, r.ssl, r.ens, r.dataset)] == pytest.approx(r.delta, abs=1e-9)


def test_table1_and_claims():
    t1 = reference.table1().set_index("dataset")
    assert t1.loc["ATLAS", "unhealthy_test"] == 480 and t1.loc["IXI", "healthy_train"] == 358
    assert reference.KLD_RATIOS == {"original": 2.3, "contrast_0.5": 4.0, "contrast_2.0": 17.0}
    assert reference.INFERENCE_TIME_RATIOS == {"ddpm": 0.02, "pddpm": -0.37}
    assert list(reference.kld_ratios()["ratio"]) == [2.3, 4.0, 17.0]


def test_paper_value_needs_a_unique_match():
    with pytest.raises(KeyError):
        reference.paper_value(reference.table3(), model="cddpm")


TABLES_MD = __import__("pathlib").Path("/work/shared/paper/TABLES.md")


@pytest.mark.skipif(not TABLES_MD.exists(), reason="paper/TABLES.md not available here")
def test_every_table3_cell_matches_tables_md():
    lines = TABLES_MD.read_text().split("## Table 3")[1].split("## Table 4")[0].splitlines()
    body = [[c.strip() for c in line.strip("|").split("|")] for line in lines if line.startswith("| ")][1:]
    t3 = reference.table3()
    assert len(body) == len(reference.TABLE3_ROWS)
    for cells, row in zip(body, reference.TABLE3_ROWS):
        assert cells[0] == reference.DISPLAY[row.model] and (cells[1] == "✓") == row.ssl
        for i, cell in enumerate(cells[3:]):
            r = _row(t3, **row._asdict(), dataset=reference.DATASETS[i // 2], metric=("DICE", "AUPRC")[i % 2])
            expected = f"{r['mean']:.2f}" + (f"±{r['std']:.2f}" if r["std"] == r["std"] else "") + \
                ("*" if r["star"] else "")
            assert cell == expected
