"""scoring: one new scan through preprocessing, a checkpoint, post-processing and the threshold."""
from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import torch
from nilearn import datasets

from cddpm_lib import paths, runtime, scoring
from cddpm_lib.cli import main
from cddpm_lib.models import build_model
from cddpm_lib.scoring import ScoringError, checkpoint_info, score_scan


@pytest.fixture()
def runs(tmp_path, monkeypatch):
    monkeypatch.setenv("CDDPM_RUNS_ROOT", str(tmp_path / "runs"))
    monkeypatch.setenv("CDDPM_DATA_ROOT", str(tmp_path / "data"))
    return tmp_path


@pytest.fixture()
def scan(tmp_path):
    """Skull-stripped T2-like MNI152 brain (2 mm) with a bright blob."""
    t = datasets.load_mni152_template(resolution=2)
    brain = datasets.load_mni152_brain_mask(resolution=2).get_fdata() > 0
    img = np.where(brain, 1.2 - t.get_fdata() / t.get_fdata().max(), 0).astype(np.float32)
    img[brain & (np.linalg.norm(np.indices(img.shape) - np.array([40, 60, 45])[:, None, None, None], axis=0) < 6)] = 2
    path = tmp_path / "sub-01_T2w.nii.gz"
    nib.save(nib.Nifti1Image(img * 500, t.affine), path)
    return path


def _checkpoint(runs, name="ae", image_size=(32, 32), weighting="t2") -> "object":
    torch.manual_seed(0)
    model = build_model(name, image_size=image_size, channels=[4, 8], latent_dim=8)
    path = paths.checkpoint_dir("smoke", f"{name}_{weighting}", 0) / "best.pt"
    path.parent.mkdir(parents=True)
    torch.save({"model_name": model.name, "hparams": dict(model.hparams), "model": model.state_dict()}, path)
    return path


def _ddpm_checkpoint(runs):
    ckpt = paths.checkpoint_dir("smoke", "ddpm_t2", 0) / "best.pt"
    ckpt.parent.mkdir(parents=True)
    torch.manual_seed(0)
    model = build_model("ddpm", image_size=(32, 32), model_channels=8, channel_mult=(1, 2), num_res_blocks=1,
                        num_heads=2)
    torch.save({"model_name": model.name, "hparams": dict(model.hparams), "model": model.state_dict()}, ckpt)
    return ckpt, model


def test_checkpoint_info_reads_the_run_layout(runs):
    info = checkpoint_info(paths.checkpoint_dir("quick", "cddpm-ssl_t2", 3) / "best.pt")
    assert (info.profile, info.model_id, info.fold) == ("quick", "cddpm-ssl_t2", 3)
    assert checkpoint_info(runs / "elsewhere" / "best.pt").model_id is None


def test_score_writes_maps_in_the_scan_space_and_the_preprocessed_space(runs, scan):
    ckpt = _checkpoint(runs)
    out = score_scan(scan, ckpt, runs / "out", weighting="t2", threshold=0.05, skull_stripped=True)
    raw = nib.load(scan)
    for key in ("anomaly_map", "segmentation"):
        img = nib.load(out[key])
        assert img.shape == raw.shape
        np.testing.assert_allclose(img.affine, raw.affine, atol=1e-5)
    pre = nib.load(out["preprocessed_image"])
    assert pre.shape == (32, 32, 16)  # the smoke profile's preprocessed size, read from the checkpoint's path
    anomaly = nib.load(out["preprocessed_anomaly_map"]).get_fdata()
    seg = nib.load(out["preprocessed_segmentation"]).get_fdata()
    mask_path = out["preprocessed_image"].parent / "brain_mask.nii.gz"
    mask = nib.load(mask_path).get_fdata() > 0
    assert set(np.unique(seg)) <= {0, 1} and (seg[~mask] == 0).all() and (anomaly[~mask] == 0).all()
    native_seg = nib.load(out["segmentation"]).get_fdata()
    assert set(np.unique(native_seg)) <= {0, 1} and (native_seg[raw.get_fdata() == 0] == 0).all()
    summary = json.loads(out["summary"].read_text())
    assert summary["threshold"] == 0.05 and summary["profile"] == "smoke" and summary["model"] == "ae"
    assert summary["amp"] == "none"  # the segmentation profile's precision
    assert summary["anomalous_voxels"] == int(native_seg.sum())
    assert summary["preprocessed_anomalous_ml"] == pytest.approx(
        seg.sum() * abs(np.linalg.det(pre.affine[:3, :3])) / 1000)
    assert out["overview"].stat().st_size > 10_000


