"""Figure builders return the expected grids and save PNG + PDF."""
from __future__ import annotations

import numpy as np
import pandas as pd

from cddpm_lib import figures
from cddpm_lib.volumes import save_npz


def _case(seed=0, shape=(12, 10, 6)):
    rng = np.random.default_rng(seed)
    seg = np.zeros(shape, np.uint8)
    seg[4:7, 3:6, 3 + seed % 2] = 1
    image = rng.random(shape).astype(np.float32)
    return {"image": image, "recon": image * 0.9, "anomaly": image * 0.1 + seg, "seg": seg,
            "brain_mask": np.ones(shape, np.uint8), "affine": np.eye(4)}


def test_best_slice():
    c = _case(1)
    assert figures.best_slice(c["seg"]) == 4
    assert figures.best_slice(np.zeros((3, 3, 4)), np.pad(np.ones((3, 3, 1)), ((0, 0), (0, 0), (2, 1)))) == 2


def test_fig4_grid_and_save(tmp_path):
    fig = figures.fig4([("cDDPM", _case(0)), ("DAE", _case(1))])
    assert len(fig.axes) == 6
    paths = figures.save(fig, tmp_path / "fig4")
    assert [p.suffix for p in paths] == [".png", ".pdf"] and all(p.stat().st_size > 0 for p in paths)


def test_fig5_lines_and_flat_ensemble():
    rows = [{"model": m, "t_test": t, "dataset": d, "mean": 10 + t / 100, "std": 1.0}
            for m in ("ddpm", "cddpm") for t in (250, 500) for d in ("BraTS21", "MSLUB")]
    rows += [{"model": "cddpm", "t_test": -1, "dataset": d, "mean": 15.0, "std": 0.5} for d in ("BraTS21", "MSLUB")]
    fig = figures.fig5(pd.DataFrame(rows))
    assert len(fig.axes) == 2
    labels = fig.axes[1].get_legend_handles_labels()[1]
    assert sorted(labels) == sorted(["DDPM", "cDDPM", "cDDPM$^{ens}$"])


def test_fig6_and_table4_deltas():
    c = _case(0)
    cases = [{"title": "BraTS21 a", "image": c["image"], "seg": c["seg"], "z": 3, "maps": {"A": c["anomaly"]}},
             {"title": "WMH b", "image": c["image"], "seg": c["seg"], "z": 3,
              "maps": {"A": c["anomaly"], "B": c["anomaly"]}}]
    assert len(figures.fig6(cases).axes) == 2 * 4
    df = pd.DataFrame({"model": ["dae", "ddpm"], "removed": ["MF", "CC"], "dataset": ["BraTS21", "ATLAS"],
                       "delta": [-5.0, 0.1], "paper_delta": [-5.62, -0.02]})
    assert len(figures.table4_deltas(df).axes) == 2


def test_examples_and_gallery_from_index(tmp_path):
    rows = []
    for label, model in (("cDDPM+SSL+ENS", "cddpm"), ("DAE", "dae")):
        for i in range(2):
            p = save_npz(tmp_path / label / f"s{i}.npz", **_case(i))
            rows.append({"row": label, "model": model, "split": "test", "dataset": "BraTS21", "fold": 0,
                         "purpose": "table3", "subject_id": f"s{i}", "npz": str(p)})
    index = pd.DataFrame(rows)
    ex = figures.examples_from_index(index, ["cDDPM+SSL+ENS", "pDDPM", "DAE"], "BraTS21", 0, lambda a, m: a * 2)
    assert [e[0] for e in ex] == ["cDDPM+SSL+ENS", "DAE"]
    np.testing.assert_allclose(ex[0][1]["anomaly"], _case(0)["anomaly"] * 2)  # both lesions equal: first kept
    cases = figures.gallery_cases(index, ["cDDPM+SSL+ENS", "DAE"], ["BraTS21", "WMH"], 0, lambda a, m: a,
                                  per_dataset=1)
    assert len(cases) == 1 and set(cases[0]["maps"]) == {"cDDPM+SSL+ENS", "DAE"}
