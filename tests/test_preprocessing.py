"""preprocessing (paper §4.2): tiny skull-bearing heads from nilearn's MNI152 template with a known pose."""
from __future__ import annotations

import dataclasses
import os

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import SimpleITK as sitk
from nilearn import datasets
from scipy import ndimage
from scipy.spatial.transform import Rotation
from skimage.measure import block_reduce

from cddpm_lib import preprocessing as pp
from cddpm_lib.config import ConfigError, profile_params
from cddpm_lib.preprocessing import PreprocessConfig, PreprocessingError

#: small, fast settings: the smoke profile's 6 mm grid, downsampled x2 to 16 x 16 x 10, template skull stripping
FAST = dict(spacing_mm=6.0, pad_shape=(32, 32, 28), downsample=2, drop_slices=(2, 2), registration_shrink=(2, 1),
            registration_sampling=0.5, skull_strip="template", n4_shrink=2, n4_iterations=(20, 20), n_jobs=1)


@pytest.fixture(scope="module")
def head():
    """MNI152 brain (2 mm) wrapped in CSF, bone and scalp shells: ``(image, brain mask, affine)``."""
    t = datasets.load_mni152_template(resolution=2)
    brain = datasets.load_mni152_brain_mask(resolution=2).get_fdata() > 0
    img, pad = np.pad(t.get_fdata().astype(np.float32), 7), 7
    brain = np.pad(brain, pad)
    affine = t.affine.copy()
    affine[:3, 3] -= 2 * pad
    dist = ndimage.distance_transform_edt(~brain, sampling=2.0)
    for lo, hi, value in ((0, 2, 0.15), (2, 7, 0.05), (7, 11, 0.8)):
        img[(dist > lo) & (dist <= hi)] = value
    return img, brain, affine


def pose(seed: int, deg: float = 10.0, mm: float = 10.0, scale: float = 0.05) -> np.ndarray:
    """Random world transform template -> subject (RAS, 4x4)."""
    rng = np.random.default_rng(seed)
    a = np.eye(4)
    a[:3, :3] = Rotation.from_euler("xyz", rng.uniform(-deg, deg, 3), degrees=True).as_matrix() @ np.diag(
        1 + rng.uniform(-scale, scale, 3))
    a[:3, 3] = rng.uniform(-mm, mm, 3)
    return a


def write_raw(head, root, name: str, seed: int, *, lesion: bool = False, spacing=(2.0, 2.0, 3.0)) -> dict:
    """One raw subject: posed head on an anisotropic grid, multiplicative bias field, t1/t2/brain_mask[/seg]."""
    img, brain, affine = head
    world = pose(seed)
    raw_aff = np.diag([*spacing, 1.0])
    raw_aff[:3, 3] = affine[:3, 3]
    shape = tuple(int(np.ceil(n * 2.0 / s)) for n, s in zip(img.shape, spacing))
    m = np.linalg.inv(affine) @ np.linalg.inv(world) @ raw_aff  # raw voxel -> template voxel

    def sample(vol, order):
        return ndimage.affine_transform(vol.astype(np.float32), m[:3, :3], m[:3, 3], output_shape=shape, order=order)

    seg = np.zeros(img.shape, np.float32)
    if lesion:
        c = np.array([55, 70, 60])
        r = np.linalg.norm(np.indices(img.shape) - c[:, None, None, None], axis=0)
        seg[r < 6] = 2
        seg[r < 3] = 1  # two labels: the output must fuse them
    t1 = np.where(seg > 0, 1.0, img)
    grid = np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij")
    bias = np.exp(0.3 * (grid[0] + 0.5 * grid[2] - 0.5 * grid[1] ** 2))
    vols = {"t1": sample(t1, 1) * bias * 1000, "t2": sample(np.where(brain, 1 - 0.7 * t1, 0.5 * t1), 1) * bias * 800,
            "brain_mask": sample(brain, 0) > 0.5}
    if lesion:
        vols["seg"] = np.rint(sample(seg, 0))
    out = root / name
    out.mkdir(parents=True, exist_ok=True)
    row = {"dataset": "MSLUB" if lesion else "IXI", "subject_id": name, "split": "test", "fold": -1, "t1": "",
           "t2": "", "brain_mask": "", "seg": "", "site": "A", "skull_stripped": 0, "healthy": int(not lesion)}
    for key, vol in vols.items():
        dtype = np.float32 if key in ("t1", "t2") else np.uint8
        nib.save(nib.Nifti1Image(vol.astype(dtype), raw_aff), out / f"{key}.nii.gz")
        row[key] = str(out / f"{key}.nii.gz")
    return {**row, "_pose": world}