def test_to_native_inverts_the_preprocessing_geometry(runs, scan):
    """The preprocessed brain mask mapped back onto the scan's grid covers the scan's brain."""
    import SimpleITK as sitk

    from cddpm_lib import preprocessing as pp

    out = score_scan(scan, _checkpoint(runs), runs / "out", weighting="t2", threshold=0.05, skull_stripped=True)
    sub = out["preprocessed_image"].parent
    mask, affine = nib.load(sub / "brain_mask.nii.gz").get_fdata(), nib.load(sub / "brain_mask.nii.gz").affine
    back = pp.to_native(mask, affine, pp._load_sitk(str(scan)), sitk.ReadTransform(str(sub / pp.TRANSFORM_FILE)),
                        label=True) > 0.5
    brain = nib.load(scan).get_fdata() > 0
    # the smoke grid keeps the central 96 mm axially: compare on the axial slices it covers
    zs = np.flatnonzero(back.any(axis=(0, 1)))
    assert len(zs) > 20
    sel = slice(zs.min() + 3, zs.max() - 3)  # 6 mm voxels: skip the partial-volume edge slices
    assert pp.dice(back[:, :, sel], brain[:, :, sel]) > 0.85


def test_threshold_comes_from_the_segmentation_stage(runs, scan):
    ckpt = _checkpoint(runs)
    with pytest.raises(ScoringError, match="segmentation_runs.csv does not exist"):
        score_scan(scan, ckpt, runs / "out", weighting="t2", skull_stripped=True)
    results = paths.results_dir("smoke")
    results.mkdir(parents=True)
    pd.DataFrame([{"model_id": "ae_t2", "fold": 0, "variant": "default", "threshold": 0.123, "dataset": "MSLUB",
                   "threshold_method": "bisection"},
                  {"model_id": "ae_t2", "fold": 1, "variant": "default", "threshold": 0.9, "dataset": "MSLUB",
                   "threshold_method": "bisection"}]).to_csv(results / "segmentation_runs.csv", index=False)
    out = score_scan(scan, ckpt, runs / "out", weighting="t2", skull_stripped=True)
    summary = json.loads(out["summary"].read_text(), parse_constant=lambda c: pytest.fail(f"bare {c} in JSON"))
    assert summary["threshold"] == 0.123 and "MSLUB" in summary["threshold_source"]
    assert summary["threshold_source"].startswith(str(results.resolve() / "segmentation_runs.csv"))
    assert summary["preprocessing_qc"]["dice_vs_reference"] is None  # no reference mask: null, not NaN


def test_threshold_comes_from_the_run_that_holds_the_checkpoint(runs, scan, tmp_path):
    """A run folder moved elsewhere keeps its own thresholds, not those of the run under $CDDPM_RUNS_ROOT."""
    def thresholds(results, value):
        results.mkdir(parents=True, exist_ok=True)
        pd.DataFrame([{"model_id": "ae_t2", "fold": 0, "variant": "default", "threshold": value,
                       "dataset": "BraTS21", "threshold_method": "bisection"}]).to_csv(
            results / "segmentation_runs.csv", index=False)

    thresholds(paths.results_dir("smoke"), 0.5)  # the run under $CDDPM_RUNS_ROOT
    moved = tmp_path / "elsewhere" / "smoke"
    ckpt = moved / "checkpoints" / "ae_t2" / "fold0" / "best.pt"
    ckpt.parent.mkdir(parents=True)
    _checkpoint(runs).rename(ckpt)
    info = checkpoint_info(ckpt)
    assert info.run_dir == moved.resolve() and info.results_dir == moved.resolve() / "results"
    with pytest.raises(ScoringError, match=f"{moved.resolve() / 'results'}/segmentation_runs.csv does not exist"):
        score_scan(scan, ckpt, runs / "out", weighting="t2", skull_stripped=True)
    thresholds(moved / "results", 0.02)
    summary = json.loads(score_scan(scan, ckpt, runs / "out", weighting="t2", skull_stripped=True)["summary"]
                         .read_text())
    assert summary["threshold"] == 0.02
    csv = moved.resolve() / "results" / "segmentation_runs.csv"
    assert summary["threshold_source"] == f"{csv}: validation on BraTS21 (bisection)"
    # outside a run layout the profile's results folder is the only place left
    assert scoring.validation_threshold("smoke", "ae_t2", 0, "default")[0] == 0.5


