"""The synthetic cohort (head model + cohort design): exact masks, tissue contrast, sites, determinism, grids,
cohort files and manifest. Subjects are rendered at 6–8 mm so every test takes well under a second."""
from __future__ import annotations

import dataclasses
import json

import nibabel as nib
import numpy as np
import pytest

from cddpm_lib import headmodel, lesions, manifests, synthetic
from cddpm_lib.config import ConfigError

VOXEL = 6.0


@pytest.fixture(scope="module", autouse=True)
def data_root(tmp_path_factory):
    mp = pytest.MonkeyPatch()
    mp.setenv("CDDPM_DATA_ROOT", str(tmp_path_factory.mktemp("data")))
    try:
        yield
    finally:
        mp.undo()


def _spec(dataset="IXI", site="Guys", index=0, seed=0, voxel=VOXEL, **kw) -> headmodel.SubjectSpec:
    cfg = synthetic.SyntheticConfig(seed=seed, voxel_mm=voxel, **kw)
    return synthetic.subject_spec(cfg, dataset, index, site)


def _tissue_masks(spec, gm=0.9, wm=0.9, csf=0.9):
    """Voxels mostly of one tissue (from the head model's own tissue fractions) and air (no tissue)."""
    atlas = headmodel.load_atlas(headmodel.atlas_factor(VOXEL))
    _, u, dist = headmodel.template_coords(spec, atlas)
    w, _ = headmodel.tissue_weights(spec, atlas, u, dist)
    masks = {t: (w[t] > thr).reshape(spec.shape) for t, thr in (("csf", csf), ("gm", gm), ("wm", wm))}
    return masks, (sum(w.values()) < 0.01).reshape(spec.shape)


@pytest.mark.parametrize("dataset,site", [("BraTS21", "BraTS-B"), ("MSLUB", "Ljubljana"), ("ATLAS", "R002"),
                                          ("WMH", "Singapore")])
def test_mask_is_exactly_where_the_intensity_changed(dataset, site):
    spec = _spec(dataset, site, index=1)
    sick, twin = headmodel.render_subject(spec), headmodel.render_subject(spec, with_lesion=False)
    assert sick["seg"].any()
    for w in spec.weightings:
        np.testing.assert_array_equal(sick[w] != twin[w], sick["seg"].astype(bool), err_msg=f"{dataset} {w}")


@pytest.mark.parametrize("dataset,site", [("BraTS21", "BraTS-A"), ("MSLUB", "Ljubljana"), ("ATLAS", "R001"),
                                          ("WMH", "GE3T")])
def test_lesions_stay_inside_the_brain(dataset, site):
    for index in range(3):
        out = headmodel.render_subject(_spec(dataset, site, index=index))
        assert out["seg"].any() and not (out["seg"] & (1 - out["brain_mask"])).any()


def test_healthy_subjects_have_no_lesion():
    out = headmodel.render_subject(_spec("IXI", "HH"))
    assert out["lesion"] is None and not out["seg"].any()


@pytest.mark.parametrize("site", ["Guys", "HH", "IOP"])
def test_tissue_ordering_per_weighting(site):
    spec = _spec("IXI", site, index=4)
    out = headmodel.render_subject(spec)
    masks, _ = _tissue_masks(spec)
    med = {w: {t: np.median(out[w][m]) for t, m in masks.items()} for w in ("t1", "t2")}
    assert med["t1"]["wm"] > med["t1"]["gm"] > med["t1"]["csf"], med["t1"]
    assert med["t2"]["csf"] > med["t2"]["gm"] > med["t2"]["wm"], med["t2"]


def _site_stats(site: str, n: int = 3) -> dict[str, list[float]]:
    """Per subject: T1 GM/WM ratio (bias field divided out), background noise relative to WM (Rician floor in
    air) and the spread of the log bias field over the head."""
    stats = {"contrast": [], "noise": [], "bias": []}
    for i in range(n):
        spec = _spec("IXI", site, index=i)
        out = headmodel.render_subject(spec)
        masks, air = _tissue_masks(spec, gm=0.6, wm=0.8)
        bias = headmodel.bias_field(spec).reshape(spec.shape)
        flat = out["t1"] / bias
        wm = np.median(flat[masks["wm"]])
        stats["contrast"].append(np.median(flat[masks["gm"]]) / wm)
        stats["noise"].append(out["t1"][air].mean() / np.median(out["t1"][masks["wm"]]))
        stats["bias"].append(np.log(bias[~air]).std())
    return stats


