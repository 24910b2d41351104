"""volumes: NIfTI round trips, checks, atomic writes."""
from __future__ import annotations

import numpy as np
import pytest

from cddpm_lib import volumes
from cddpm_lib.volumes import VolumeError


def test_nifti_roundtrip_keeps_affine(tmp_path):
    arr = np.random.default_rng(0).random((5, 6, 7)).astype(np.float32)
    aff = np.diag([2.0, 2.0, 3.0, 1.0])
    aff[:3, 3] = [-10, 4, 7]
    p = volumes.save_nifti(arr, aff, tmp_path / "a" / "x.nii.gz")
    back, aff2 = volumes.load_nifti(p)
    np.testing.assert_allclose(back, arr)
    np.testing.assert_allclose(aff2, aff)


def test_labels_saved_as_uint8(tmp_path):
    p = volumes.save_nifti(np.ones((2, 2, 2)), np.eye(4), tmp_path / "m.nii.gz", dtype=np.uint8)
    import nibabel as nib

    assert nib.load(str(p)).get_data_dtype() == np.uint8


def test_errors_name_the_file(tmp_path):
    with pytest.raises(VolumeError, match="does not exist"):
        volumes.load_nifti(tmp_path / "none.nii.gz")
    bad = tmp_path / "bad.nii.gz"
    bad.write_bytes(b"not a nifti")
    with pytest.raises(VolumeError, match="bad.nii.gz: cannot be read"):
        volumes.load_nifti(bad)
    with pytest.raises(VolumeError, match="3D"):
        volumes.save_nifti(np.zeros((2, 2)), np.eye(4), tmp_path / "y.nii.gz")
    with pytest.raises(VolumeError, match="non-finite"):
        volumes.save_nifti(np.full((2, 2, 2), np.nan), np.eye(4), tmp_path / "z.nii.gz")


def test_four_d_rejected(tmp_path):
    import nibabel as nib

    nib.save(nib.Nifti1Image(np.zeros((2, 2, 2, 3), np.float32), np.eye(4)), str(tmp_path / "f.nii.gz"))
    with pytest.raises(VolumeError, match="expected a 3D volume"):
        volumes.load_nifti(tmp_path / "f.nii.gz")
    # trailing singleton axes (time, vector) of a 3D image are dropped
    nib.save(nib.Nifti1Image(np.ones((2, 3, 4, 1, 1), np.float32), np.eye(4)), str(tmp_path / "s.nii.gz"))
    assert volumes.load_nifti(tmp_path / "s.nii.gz")[0].shape == (2, 3, 4)


def test_atomic_write_leaves_nothing_on_failure(tmp_path):
    target = tmp_path / "out.txt"
    target.write_text("old")
    with pytest.raises(RuntimeError):
        with volumes.atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("interrupted")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["out.txt"]


def test_npz_and_json(tmp_path):
    volumes.save_npz(tmp_path / "a.npz", x=np.arange(3))
    assert volumes.load_npz(tmp_path / "a.npz")["x"].tolist() == [0, 1, 2]
    volumes.save_json({"b": 1}, tmp_path / "a.json")
    assert (tmp_path / "a.json").read_text().strip().startswith("{")


def test_json_is_strict_missing_values_are_null(tmp_path):
    import json

    obj = {"dice": float("nan"), "qc": {"x": np.float64("inf"), "y": [np.float32("nan"), 0.5, (1, float("-inf"))]},
           "ok": 2.5, "path": tmp_path}
    text = volumes.save_json(obj, tmp_path / "s.json").read_text()
    assert "NaN" not in text and "Infinity" not in text
    back = json.loads(text, parse_constant=lambda c: pytest.fail(f"non-strict constant {c}"))
    assert back["dice"] is None and back["qc"] == {"x": None, "y": [None, 0.5, [1, None]]}
    assert back["ok"] == 2.5 and back["path"] == str(tmp_path)


def test_slices_roundtrip():
    vol = np.arange(2 * 3 * 4).reshape(2, 3, 4)
    s = volumes.volume_to_slices(vol)
    assert s.shape == (4, 2, 3)
    np.testing.assert_array_equal(s[1], vol[:, :, 1])
    np.testing.assert_array_equal(volumes.slices_to_volume(s), vol)
    np.testing.assert_array_equal(volumes.slices_to_volume(s[:, None]), vol)


def test_atomic_writes_get_the_usual_file_mode(tmp_path):
    from cddpm_lib import volumes

    path = volumes.save_json({"a": 1}, tmp_path / "x.json")
    assert path.stat().st_mode & 0o777 == 0o666 & ~volumes._UMASK