def raw_manifest(rows: list[dict]) -> pd.DataFrame:
    return pd.DataFrame([{k: v for k, v in r.items() if not k.startswith("_")} for r in rows])


@pytest.fixture(scope="module")
def cohort(head, tmp_path_factory):
    root = tmp_path_factory.mktemp("raw")
    return [write_raw(head, root, f"sub{i}", seed=i, lesion=i == 1) for i in range(3)]


@pytest.fixture(scope="module")
def run(cohort, tmp_path_factory):
    out = tmp_path_factory.mktemp("pre") / "preprocessed"
    cfg = PreprocessConfig(**FAST)
    manifest, qc = pp.preprocess_manifest(cfg, raw_manifest(cohort), out, progress=False)
    return cfg, out, manifest, qc


# ---------------------------------------------------------------------------------------------- geometry


def test_sitk_conversion_keeps_world_coordinates():
    rng = np.random.default_rng(0)
    arr = rng.random((5, 6, 7)).astype(np.float32)
    affine = np.eye(4)
    affine[:3, :3] = Rotation.from_euler("xyz", [10, -20, 5], degrees=True).as_matrix() @ np.diag([1.0, 2.0, 3.0])
    affine[:3, 3] = [4.0, -5.0, 6.0]
    img = pp.to_sitk(arr, affine)
    ijk = (2, 3, 4)
    lps = np.asarray(img.TransformIndexToPhysicalPoint(ijk))
    np.testing.assert_allclose(lps * [-1, -1, 1], (affine @ [*ijk, 1])[:3], atol=1e-6)
    back, back_aff = pp.from_sitk(img)
    np.testing.assert_array_equal(back, arr)
    np.testing.assert_allclose(back_aff, affine, atol=1e-6)


def test_resample_isotropic_spacing_labels_and_linear_ramp():
    x = np.arange(20, dtype=np.float32)[:, None, None] * np.ones((20, 20, 10), np.float32)
    aff = np.diag([1.0, 1.0, 2.0, 1.0])
    iso = pp.resample_isotropic(pp.to_sitk(x, aff), 1.0)
    assert iso.GetSpacing() == (1.0, 1.0, 1.0) and iso.GetSize() == (20, 20, 20)
    arr = pp.from_sitk(iso)[0]
    np.testing.assert_allclose(arr[3:-3, 10, 10], x[3:-3, 0, 0], atol=1e-3)  # B-spline reproduces linear ramps
    lab = pp.resample_isotropic(pp.to_sitk((x > 9).astype(np.uint8), aff), 1.0, label=True)
    assert set(np.unique(sitk.GetArrayFromImage(lab))) == {0, 1}


