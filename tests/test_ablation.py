"""Stage 07 re-scores saved reconstructions with one post-processing step removed (Table 4)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from cddpm_lib import ablation, paths
from cddpm_lib.volumes import save_dataframe, save_npz


@pytest.fixture()
def index(tmp_path, monkeypatch):
    monkeypatch.setenv("CDDPM_RUNS_ROOT", str(tmp_path / "runs"))
    rng = np.random.default_rng(0)
    rows = []
    for label, model, ssl, ens in (("DAE", "dae", False, False), ("DDPM+ENS", "ddpm", False, True)):
        for split, n in (("val", 2), ("test", 2)):
            for i in range(n):
                seg = np.zeros((16, 16, 8), np.uint8)
                seg[4:10, 5:11, 2:6] = 1
                mask = np.zeros_like(seg)
                mask[1:15, 1:15, :] = 1
                noise = rng.random(seg.shape).astype(np.float32)
                anomaly = (0.6 * seg + 0.5 * noise * (rng.random(seg.shape) < 0.2)).astype(np.float32)
                p = save_npz(tmp_path / label / f"{split}{i}.npz", image=anomaly, recon=anomaly, anomaly=anomaly,
                             brain_mask=mask, seg=seg, affine=np.eye(4))
                rows.append({"row": label, "model": model, "ssl": ssl, "ens": ens, "variant": "x", "weighting": "t2",
                             "fold": 0, "model_id": model, "purpose": "table3", "split": split,
                             "subject_id": f"{split}{i}", "dataset": "BraTS21", "npz": str(p), "seconds": 0.0})
    save_dataframe(pd.DataFrame(rows), paths.results_dir("smoke") / "recon_index.csv")
    return tmp_path


def _cfg(**kw):
    return ablation.PostprocessingAblationConfig(**{"profile": "smoke", "folds": (0,), "datasets": ("BraTS21",),
                                                    "models": ("dae", "ddpm"), **kw})


def test_load_index_needs_stage_06(tmp_path, monkeypatch):
    monkeypatch.setenv("CDDPM_RUNS_ROOT", str(tmp_path / "empty"))
    with pytest.raises(FileNotFoundError, match="segmentation"):
        ablation.load_index(_cfg())


def test_table4_from_saved_maps(index):
    cfg = _cfg()
    idx = ablation.load_index(cfg)
    assert set(idx["row"]) == {"DAE", "DDPM+ENS"}
    per_fold = ablation.run_ablation(cfg, idx, log=lambda m: None)
    assert sorted(per_fold["removed"].unique()) == ["BE", "CC", "MF", "none"]
    steps = per_fold.drop_duplicates("removed").set_index("removed")["steps"]
    assert steps["MF"] == "erode → threshold → cc" and steps["BE"] == "median → threshold → cc"
    table = ablation.table4(cfg, per_fold)
    dae = table[table["row"] == "DAE"].set_index("removed")
    assert list(dae.index) == ["none", "CC", "MF", "BE"]
    assert dae.loc["none", "delta"] == 0.0
    assert dae.loc["MF", "delta"] == pytest.approx(dae.loc["MF", "mean"] - dae.loc["none", "mean"])
    assert dae.loc["MF", "paper_delta"] == -5.62 and dae.loc["none", "paper_mean"] == 45.37
    csv, md = ablation.write_table4(cfg, table)
    assert "BraTS21 delta" in pd.read_csv(csv).columns and "(paper 39.75±3.37 (-5.62))" in md.read_text()
    assert [p.suffix for p in ablation.figure(cfg, table)] == [".png", ".pdf"]


def test_config_rejects_unknown_step():
    with pytest.raises(ValueError, match="removed"):
        _cfg(removed=("XX",))


def test_a_moved_run_folder_still_finds_its_reconstructions(tmp_path, monkeypatch):
    """Stage 06 writes the reconstruction files of ``recon_index.csv`` relative to ``runs/<profile>``, so stage 07
    reads them from wherever the run folder now lies; absolute paths (earlier tables) are read as they are."""
    from cddpm_lib.segmentation import _run_relative_npz

    monkeypatch.setenv("CDDPM_RUNS_ROOT", str(tmp_path / "runs"))
    inside = save_npz(paths.recon_dir("smoke", "dae", 0, "default", "BraTS21") / "s1.npz", image=np.zeros(2))
    outside = save_npz(tmp_path / "elsewhere" / "s2.npz", image=np.zeros(2))
    table = pd.DataFrame({"row": "DAE", "purpose": "table3", "fold": 0, "dataset": "BraTS21", "subject_id": ["1", "2"],
                          "npz": [str(inside), str(outside)]})
    save_dataframe(_run_relative_npz(table, "smoke"), paths.results_dir("smoke") / "recon_index.csv")
    stored = pd.read_csv(paths.results_dir("smoke") / "recon_index.csv")["npz"].tolist()
    assert stored == ["recon/dae/fold0/default/BraTS21/s1.npz", str(outside)]
    (tmp_path / "runs").rename(tmp_path / "moved")
    monkeypatch.setenv("CDDPM_RUNS_ROOT", str(tmp_path / "moved"))
    got = ablation.load_index(_cfg(models=("dae",)))["npz"].tolist()
    assert got == [str(tmp_path / "moved" / "smoke" / stored[0]), str(outside)]
    assert all(Path(p).exists() for p in got)