def test_sites_differ_measurably_in_contrast_noise_and_bias():
    guys, hh, iop = (_site_stats(s) for s in ("Guys", "HH", "IOP"))
    c = "contrast"
    assert max(hh[c]) < min(guys[c]) and max(guys[c]) < min(iop[c])  # HH: more GM/WM contrast, IoP: less
    assert max(hh["noise"]) < min(guys["noise"]) and max(guys["noise"]) < min(iop["noise"])
    assert np.mean(hh["bias"]) > np.mean(guys["bias"])  # 3 T: stronger inhomogeneity


def test_unhealthy_sites_shift_the_t2_contrast():
    ratios = []
    for dataset, site in (("IXI", "Guys"), ("BraTS21", "BraTS-A")):
        spec = _spec(dataset, site)
        out = headmodel.render_subject(spec)
        masks, _ = _tissue_masks(spec, gm=0.6, csf=0.7)
        flat = out["t2"] / headmodel.bias_field(spec).reshape(spec.shape)
        healthy = out["seg"] == 0
        ratios.append(np.median(flat[masks["csf"] & healthy]) / np.median(flat[masks["gm"] & healthy]))
    assert ratios[1] < 0.9 * ratios[0]  # BraTS-like T2: darker CSF relative to GM (domain shift)


def test_deterministic_per_seed():
    a, b = headmodel.render_subject(_spec("MSLUB", "Ljubljana")), headmodel.render_subject(_spec("MSLUB", "Ljubljana"))
    c = headmodel.render_subject(_spec("MSLUB", "Ljubljana", seed=1))
    for k in ("t1", "t2", "seg", "brain_mask"):
        np.testing.assert_array_equal(a[k], b[k])
    assert not np.array_equal(a["t2"], c["t2"])


def test_raw_grid_shape_affine_and_orientation():
    fov = (200.0, 232.0, 208.0)
    shape, aff = headmodel.raw_grid(VOXEL, fov, synthetic.SITES["Guys"], True)
    assert shape == tuple(int(np.ceil(f / VOXEL)) for f in fov)
    np.testing.assert_allclose(np.diag(aff)[:3], [VOXEL] * 3)
    np.testing.assert_allclose(aff[:3, :3] @ ((np.array(shape) - 1) / 2) + aff[:3, 3], 0, atol=1e-9)
    _, aff = headmodel.raw_grid(VOXEL, fov, synthetic.SITES["IOP"], True)
    assert aff[0, 0] == -VOXEL  # LAS voxel axes
    shape, aff = headmodel.raw_grid(VOXEL, fov, synthetic.SITES["Utrecht"], True)
    assert aff[2, 2] == pytest.approx(1.5 * VOXEL) and shape[2] == int(np.ceil(fov[2] / (1.5 * VOXEL)))
    assert headmodel.raw_grid(VOXEL, fov, synthetic.SITES["Utrecht"], False)[1][2, 2] == VOXEL


def test_raw_heads_have_skull_and_pose_brats_is_skull_stripped():
    ixi = headmodel.render_subject(_spec("IXI", "Guys"))
    outside = ixi["brain_mask"] == 0
    assert np.percentile(ixi["t1"][outside], 90) > 0.3 * np.median(ixi["t1"][ixi["brain_mask"] == 1])  # scalp fat
    brats = headmodel.render_subject(_spec("BraTS21", "BraTS-A"))
    assert (brats["t2"][brats["brain_mask"] == 0] == 0).all() and brats["t2"][brats["brain_mask"] == 1].min() >= 0
    rotations = [np.linalg.norm(_spec("IXI", "Guys", index=i).pose[:3, :3] - np.eye(3)) for i in range(4)]
    assert max(rotations) > 0.05  # the head is posed in the field of view


def test_atlas_maps_are_consistent():
    atlas = headmodel.load_atlas(4)
    inside = atlas.brain > 0.5
    assert (atlas.hull_dist[inside] < 2.0).all()  # the intracranial hull holds the brain
    assert abs(float(atlas.texture[inside].mean())) < 0.02 and atlas.texture[~inside].max() == 0
    assert 1400 < inside.sum() * 64 / 1000 < 2300  # brain volume in ml
    assert np.linalg.norm(atlas.vent_center - atlas.brain_center) < 15.0


def test_config_rejects_inconsistent_sizes():
    with pytest.raises(ConfigError, match="n_val_per_fold"):
        synthetic.SyntheticConfig(n_ixi_pool=8, n_val_per_fold=2, n_folds=5)
    with pytest.raises(ConfigError, match="unknown data set 'BraTS'"):
        synthetic.SyntheticConfig(unhealthy_sizes={"BraTS": [1, 1]})
    with pytest.raises(ConfigError, match="unhealthy_sizes"):
        synthetic.SyntheticConfig(unhealthy_sizes={"WMH": [1]})