def test_warp_to_a_coarser_grid_removes_detail_it_cannot_hold():
    """Stripes of period 5 mm (2 mm voxels hold them) cannot be held by a 3 mm grid (Nyquist period 6 mm): without
    anti-aliasing they come back at full strength as a false 15 mm pattern; with it, at half of that or less around
    the right mean. Smooth content is kept."""
    i = np.arange(60, dtype=np.float32)
    stripes = (1 + np.cos(2 * np.pi * (2.0 * i) / 5.0))[:, None, None] * np.ones((60, 60, 60), np.float32)
    ramp = (i / 60)[:, None, None] * np.ones((60, 60, 60), np.float32)
    grid = pp.to_sitk(np.zeros((40, 40, 40), np.float32), np.diag([3.0, 3.0, 3.0, 1.0]))
    out = {aa: pp.warp(pp.to_sitk(stripes, np.diag([2.0, 2.0, 2.0, 1.0])), grid, sitk.Transform(),
                       anti_alias_input=aa)[5:-5, 20, 20] for aa in (False, True)}
    assert out[False].std() > 0.55 and out[True].std() < 0.5 * out[False].std()
    np.testing.assert_allclose(out[True].mean(), 1.0, atol=0.05)
    smooth = pp.warp(pp.to_sitk(ramp, np.diag([2.0, 2.0, 2.0, 1.0])), grid, sitk.Transform())[5:-5, 20, 20]
    np.testing.assert_allclose(smooth, (np.arange(40)[5:-5] * 1.5 / 60), atol=2e-3)
    assert pp.anti_alias(pp.to_sitk(stripes, np.diag([3.0, 3.0, 3.0, 1.0])), 3.0).GetPixelID() == sitk.sitkFloat32
    np.testing.assert_array_equal(  # nothing to do on a grid as coarse as the target
        pp.from_sitk(pp.anti_alias(pp.to_sitk(stripes, np.diag([3.0, 3.0, 3.0, 1.0])), 3.0))[0], stripes)


@pytest.fixture(scope="module")
def registered(cohort):
    """Subject 0 registered on the quick profile's 3 mm template grid."""
    fixed, template_mask, regmask = pp.template_grid("mni152", "", 3.0, 6.0)
    moving = pp.resample_isotropic(pp._load_sitk(cohort[0]["t1"]), 3.0)
    tx, metric = pp.register_affine(fixed, moving, regmask, shrink=(2, 1), sampling=0.1)
    return fixed, template_mask, tx, metric


def test_registration_recovers_known_affine(head, cohort, registered):
    fixed, _, tx, metric = registered
    _, brain, affine = head
    pts = (affine @ np.c_[np.argwhere(brain)[::97], np.ones(len(np.argwhere(brain)[::97]))].T).T[:, :3]
    lps = np.array([-1.0, -1.0, 1.0])  # RAS <-> LPS
    got = np.array([np.asarray(tx.TransformPoint((p * lps).tolist())) * lps for p in pts])
    world = cohort[0]["_pose"]
    err = np.linalg.norm(got - (pts @ world[:3, :3].T + world[:3, 3]), axis=1)
    assert np.isfinite(metric) and err.mean() < 1.5 and err.max() < 3.0, (err.mean(), err.max())


def test_pad_or_crop_keeps_world_positions():
    rng = np.random.default_rng(1)
    vol = rng.random((7, 10, 5)).astype(np.float32)
    aff = np.diag([2.0, 2.0, 2.0, 1.0])
    aff[:3, 3] = [-3, 4, 5]
    out, offset = pp.pad_or_crop(vol, (9, 6, 5))
    new_aff = pp.shift_affine(aff, offset)
    src, dst = (1, 5, 2), np.array([1, 5, 2]) - offset
    assert out[tuple(dst)] == vol[src]
    np.testing.assert_allclose(new_aff @ [*dst, 1], aff @ [*src, 1])


def test_downsample_matches_block_reduce_and_centres_blocks():
    rng = np.random.default_rng(2)
    vol = rng.random((8, 6, 4)).astype(np.float32)
    np.testing.assert_allclose(pp.downsample_mean(vol, 2), block_reduce(vol, (2, 2, 2), np.mean), rtol=1e-6)
    aff = np.diag([1.0, 1.0, 1.0, 1.0])
    np.testing.assert_allclose(pp.downsample_affine(aff, 2) @ [0, 0, 0, 1], [0.5, 0.5, 0.5, 1])


def test_rescale_percentiles_maps_to_unit_range():
    rng = np.random.default_rng(3)
    img = rng.normal(100, 20, (10, 10, 10)).astype(np.float32)
    mask = np.zeros(img.shape, bool)
    mask[2:8, 2:8, 2:8] = True
    out, lo, hi = pp.rescale_percentiles(img, mask, (1, 99))
    np.testing.assert_allclose([lo, hi], np.percentile(img[mask], [1, 99]))
    assert out.min() == 0 and out.max() == 1 and not out[~mask].any()
    assert np.isclose(np.mean(out[mask] == 1), 0.01, atol=0.01)


