"""Pathology simulators: exact blob fields, placement inside the brain, sizes, contrast per weighting."""
from __future__ import annotations

import numpy as np
import pytest

from cddpm_lib import headmodel, lesions


@pytest.fixture(scope="module")
def atlas(tmp_path_factory):
    mp = pytest.MonkeyPatch()
    mp.setenv("CDDPM_DATA_ROOT", str(tmp_path_factory.mktemp("data")))
    try:
        yield headmodel.load_atlas(4)
    finally:
        mp.undo()


def _blob(radii=(6.0, 4.0, 3.0), roughness=0.0, seed=0) -> lesions.Blob:
    rng = np.random.default_rng(seed)
    return lesions.Blob(np.array([1.0, -2.0, 3.0]), lesions.random_rotation(rng), np.array(radii), roughness,
                        lesions.random_waves(rng))


def _grid(half=10.0, step=0.5) -> np.ndarray:
    axis = np.arange(-half, half + step, step)
    return np.stack(np.meshgrid(axis, axis, axis, indexing="ij")).reshape(3, -1) + np.array([[1.0], [-2.0], [3.0]])


def test_random_rotation_is_proper_and_keeps_first_axis():
    rng = np.random.default_rng(1)
    axis = np.array([1.0, 2.0, -0.5])
    q = lesions.random_rotation(rng, axis)
    np.testing.assert_allclose(q.T @ q, np.eye(3), atol=1e-12)
    assert np.linalg.det(q) == pytest.approx(1.0)
    np.testing.assert_allclose(q[:, 0], axis / np.linalg.norm(axis))


def test_smooth_ellipsoid_matches_closed_form():
    blob, pts = _blob(), _grid()
    weight, rho = lesions.blob_field(blob, pts)
    local = blob.rotation.T @ (pts - blob.center[:, None])
    inside = ((local / blob.radii[:, None]) ** 2).sum(0) < 1.0  # independent ellipsoid test
    np.testing.assert_array_equal(weight > 0, inside)
    assert weight[inside].min() >= lesions.FLOOR and weight.max() == pytest.approx(1.0)


def test_surface_noise_is_bounded():
    rng = np.random.default_rng(2)
    v = rng.standard_normal((3, 5000))
    n = lesions.surface_noise(v / np.linalg.norm(v, axis=0), lesions.random_waves(rng))
    assert np.abs(n).max() <= 1.0 + 1e-9 and n.std() > 0.05


def test_rough_blob_stays_within_its_perturbed_radius():
    blob, pts = _blob(roughness=0.3), _grid(half=12.0)
    inside = lesions.blob_field(blob, pts)[0] > 0
    local = blob.rotation.T @ (pts - blob.center[:, None])
    plain = np.sqrt(((local / blob.radii[:, None]) ** 2).sum(0))
    assert plain[inside].max() < 1.3 + 1e-6  # radius * (1 + roughness) bounds the surface
    assert (plain[~inside] > 0.7 - 1e-6).all()


def test_lesion_field_is_the_union_of_its_blobs():
    blobs = (_blob(seed=0), lesions.Blob(np.array([6.0, 0.0, 3.0]), np.eye(3), np.array([3.0, 3.0, 3.0]), 0.0,
                                         np.zeros((1, 6))))
    spec = lesions.LesionSpec("ms", blobs)
    pts = _grid(half=12.0)
    weight, index, rho = lesions.lesion_field(spec, pts, pts)
    union = np.any([lesions.blob_field(b, pts)[0] > 0 for b in blobs], axis=0)
    np.testing.assert_array_equal(weight > 0, union)
    assert set(np.unique(index[weight > 0])) == {0, 1} and (index[weight == 0] == -1).all()


def test_mass_effect_pushes_tissue_outwards_and_vanishes_far_away():
    centre = np.array([10.0, 0.0, 0.0])
    spec = lesions.LesionSpec("glioma", (_blob(),), (centre, 0.3, 15.0))
    r = np.linspace(0.0, 120.0, 400)
    u = centre[:, None] + np.array([[1.0], [0.0], [0.0]]) * r
    moved = lesions.mass_effect(spec, u)
    r_src = np.linalg.norm(moved - centre[:, None], axis=0)
    assert (r_src <= r + 1e-9).all()  # a voxel shows tissue from closer to the centre
    assert (np.diff(r_src) > 0).all()  # monotone: no folding
    np.testing.assert_allclose(r_src[-1], r[-1], atol=1e-6)
    assert lesions.mass_effect(None, u) is u