def test_threshold_per_data_set_and_the_stages_variant_and_precision(runs, scan, monkeypatch, capsys):
    rows = [("ddpm_t2", "t500", "table3", "BraTS21", 0.2), ("ddpm_t2", "t500", "table3", "MSLUB", 0.1),
            ("ddpm_t2", "t250", "sweep", "BraTS21", 0.7)]
    results = paths.results_dir("smoke")
    results.mkdir(parents=True)
    pd.DataFrame([{"model_id": m, "fold": 0, "variant": v, "purpose": p, "dataset": d, "threshold": t,
                   "threshold_method": "bisection", "amp": "bf16" if p == "table3" else "none"}
                  for m, v, p, d, t in rows]).to_csv(results / "segmentation_runs.csv", index=False)
    # the stage evaluated this model at t500 (not the ensemble of the profile's default): that is the default
    assert scoring.stage_variant("smoke", "ddpm_t2", 0) == "t500"
    assert scoring.stage_variant("smoke", "vae_t2", 0) is None
    # and reconstructed it in bfloat16 (the profile says float32): that precision is the default too
    assert scoring.segmentation_amp("smoke", "ddpm_t2", 0) == "bf16"
    assert scoring.segmentation_amp("smoke", "vae_t2", 0) is None
    with pytest.raises(ScoringError, match=r"BraTS21 \(0.2\), MSLUB \(0.1\); pass --threshold-dataset"):
        scoring.validation_threshold("smoke", "ddpm_t2", 0, "t500")
    assert scoring.validation_threshold("smoke", "ddpm_t2", 0, "t500", "MSLUB")[0] == 0.1
    assert scoring.validation_threshold("smoke", "ddpm_t2", 0, "t500", "MSLUB").amp == "bf16"
    with pytest.raises(ScoringError, match="--threshold-dataset 'WMH'"):
        scoring.validation_threshold("smoke", "ddpm_t2", 0, "t500", "WMH")
    with pytest.raises(ScoringError, match=r"variant 't250' \(it has \['t500'\]\)"):  # sweep runs do not count
        scoring.validation_threshold("smoke", "ddpm_t2", 0, "t250", "BraTS21")
    ckpt, _ = _ddpm_checkpoint(runs)
    monkeypatch.setattr(runtime, "cpu_bf16_supported", lambda: True)
    out = score_scan(scan, ckpt, runs / "out", weighting="t2", skull_stripped=True, threshold_dataset="BraTS21")
    summary = json.loads(out["summary"].read_text())
    assert summary["variant"] == "t500" and summary["threshold"] == 0.2 and "BraTS21" in summary["threshold_source"]
    assert summary["amp"] == summary["threshold_amp"] == "bf16"
    # asking for another precision than the threshold's is allowed, said, and recorded
    out = score_scan(scan, ckpt, runs / "out2", weighting="t2", skull_stripped=True, threshold_dataset="BraTS21",
                     amp="none")
    assert "threshold was chosen on reconstructions in amp='bf16'; this scan is reconstructed in amp='none'" in \
        capsys.readouterr().err
    summary = json.loads(out["summary"].read_text())
    assert summary["amp"] == "none" and summary["threshold_amp"] == "bf16"
    # a recorded value that is no precision is named with its file
    table = pd.read_csv(results / "segmentation_runs.csv")
    table.loc[0, "amp"] = "bf61"
    table.to_csv(results / "segmentation_runs.csv", index=False)
    with pytest.raises(ScoringError, match=r"segmentation_runs.csv: column 'amp' of ddpm_t2 fold 0 holds 'bf61'"):
        scoring.segmentation_amp("smoke", "ddpm_t2", 0)
    with pytest.raises(ScoringError, match=r"column 'amp' of ddpm_t2 fold 0 holds 'bf61'"):
        scoring.validation_threshold("smoke", "ddpm_t2", 0, "t500", "BraTS21")
    # a run that needs neither the stage's threshold nor its precision does not read them
    out = score_scan(scan, ckpt, runs / "out3", weighting="t2", skull_stripped=True, threshold=0.2, amp="none")
    assert json.loads(out["summary"].read_text())["threshold_amp"] is None