def test_n4_reduces_coefficient_of_variation():
    shape = (40, 40, 40)
    grid = np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij")
    wm = (grid[0] ** 2 + grid[1] ** 2 + grid[2] ** 2) < 0.8
    img = (np.where(wm, 100.0, 0.0) * np.exp(0.4 * grid[0] - 0.3 * grid[2] ** 2)).astype(np.float32)
    out, log_bias = pp.n4_bias_correct(img, wm, 3.0, shrink=2, iterations=(50, 50, 50))

    def cv(v):
        return v[wm].std() / v[wm].mean()

    assert cv(img) > 0.15 and cv(out) < 0.3 * cv(img), (cv(img), cv(out))
    assert log_bias.shape == shape


def test_config_profiles_give_the_documented_shapes():
    assert PreprocessConfig().output_shape == (96, 96, 50)
    for profile, shape in (("smoke", (32, 32, 16)), ("quick", (64, 64, 32)), ("paper", (96, 96, 50))):
        assert PreprocessConfig.from_params(profile_params("preprocessing", profile)).output_shape == shape
    with pytest.raises(ConfigError, match="divisible"):
        PreprocessConfig(pad_shape=(191, 192, 160))
    with pytest.raises(ConfigError, match="drop_slices"):
        PreprocessConfig(drop_slices=(40, 40))


# ----------------------------------------------------------------------------------------------- pipeline


def test_outputs_shapes_affines_ranges_and_binary_labels(run, cohort):
    cfg, out, manifest, qc = run
    assert (qc["status"] == "ok").all() and len(manifest) == len(cohort)
    for r in manifest.itertuples():
        files = {k: getattr(r, k) for k in ("t1", "t2", "brain_mask", "seg") if getattr(r, k)}
        imgs = {k: nib.load(v) for k, v in files.items()}
        mask = np.asarray(imgs["brain_mask"].dataobj)
        for k, im in imgs.items():
            assert im.shape == cfg.output_shape
            np.testing.assert_allclose(im.affine, imgs["brain_mask"].affine)
            np.testing.assert_allclose(np.abs(np.diag(im.affine)[:3]), cfg.spacing_mm * cfg.downsample)
        for w in ("t1", "t2"):
            arr = np.asarray(imgs[w].dataobj)
            assert arr.min() == 0 and arr.max() == 1 and not arr[mask == 0].any()
        assert mask.dtype == np.uint8 and set(np.unique(mask)) == {0, 1}
        if "seg" in imgs:
            seg = np.asarray(imgs["seg"].dataobj)
            assert seg.dtype == np.uint8 and set(np.unique(seg)) == {0, 1}
            outside = qc.set_index("subject_id").loc[r.subject_id, "seg_outside_brain_pct"]
            assert outside == pytest.approx(100 * (seg.astype(bool) & (mask == 0)).sum() / seg.sum())
    summary = pp.qc_summary(qc)
    assert summary.loc["MSLUB", "lesion_outside_brain_pct"] == pytest.approx(qc["seg_outside_brain_pct"].max())
    assert np.isnan(summary.loc["IXI", "lesion_outside_brain_pct"])  # healthy: no lesion to count


def test_template_skull_strip_matches_reference_mask(cohort, registered, run):
    fixed, template_mask, tx, _ = registered
    reference = pp.warp(pp._load_sitk(cohort[0]["brain_mask"], label=True), fixed, tx, label=True) > 0
    assert pp.dice(pp.from_sitk(template_mask)[0] > 0, reference) >= 0.95  # 3 mm grid
    qc = run[3]
    assert (qc["skull_strip"] == "template").all() and (qc["dice_vs_reference"] >= 0.85).all()  # 6 mm grid


