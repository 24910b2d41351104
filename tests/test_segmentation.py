"""Stage 06 on tiny evaluation sets: plan, reconstruction, scoring, Table 3, stars, outputs."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from _segmentation_fixtures import write_checkpoint, write_eval_cohort

from cddpm_lib import paths, segmentation
from cddpm_lib import segmentation_report as report
from cddpm_lib.fingerprint import module_fingerprint
from cddpm_lib.models import load_model
from cddpm_lib.postprocessing import PostprocessingSpec
from cddpm_lib.stats import compare_with_baselines
from cddpm_lib.volumes import save_npz


@pytest.fixture()
def roots(tmp_path, monkeypatch):
    monkeypatch.setenv("CDDPM_DATA_ROOT", str(tmp_path / "data"))
    monkeypatch.setenv("CDDPM_RUNS_ROOT", str(tmp_path / "runs"))
    return tmp_path


def _cfg(**kw):
    base = dict(profile="smoke", models=("thresh", "ae", "cddpm"), folds=(0, 1), weightings=("t2",),
                datasets=("BraTS21",), t_test_sweep=(250,), permutation_rounds=200, timing_volumes=0, n_nifti=1)
    return segmentation.SegmentationConfig(**{**base, **kw})


def test_plan_marks_missing_checkpoints(roots):
    write_checkpoint("smoke", "ae", "t2", 0)
    plan = segmentation.plan_runs(_cfg())
    t3 = plan[plan["purpose"] == "table3"].set_index(["row", "fold"])["status"]
    assert t3[("Thresh", 0)] == "no training needed" and ("Thresh", 1) not in t3.index
    assert t3[("AE", 0)] == "ok" and t3[("AE", 1)] == "missing checkpoint"
    assert set(plan.loc[plan["purpose"] == "sweep", "row"]) == {"cDDPM+SSL"}
    assert len(plan[plan["row"] == "cDDPM+SSL+ENS"]) == 2


def test_config_rejects_bad_values():
    with pytest.raises(ValueError, match="models"):
        _cfg(models=("resnet",))
    with pytest.raises(ValueError, match="post-processing"):
        _cfg(step_order=("erode", "cc"))


def test_stage_end_to_end(roots):
    write_eval_cohort(paths.source_dir("synthetic", "smoke"), datasets=("BraTS21",), n_val=2, n_test=2)
    write_checkpoint("smoke", "ae", "t2", 0)
    cfg = _cfg(models=("thresh", "ae", "vae"))
    plan = segmentation.plan_runs(cfg)
    index = segmentation.reconstruct_all(cfg, plan, log=lambda m: None)
    assert set(index["row"]) == {"Thresh", "AE"} and len(index) == 2 * 4
    again = segmentation.reconstruct_all(cfg, plan, log=lambda m: None)
    assert again["reused"].all()
    per_volume, runs = segmentation.score_all(cfg, index, log=lambda m: None)
    assert len(per_volume) == 2 * 2 and {"dice", "auprc", "auroc", "oracle_dice", "dice_other"} <= set(per_volume)
    ae = runs[runs["row"] == "AE"].iloc[0]  # which weights the threshold belongs to (checked when scoring)
    assert ae["weights"] == module_fingerprint(load_model(segmentation.checkpoint_path("smoke", "ae_t2", 0)))
    assert (runs["amp"] == "none").all()  # the precision the reconstructions ran in (the default float32)
    assert (per_volume["oracle_dice"] >= per_volume["dice"] - 1e-9).all()
    folds = report.fold_scores(per_volume)
    table = report.table3(cfg, plan, folds, report.significance(cfg, folds, per_volume))
    status = table.drop_duplicates("row").set_index("row")["status"]
    assert status["VAE"] == "missing checkpoint (2 of 2 runs)" and status["Thresh"] == "ok"
    assert status["AE"] == "missing checkpoint (1 of 2 runs)"  # fold 1 was not trained
    csv, md = report.write_table3(cfg, table, folds)
    assert "VAE" in md.read_text() and pd.read_csv(csv).shape[0] == 3
    extras = report.extras_table(cfg, folds, runs)
    assert {"AUROC", "oracle_DICE", "DICE_other_threshold", "pooled_AUPRC"} <= set(extras["metric"])
    nifti = report.export_nifti(cfg, index, runs)
    assert len(nifti) == 2 * 2 and all(p.exists() for p in nifti)


def test_evaluate_run_scores_a_perfect_map(tmp_path):
    rng = np.random.default_rng(0)
    files = []
    for i in range(4):
        seg = np.zeros((12, 12, 6), np.uint8)
        seg[3:7, 4:8, 1:4] = 1
        anomaly = seg + 0.2 * rng.random(seg.shape).astype(np.float32) * (1 - seg)
        files.append(str(save_npz(tmp_path / f"v{i}.npz", image=anomaly, recon=anomaly, anomaly=anomaly,
                                  brain_mask=np.ones_like(seg), seg=seg, affine=np.eye(4))))
    spec = PostprocessingSpec(steps=("threshold", "cc"))
    for method in ("bisection", "exact"):
        scores, info = segmentation.evaluate_run(files[:2], files[2:], spec, method=method)
        assert info["val_dice"] == 1.0 and np.allclose(scores[["dice", "auprc", "auroc", "oracle_dice"]], 1.0)


def test_table3_star_for_a_clearly_better_target():
    folds = pd.DataFrame([{"row": r, "model": m, "ssl": s, "ens": e, "variant": "x", "dataset": "BraTS21",
                           "fold": f, "metric": "DICE", "value": v + f}
                          for f in range(5) for r, m, s, e, v in (("cDDPM+SSL+ENS", "cddpm", True, True, 60.0),
                                                                  ("AE", "ae", False, False, 30.0))])
    cfg = _cfg(models=("ae", "cddpm"), folds=(0, 1, 2, 3, 4), permutation_rounds=2000)
    tests = compare_with_baselines(folds, "cDDPM+SSL+ENS", ["AE"], rounds=2000).assign(unit="fold (paper)")
    plan = pd.DataFrame({"row": ["AE", "cDDPM+SSL+ENS"], "purpose": "table3", "status": "ok"})
    table = report.table3(cfg, plan, folds, tests)
    star = table[(table["metric"] == "DICE") & (table["dataset"] == "BraTS21")].set_index("row")["star"]
    assert star["cDDPM+SSL+ENS"] and not star["AE"]


def _fold_rows(spec, folds):
    return pd.DataFrame([{"row": r, "model": m, "ssl": s, "ens": e, "variant": "x", "dataset": "BraTS21",
                          "fold": f, "metric": "DICE", "value": v + 0.1 * f}
                         for r, m, s, e, v in spec for f in (folds if m != "thresh" else folds[:1])])


def test_star_tests_other_models_and_counts_thresh_in_every_fold(roots):
    spec = (("cDDPM+SSL+ENS", "cddpm", True, True, 60.0), ("cDDPM+SSL", "cddpm", True, False, 59.9),
            ("AE", "ae", False, False, 30.0), ("Thresh", "thresh", False, False, 10.0))
    folds = _fold_rows(spec, [0, 1, 2, 3, 4])
    per_volume = pd.DataFrame(columns=["row", "dataset", "subject_id", "purpose", "dice", "auprc"])
    cfg = _cfg(models=("thresh", "ae", "cddpm"), folds=(0, 1, 2, 3, 4), permutation_rounds=2000)
    assert report.star_baselines(cfg, folds) == ["AE", "Thresh"]  # not its own ablation row
    tests = report.significance(cfg, folds, per_volume)
    fold_tests = tests[tests["unit"] == "fold (paper)"].set_index("baseline")
    assert fold_tests.loc["Thresh", "n_baseline"] == 5 and fold_tests["significant"].all()
    plan = pd.DataFrame({"row": [r for r, *_ in spec], "purpose": "table3", "status": "ok"})
    def starred(c, t):
        table = report.table3(c, plan, folds, t)
        return bool(table[(table["metric"] == "DICE") & (table["row"] == "cDDPM+SSL+ENS")]["star"].iloc[0])

    assert starred(cfg, tests)
    # tested against every row, the 0.1 lead over cDDPM+SSL is not significant: no star
    every = cfg.replace(star_baselines="all_rows")
    assert "cDDPM+SSL" in report.star_baselines(every, folds)
    assert not starred(every, report.significance(every, folds, per_volume))
    # two folds cannot give p < 0.05: the note says so
    two = _fold_rows(spec, [0, 1])
    cfg2 = cfg.replace(folds=(0, 1))
    note = report.star_note(cfg2, report.significance(cfg2, two, per_volume))
    assert "No star is possible" in note and "0.167" in note
    assert "No star is possible" not in report.star_note(cfg, tests)


def test_fig5_data_joins_table3_runs_at_single_t():
    cfg = _cfg(models=("ddpm", "cddpm"), t_test_sweep=(250, 500))
    recs = []
    for row, model, ssl, ens, variant, purpose, d in (
            ("DDPM", "ddpm", False, False, "t250", "sweep", 0.2), ("DDPM", "ddpm", False, False, "t500", "table3", 0.3),
            ("cDDPM+SSL", "cddpm", True, False, "t500", "table3", 0.5),
            ("cDDPM", "cddpm", False, False, "t500", "table3", 0.1),
            ("cDDPM+SSL+ENS", "cddpm", True, True, "ens", "table3", 0.6)):
        for fold in (0, 1):
            recs.append({"row": row, "model": model, "ssl": ssl, "ens": ens, "variant": variant, "purpose": purpose,
                         "dataset": "BraTS21", "fold": fold, "subject_id": "s", "dice": d + fold / 10, "auprc": d})
    data = report.fig5_data(cfg, pd.DataFrame(recs)).set_index(["model", "ssl", "t_test"])["mean"]
    assert data[("ddpm", False, 250)] == pytest.approx(25.0) and data[("ddpm", False, 500)] == pytest.approx(35.0)
    assert data[("cddpm", True, 500)] == pytest.approx(55.0) and data[("cddpm", True, -1)] == pytest.approx(65.0)
    assert ("cddpm", False, 500) not in data.index  # the sweep follows the SSL cDDPM


def test_float32_fallback_is_logged_once_and_recorded(roots, monkeypatch):
    from cddpm_lib import runtime

    write_eval_cohort(paths.source_dir("synthetic", "smoke"), datasets=("BraTS21",), n_val=1, n_test=1)
    write_checkpoint("smoke", "ae", "t2", 0)
    monkeypatch.setattr(runtime, "cpu_bf16_supported", lambda: False)
    cfg, said = _cfg(models=("thresh", "ae"), folds=(0,), amp="bf16", device="cpu"), []
    index = segmentation.reconstruct_all(cfg, segmentation.plan_runs(cfg), log=said.append)
    assert [m for m in said if "float32" in m] == [
        "[segmentation] warning: amp='bf16' needs a CPU on which oneDNN runs bfloat16 (AVX-512 or newer) or a "
        "CUDA device; running in float32 on cpu"]
    assert (index["amp"] == "none").all()  # the precision that ran, not the one asked for
    _, runs = segmentation.score_all(cfg, index, log=lambda m: None)
    assert (runs["amp"] == "none").all()


def test_inference_time_records_device_and_precision(roots):
    write_eval_cohort(paths.source_dir("synthetic", "smoke"), datasets=("BraTS21",), n_val=1, n_test=1)
    write_checkpoint("smoke", "cddpm", "t2", 0)
    cfg = _cfg(models=("ddpm", "cddpm"), folds=(0,), timing_volumes=1, device="cpu")
    times = report.inference_times(cfg, segmentation.plan_runs(cfg), log=lambda m: None)
    ok = times[times["status"] == "ok"]
    assert list(ok["variant"]) == ["t500", "ens"] and (ok["seconds_per_volume"] > 0).all()
    assert (ok["amp"] == "none").all() and (ok["device"] == "cpu").all()
    assert times.loc[times["model"] == "ddpm", "status"].item() == "missing checkpoint"
    saved = pd.read_csv(paths.results_dir("smoke") / "inference_time.csv")
    assert list(saved["amp"].dropna()) == ["none", "none"]