def test_insert_lesion_changes_only_weighted_voxels():
    image = np.linspace(0.1, 1.0, 50, dtype=np.float32)
    weight = np.zeros(50, np.float32)
    weight[10:20] = 0.5
    out = lesions.insert_lesion(image, weight, np.full(50, 2.0, np.float32))
    np.testing.assert_array_equal(out != image, weight > 0)
    np.testing.assert_allclose(out[10:20], 0.5 * image[10:20] + 1.0)


@pytest.mark.parametrize("kind", lesions.KINDS)
def test_lesions_are_placed_inside_the_brain(atlas, kind):
    rng = np.random.default_rng(3)
    inv = np.linalg.inv(atlas.affine)
    for _ in range(5):
        spec = lesions.sample_lesion(kind, rng, atlas)
        for blob in spec.blobs[:1] if kind == "glioma" else spec.blobs:
            ijk = np.round(inv[:3, :3] @ blob.center + inv[:3, 3]).astype(int)
            assert atlas.brain[tuple(ijk)] > 0.5, f"{kind} blob centre outside the brain"
            if kind in ("ms", "wmh"):
                assert atlas.wm[tuple(ijk)] > 0.3, f"{kind} lesion centre not in white matter"


def _volume_ml(spec: lesions.LesionSpec, step: float = 2.0) -> float:
    """Union volume of the blobs, counted on a grid (independent of the nominal ellipsoid volumes)."""
    reach = max(b.radii.max() * (1 + b.roughness) for b in spec.blobs) + step
    lo = np.min([b.center for b in spec.blobs], 0) - reach
    hi = np.max([b.center for b in spec.blobs], 0) + reach
    axes = [np.arange(a, b, step) for a, b in zip(lo, hi)]
    pts = np.stack(np.meshgrid(*axes, indexing="ij")).reshape(3, -1)
    return float((lesions.lesion_field(spec, pts, pts)[0] > 0).sum() * step ** 3 / 1000)


def test_lesion_sizes_span_the_real_ranges(atlas):
    rng = np.random.default_rng(4)
    vols = {k: [_volume_ml(lesions.sample_lesion(k, rng, atlas), 2.5) for _ in range(15)] for k in lesions.KINDS}
    assert 8 < min(vols["glioma"]) and max(vols["glioma"]) < 450 and 40 < np.median(vols["glioma"]) < 250
    assert min(vols["stroke"]) < 2 and max(vols["stroke"]) > 30  # lacunes to territorial infarcts
    assert 0.2 < np.median(vols["ms"]) < 30 and 0.2 < np.median(vols["wmh"]) < 30
    counts = [len(lesions.sample_lesion("wmh", rng, atlas).blobs) for _ in range(20)]
    assert min(counts) >= 5 and max(counts) <= 40


def test_min_radius_is_respected(atlas):
    spec = lesions.sample_lesion("wmh", np.random.default_rng(5), atlas, min_radius_mm=5.0)
    assert min(b.radii.min() for b in spec.blobs) >= 5.0 * 0.6 - 1e-9  # axes scaled by 0.6–1.0 of the radius


def test_contrast_per_weighting():
    means = headmodel.BASE_MEANS
    idx, rho = np.zeros(3, int), np.array([0.0, 1.1, 2.0])
    blob = _blob()
    glioma = lesions.LesionSpec("glioma", (blob,), core=blob, rim=0.5)
    t2 = lesions.target_intensity(glioma, "t2", means["t2"], idx, rho)
    assert (t2 > means["t2"]["wm"]).all() and t2[0] > t2[2] > means["t2"]["gm"]  # necrosis > oedema > GM
    stroke = lesions.target_intensity(lesions.LesionSpec("stroke", (blob,)), "t1", means["t1"], idx, rho * 0)
    assert (stroke < means["t1"]["gm"]).all()
    wmh = lesions.target_intensity(lesions.LesionSpec("wmh", (blob,)), "t1", means["t1"], idx, rho)
    assert (means["t1"]["gm"] < wmh).all() and (wmh < means["t1"]["wm"]).all()  # subtle hypointensity
    ms = lesions.target_intensity(lesions.LesionSpec("ms", (blob,)), "t2", means["t2"], idx, rho)
    assert (means["t2"]["gm"] < ms).all() and (ms < means["t2"]["csf"]).all()


def test_allowed_tissue_rules():
    brain = np.array([True, True, True, False])
    gm, wm = np.array([0.9, 0.1, 0.0, 0.0]), np.array([0.0, 0.8, 0.1, 1.0])
    np.testing.assert_array_equal(lesions.allowed_tissue("ms", brain, gm, wm), [False, True, False, False])
    np.testing.assert_array_equal(lesions.allowed_tissue("stroke", brain, gm, wm), [True, True, False, False])
    np.testing.assert_array_equal(lesions.allowed_tissue("glioma", brain, gm, wm), brain)