def test_manifest_keeps_rows_and_writes_relative_paths(run, cohort):
    cfg, out, manifest, qc = run
    written = pd.read_csv(out.parent / "preprocessed_manifest.csv", dtype=str, keep_default_na=False)
    assert list(written["subject_id"]) == [r["subject_id"] for r in cohort]
    assert all(p and not os.path.isabs(p) for p in written["t1"])
    assert (out.parent / "preprocessing_qc.csv").exists()
    for col in ("registration_metric", "brain_ml", "t1_p1", "t2_p99", "time_register", "time_n4", "failure_step"):
        assert col in qc


def test_interrupted_run_resumes_without_touching_done_subjects(run, cohort):
    cfg, out, manifest, _ = run
    done = {p: p.stat().st_mtime_ns for p in (out / "IXI" / "sub0").iterdir()}
    (out / "IXI" / "sub2" / "qc.json").unlink()  # sub2 was interrupted before its marker was written
    manifest2, qc2 = pp.preprocess_manifest(cfg, raw_manifest(cohort), out, progress=False)
    assert {p: p.stat().st_mtime_ns for p in (out / "IXI" / "sub0").iterdir()} == done
    reused = dict(zip(qc2["subject_id"], qc2["reused"]))
    assert reused == {"sub0": True, "sub1": True, "sub2": False}
    assert (out / "IXI" / "sub2" / "qc.json").exists() and len(manifest2) == len(manifest)


def test_corrupt_input_is_reported_and_skipped(run, cohort, tmp_path):
    cfg, out, _, _ = run
    bad = dict(cohort[0], subject_id="broken", t1=str(tmp_path / "t1.nii.gz"))
    (tmp_path / "t1.nii.gz").write_bytes(b"not a nifti")
    manifest, qc = pp.preprocess_manifest(cfg, raw_manifest([*cohort, bad]), out, progress=False)
    row = qc.set_index("subject_id").loc["broken"]
    assert row["status"] == "failed" and row["failure_step"] == "load" and "t1.nii.gz" in row["failure_reason"]
    assert "broken" not in set(manifest["subject_id"]) and (qc["status"] == "ok").sum() == len(cohort)
    with pytest.raises(PreprocessingError, match="broken at load"):
        pp.check_failures(qc)
    pp.check_failures(qc, allow_failures=True)
    alone, qc_alone = pp.preprocess_manifest(cfg, raw_manifest([bad]), tmp_path / "pre", progress=False)
    assert alone.empty and list(qc_alone["status"]) == ["failed"]


def test_empty_mask_and_divergence_fail_at_their_step(cohort, tmp_path):
    blank = tmp_path / "blank.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((20, 20, 20), np.float32), np.diag([3.0, 3.0, 3.0, 1.0])), blank)
    empty = pp.preprocess_subject({**cohort[0], "t1": str(blank), "t2": "", "skull_stripped": 1},
                                  PreprocessConfig(**FAST), tmp_path)
    assert empty["failure_step"] == "skull_strip" and "too small" in empty["failure_reason"]
    strict = pp.preprocess_subject(cohort[0], PreprocessConfig(**{**FAST, "max_scale": 1.0001}), tmp_path)
    assert strict["failure_step"] == "register" and "diverged" in strict["failure_reason"]
    assert not (tmp_path / "IXI").exists()


def test_already_skull_stripped_input_uses_image_mask(head, tmp_path):
    row = write_raw(head, tmp_path, "stripped", seed=5)
    for w in ("t1", "t2"):
        img = nib.load(row[w])
        brain = np.asarray(nib.load(row["brain_mask"]).dataobj) > 0
        nib.save(nib.Nifti1Image(np.asarray(img.dataobj) * brain, img.affine), row[w])
    qc = pp.preprocess_subject({**row, "skull_stripped": 1}, PreprocessConfig(**FAST), tmp_path / "out")
    assert qc["status"] == "ok" and qc["skull_strip"] == "image>0" and qc["dice_vs_reference"] > 0.9


def test_hdbet_missing_gives_a_fix_it_error(monkeypatch):
    monkeypatch.setattr(pp.shutil, "which", lambda name: None)
    with pytest.raises(PreprocessingError, match="hd-bet command is not installed"):
        pp.hdbet_mask(np.zeros((4, 4, 4), np.float32), np.eye(4))