def test_bad_inputs_get_clear_errors(runs, scan, tmp_path, capsys):
    ckpt = _checkpoint(runs)
    with pytest.raises(ScoringError, match="does not exist"):
        score_scan(tmp_path / "missing.nii.gz", ckpt, runs / "o", weighting="t2", threshold=0.1)
    broken = tmp_path / "broken.nii.gz"
    broken.write_bytes(b"not a nifti")
    with pytest.raises(ScoringError, match="not a readable NIfTI"):
        score_scan(broken, ckpt, runs / "o", weighting="t2", threshold=0.1)
    with pytest.raises(ScoringError, match="--t-test is only for diffusion"):
        score_scan(scan, ckpt, runs / "o", weighting="t2", threshold=0.1, t_test=[500])
    with pytest.raises(ScoringError, match=r"trained on \(32, 32\) slices but profile 'quick'"):
        score_scan(scan, ckpt, runs / "o", weighting="t2", threshold=0.1, profile="quick")
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(ScoringError, match=r"junk.pt cannot be loaded: not a cddpm-uad checkpoint \(not a file "
                                           r"written by torch.save\)"):
        score_scan(scan, junk, runs / "o", weighting="t2", threshold=0.1)
    with pytest.raises(ScoringError, match=r"T2w.nii.gz cannot be loaded: not a cddpm-uad checkpoint") as err:
        score_scan(scan, scan, runs / "o", weighting="t2", threshold=0.1)  # the scan passed as the checkpoint
    assert "weights_only" not in str(err.value)
    pickled = tmp_path / "pickled.pt"
    torch.save({"model": np.zeros(2)}, pickled)
    with pytest.raises(ScoringError, match=r"not a cddpm-uad checkpoint \(it holds Python objects other than"):
        score_scan(scan, pickled, runs / "o", weighting="t2", threshold=0.1)
    state = tmp_path / "state.pt"
    torch.save({"model": {}}, state)
    with pytest.raises(ScoringError, match=r"state.pt: not a cddpm-uad checkpoint \(missing 'model_name'\)"):
        score_scan(scan, state, runs / "o", weighting="t2", threshold=0.1)
    with pytest.raises(ScoringError, match="is a folder; pass the best.pt"):
        score_scan(scan, ckpt.parent, runs / "o", weighting="t2", threshold=0.1)
    # a T2 model (model id ae_t2) does not score a scan given as T1
    with pytest.raises(ScoringError, match=r"--weighting t1 but the checkpoint was trained on T2 scans \(model id "
                                           r"'ae_t2'\); .*--weighting t2"):
        score_scan(scan, ckpt, runs / "o", weighting="t1", threshold=0.1)
    copied = tmp_path / "copied" / "best.pt"  # outside the run layout: the config.json beside it says T2
    copied.parent.mkdir()
    copied.write_bytes(ckpt.read_bytes())
    (copied.parent / "config.json").write_text(json.dumps({"weighting": "t2"}))
    with pytest.raises(ScoringError, match=r"trained on T2 scans \(.*config.json\)"):
        score_scan(scan, copied, runs / "o", weighting="t1", threshold=0.1)
    assert main(["score", str(scan), "--checkpoint", str(runs / "nope.pt"), "-o", str(runs / "o"),
                 "--weighting", "t2", "--threshold", "0.1"]) == 2
    assert "nope.pt" in capsys.readouterr().err