def test_plan_names_and_sites():
    cfg = synthetic.SyntheticConfig(n_ixi_pool=6, n_val_per_fold=1, n_ixi_test=2,
                                    unhealthy_sizes={"ATLAS": [1, 2], "WMH": [1, 1]})
    plan = synthetic.plan_cohort(cfg)
    assert list(plan["subject_id"][:3]) == ["IXI001-Guys", "IXI002-HH", "IXI003-IOP"]
    assert (plan["split"] == "pool").sum() == 6 and set(plan.loc[plan.dataset == "ATLAS", "subject_id"]) == {
        "sub-r001s001", "sub-r002s002", "sub-r001s003"}
    assert set(plan.loc[plan.dataset == "WMH", "site"]) == {"Utrecht", "Singapore"}


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    cfg = synthetic.SyntheticConfig(voxel_mm=8.0, n_ixi_pool=5, n_val_per_fold=1, n_ixi_test=1, n_jobs=1,
                                    unhealthy_sizes={"BraTS21": [1, 1], "WMH": [1, 0]})
    out = tmp_path_factory.mktemp("cohort")
    return cfg, out, synthetic.generate_cohort(cfg, out, progress=False)


def test_cohort_manifest_follows_the_fold_rules(cohort):
    cfg, out, df = cohort
    ixi = df[df.dataset == "IXI"]
    pool = ixi[ixi.split != "test"]
    assert pool.groupby("subject_id").size().eq(cfg.n_folds).all()  # one row per fold
    for k in range(cfg.n_folds):
        val = pool[(pool.fold == k) & (pool.split == "val")]
        assert list(val.subject_id) == [synthetic.subject_name("IXI", k, synthetic.DATASET_SITES["IXI"][k % 3])]
    assert (df.loc[df.split == "test", "fold"] == -1).all() and len(df[df.dataset == "BraTS21"]) == 2
    assert (df.loc[df.dataset == "BraTS21", "skull_stripped"] == 1).all() and (ixi.healthy == 1).all()
    assert manifests.validate_manifest(df) == []
    text = (out / "raw_manifest.csv").read_text()
    assert str(out) not in text and "raw/IXI/IXI001-Guys/t1.nii.gz" in text  # relative paths


def test_cohort_files_have_the_render_grid_and_types(cohort):
    cfg, out, df = cohort
    row = df[df.dataset == "BraTS21"].iloc[0]
    spec = synthetic.subject_spec(cfg, "BraTS21", 0, row.site)
    t2, seg = nib.load(row.t2), nib.load(row.seg)
    assert t2.get_data_dtype() == np.int16 and seg.get_data_dtype() == np.uint8
    assert t2.shape == spec.shape and seg.shape == spec.shape
    np.testing.assert_allclose(t2.affine, spec.affine)
    np.testing.assert_array_equal(np.asarray(t2.dataobj), headmodel.render_subject(spec)["t2"])
    info = json.loads((out / "raw/BraTS21/BraTS2021_00000/subject.json").read_text())
    assert info["lesion_kind"] == "glioma" and info["lesion_ml"] > 1


def test_cohort_generation_resumes(cohort):
    cfg, out, df = cohort
    stamps = {p: p.stat().st_mtime_ns for p in out.rglob("*.nii.gz")}
    victim = out / "raw/WMH/Utrecht_0/t1.nii.gz"
    victim.unlink()
    synthetic.generate_cohort(cfg, out, progress=False)
    assert victim.exists()
    assert all(p.stat().st_mtime_ns == t for p, t in stamps.items() if p.parent != victim.parent)
    bigger = dataclasses.replace(cfg, n_ixi_test=2)
    assert len(synthetic.generate_cohort(bigger, out, progress=False)) == len(df) + 1


def test_montage_shows_one_row_per_data_set(cohort):
    import matplotlib.pyplot as plt

    fig = synthetic.plot_montage(cohort[2])
    assert len(fig.axes) == 3 * 2 and any("BraTS21 T2" in ax.get_title() for ax in fig.axes)
    plt.close(fig)


def test_lesion_kind_follows_the_data_set():
    assert _spec("ATLAS", "R001").lesion.kind == "stroke" and _spec("BraTS21", "BraTS-A").lesion.kind == "glioma"
    assert set(lesions.DATASET_KIND) == set(synthetic.PAPER_UNHEALTHY_SIZES)