@pytest.mark.slow
def test_deepbet_mask_dice_on_a_3mm_head(cohort, registered):
    fixed, _, tx, _ = registered
    image = pp.warp(pp._load_sitk(cohort[0]["t1"]), fixed, tx)
    reference = pp.warp(pp._load_sitk(cohort[0]["brain_mask"], label=True), fixed, tx, label=True) > 0
    assert pp.dice(pp.deepbet_mask(image, shape=192), reference) >= 0.95


@pytest.mark.slow
def test_parallel_run_matches_serial(cohort, run, tmp_path):
    cfg, out, manifest, _ = run
    par = dataclasses.replace(cfg, n_jobs=2)
    manifest2, qc2 = pp.preprocess_manifest(par, raw_manifest(cohort[:2]), tmp_path / "pre", progress=False)
    assert (qc2["status"] == "ok").all()
    for a, b in zip(manifest2["t2"], manifest["t2"][:2]):  # other thread counts, same registration
        np.testing.assert_allclose(nib.load(a).get_fdata(), nib.load(b).get_fdata(), atol=1e-3)


def test_other_weighting_is_aligned_to_the_registration_scan(head, tmp_path):
    row = write_raw(head, tmp_path, "moved", seed=7)
    cfg = PreprocessConfig(**FAST)
    still = pp.preprocess_subject(row, cfg, tmp_path / "still")
    assert still["status"] == "ok", still.get("failure_reason")
    assert still["t2_align_deg"] < 1.5  # same pose: (nearly) nothing to align
    # head motion between the sequences: the T2 turned 8 degrees and shifted by (6, -4, 3) mm in world space
    img = nib.load(row["t2"])
    motion = np.eye(4)
    motion[:3, :3] = Rotation.from_euler("z", 8, degrees=True).as_matrix()
    motion[:3, 3] = [6.0, -4.0, 3.0]
    nib.save(nib.Nifti1Image(np.asarray(img.dataobj), motion @ img.affine), tmp_path / "t2_moved.nii.gz")
    moved = {**row, "t2": str(tmp_path / "t2_moved.nii.gz")}
    on = pp.preprocess_subject(moved, cfg, tmp_path / "on")
    off = pp.preprocess_subject(moved, dataclasses.replace(cfg, align_weightings=False), tmp_path / "off")
    assert on["status"] == off["status"] == "ok" and on["t2_align_deg"] == pytest.approx(8.0, abs=1.5)
    assert "t2_align_deg" not in off

    def t2(out):
        d = out / "IXI" / "moved"
        return nib.load(d / "t2.nii.gz").get_fdata(), nib.load(d / "brain_mask.nii.gz").get_fdata() > 0

    reference, mask = t2(tmp_path / "still")
    error = {k: np.abs(t2(tmp_path / k)[0] - reference)[mask].mean() for k in ("on", "off")}
    assert error["on"] < 0.1 * error["off"], error  # measured: 0.005 against 0.14


def test_rigid_motion_reads_angle_and_shift():
    t = sitk.VersorRigid3DTransform()
    t.SetRotation((0.0, 0.0, 1.0), np.radians(8.0))
    t.SetTranslation((3.0, 4.0, 0.0))
    assert pp.rigid_motion(t) == pytest.approx((8.0, 5.0))


def test_skull_stripped_mask_from_positive_or_standardised_intensities(head):
    img, brain, _ = head
    stripped = np.where(brain, img, 0).astype(np.float32)
    mask = pp.mask_from_image(stripped)
    assert pp.dice(mask, brain) > 0.95
    inside = stripped[brain]
    z = np.where(brain, (stripped - inside.mean()) / inside.std(), 0).astype(np.float32)  # z-scored: both signs
    assert (z[brain] < 0).mean() > 0.2
    np.testing.assert_array_equal(pp.mask_from_image(z), pp.largest_component(z != 0))
    assert pp.dice(pp.mask_from_image(z), brain) > 0.99