def test_settings_and_output_folder_are_checked_before_any_work(runs, scan, capsys, monkeypatch):
    ckpt, _ = _ddpm_checkpoint(runs)
    out = runs / "o"
    for kwargs, msg in (({"t_test": [2000]}, r"--t-test \[2000\]: noise levels must lie in 1..1000"),
                        ({"threshold": float("nan")}, "--threshold must be a finite number"),
                        ({"device": "gpu"}, "--device 'gpu'")):
        with pytest.raises(ScoringError, match=msg):
            score_scan(scan, ckpt, out, weighting="t2", **{"threshold": 0.1, **kwargs})
        assert not out.exists()  # refused before the preprocessing wrote anything
    out.write_text("a file")
    with pytest.raises(ScoringError, match="is a file"):
        score_scan(scan, ckpt, out, weighting="t2", threshold=0.1)
    out.unlink()
    score_scan(scan, ckpt, out, weighting="t2", threshold=0.1, skull_stripped=True)
    with pytest.raises(ScoringError, match="is not empty .*--overwrite"):
        score_scan(scan, ckpt, out, weighting="t2", threshold=0.2, skull_stripped=True)
    monkeypatch.setattr(runtime, "cpu_bf16_supported", lambda: True)
    assert main(["score", str(scan), "--checkpoint", str(ckpt), "-o", str(out), "--weighting", "t2", "--threshold",
                 "0.2", "--skull-stripped", "--overwrite", "--amp", "bf16"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["threshold"] == 0.2 and summary["amp"] == "bf16" and summary["threshold_amp"] is None
    assert main(["score", str(scan), "--checkpoint", str(ckpt), "-o", str(runs / "o2"), "--weighting", "t2",
                 "--t-test", "0", "--threshold", "0.1"]) == 2
    assert "noise levels must lie in 1..1000" in capsys.readouterr().err


def test_thresholds_of_other_weights_are_refused(runs, scan):
    from cddpm_lib.fingerprint import module_fingerprint

    ckpt, model = _ddpm_checkpoint(runs)
    results = paths.results_dir("smoke")
    results.mkdir(parents=True)

    def stage_recorded(weights):
        pd.DataFrame([{"model_id": "ddpm_t2", "fold": 0, "variant": "t500", "purpose": "table3", "dataset": "BraTS21",
                       "threshold": 0.3, "threshold_method": "bisection", "weights": weights}]).to_csv(
            results / "segmentation_runs.csv", index=False)

    stage_recorded("0" * 40)  # the stage evaluated other weights (a retrained model, or last.pt)
    with pytest.raises(ScoringError, match="chosen for other weights of 'ddpm_t2' fold 0 .*--threshold"):
        score_scan(scan, ckpt, runs / "o", weighting="t2", skull_stripped=True)
    stage_recorded(module_fingerprint(model))
    out = score_scan(scan, ckpt, runs / "o", weighting="t2", skull_stripped=True)
    assert json.loads(out["summary"].read_text())["threshold"] == 0.3
    with pytest.raises(ScoringError, match=r"variant 'ens' \(it has \['t500'\]\); pass --threshold or --t-test 500$"):
        score_scan(scan, ckpt, runs / "o2", weighting="t2", skull_stripped=True, t_test=[250, 500, 750])


def test_t2_scored_through_its_sessions_t1_as_the_training_data(runs, scan, tmp_path):
    """With --t1 the T2 is aligned to its session's T1 and placed through the T1's registration; the maps come back
    onto the T2's own grid through both transforms."""
    import SimpleITK as sitk
    from scipy import ndimage

    from cddpm_lib import preprocessing as pp

    t = datasets.load_mni152_template(resolution=2)
    brain = datasets.load_mni152_brain_mask(resolution=2).get_fdata() > 0
    t1_path = tmp_path / "sub-01_T1w.nii.gz"
    nib.save(nib.Nifti1Image(np.where(brain, t.get_fdata(), 0).astype(np.float32) * 5, t.affine), t1_path)
    t2 = nib.load(scan).get_fdata().astype(np.float32)
    turned = ndimage.rotate(t2, 6.0, axes=(0, 1), reshape=False, order=1)  # head motion between the sequences
    t2_path = tmp_path / "sub-01_T2w_moved.nii.gz"
    nib.save(nib.Nifti1Image(turned, t.affine), t2_path)
    ckpt = _checkpoint(runs)
    out = score_scan(t2_path, ckpt, runs / "o", weighting="t2", threshold=0.05, skull_stripped=True, t1=t1_path)
    summary = json.loads(out["summary"].read_text())
    assert summary["registration"].startswith("through the session's T1") and summary["t1"] == str(t1_path)
    assert summary["preprocessing_qc"]["t2_align_deg"] == pytest.approx(6.0, abs=1.0)
    sub = out["preprocessed_image"].parent
    assert (sub / "transform_t2.tfm").exists() and (sub / "t1.nii.gz").exists()
    mask = nib.load(sub / "brain_mask.nii.gz")
    back = pp.to_native(mask.get_fdata(), mask.affine, pp._load_sitk(str(t2_path)),
                        sitk.ReadTransform(str(sub / "transform_t2.tfm")), label=True) > 0.5
    zs = np.flatnonzero(back.any(axis=(0, 1)))
    sel = slice(zs.min() + 3, zs.max() - 3)
    assert pp.dice(back[:, :, sel], (turned > 0)[:, :, sel]) > 0.85  # lands on the moved T2's brain
    alone = score_scan(t2_path, ckpt, runs / "o2", weighting="t2", threshold=0.05, skull_stripped=True)
    assert "pass --t1" in json.loads(alone["summary"].read_text())["registration"]
    with pytest.raises(ScoringError, match="--t1 is the T1 scan of the session of a T2 scan"):
        score_scan(t1_path, _checkpoint(runs, weighting="t1"), runs / "o3", weighting="t1", threshold=0.1, t1=t1_path)

