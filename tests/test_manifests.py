"""Manifests: schema checks naming row and column, path resolution, selection, and validation that reports every
planted fault (missing, corrupt, 4D, NaN, empty mask, grid mismatch) at once."""
from __future__ import annotations

import gzip

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from cddpm_lib import manifests, paths
from cddpm_lib.config import ConfigError
from cddpm_lib.volumes import save_nifti

SHAPE = (6, 7, 5)


def _volume(seed: int, shape=SHAPE) -> np.ndarray:
    return np.random.default_rng(seed).uniform(1, 100, shape).astype(np.float32)


def _mask(shape=SHAPE) -> np.ndarray:
    m = np.zeros(shape, np.uint8)
    m[1:-1, 1:-1, 1:-1] = 1
    return m


def _row(dataset, sid, split, fold, root, **files) -> dict:
    base = {"dataset": dataset, "subject_id": sid, "split": split, "fold": fold, "t1": "", "t2": "",
            "brain_mask": "", "seg": "", "site": "A", "skull_stripped": int(dataset == "BraTS21"),
            "healthy": int(dataset == "IXI")}
    for name, array in files.items():
        rel = f"{dataset}/{sid}/{name}.nii.gz"
        save_nifti(array, np.diag([2.0, 2.0, 3.0, 1.0]), root / rel, dtype=np.uint8 if name != "t1" and
                   name != "t2" else None)
        base[name] = rel
    return base


@pytest.fixture
def good(tmp_path) -> pd.DataFrame:
    """A valid manifest with relative paths: 2 IXI subjects in 2 folds, 1 IXI test, 1 BraTS21, 1 ATLAS."""
    rows = []
    for i, sid in enumerate(["IXI001", "IXI002"]):
        r = _row("IXI", sid, "train", 0, tmp_path, t1=_volume(i), t2=_volume(10 + i), brain_mask=_mask())
        rows += [r, {**r, "split": "val" if i == 0 else "train", "fold": 1}]
    rows.append(_row("IXI", "IXI003", "test", -1, tmp_path, t1=_volume(3), t2=_volume(4), brain_mask=_mask()))
    rows.append(_row("BraTS21", "B1", "test", -1, tmp_path, t2=_volume(5), brain_mask=_mask(), seg=_mask()))
    rows.append(_row("ATLAS", "sub-r001s001", "val", -1, tmp_path, t1=_volume(6), seg=_mask()))
    df = pd.DataFrame(rows)
    manifests.write_manifest(df, tmp_path / "m.csv")
    return df


def test_load_resolves_paths_and_types(good, tmp_path):
    df = manifests.load_manifest(tmp_path / "m.csv")
    assert df["fold"].dtype.kind == "i" and df.loc[0, "t1"] == str(tmp_path / "IXI/IXI001/t1.nii.gz")
    assert df.loc[len(df) - 1, "t2"] == "" and list(df.columns) == list(manifests.COLUMNS)
    other = manifests.load_manifest(tmp_path / "m.csv", root="/elsewhere")
    assert other.loc[0, "t1"] == "/elsewhere/IXI/IXI001/t1.nii.gz"


def test_schema_errors_name_row_and_column(good, tmp_path):
    bad = good.astype(str).copy()
    bad.loc[1, "dataset"] = "IXX"
    bad.loc[2, "fold"] = "7"
    bad.loc[5, "fold"] = "0"
    bad.loc[6, "healthy"] = "2"
    bad.loc[3, ["t1", "t2"]] = ""
    bad.to_csv(tmp_path / "bad.csv", index=False)
    with pytest.raises(manifests.ManifestError) as err:
        manifests.load_manifest(tmp_path / "bad.csv")
    msg = str(err.value)
    assert "5 problem(s)" in msg
    for part in ("row 1 (CSV line 3), column 'dataset'", "row 2 (CSV line 4), column 'fold': IXI train",
                 "row 5 (CSV line 7), column 'fold': must be -1", "row 6 (CSV line 8), column 'healthy'",
                 "row 3 (CSV line 5): neither t1 nor t2"):
        assert part in msg


def test_unreadable_or_empty_manifest_files_are_named(good, tmp_path):
    (tmp_path / "empty.csv").write_text("")
    good.iloc[0:0].to_csv(tmp_path / "header_only.csv", index=False)
    for path, msg in ((tmp_path / "empty.csv", "empty.csv is not a readable CSV file"),
                      (tmp_path / "header_only.csv", "header_only.csv has a header but no rows"),
                      (tmp_path, "is a folder; pass the manifest's CSV file")):
        with pytest.raises(ValueError, match=msg):
            manifests.load_manifest(path)


def test_missing_column_and_duplicates(good, tmp_path):
    good.drop(columns=["site"]).to_csv(tmp_path / "nosite.csv", index=False)
    with pytest.raises(manifests.ManifestError, match=r"missing column\(s\) \['site'\]"):
        manifests.load_manifest(tmp_path / "nosite.csv")
    pd.concat([good, good.iloc[[0]]]).to_csv(tmp_path / "dup.csv", index=False)
    with pytest.raises(manifests.ManifestError, match="row 7 .*duplicate"):
        manifests.load_manifest(tmp_path / "dup.csv")


def test_select_by_dataset_split_and_fold(good, tmp_path):
    df = manifests.load_manifest(tmp_path / "m.csv")
    assert list(manifests.select(df, "IXI", "train", fold=1)["subject_id"]) == ["IXI002"]
    assert list(manifests.select(df, "IXI", "val", fold=1)["subject_id"]) == ["IXI001"]
    assert len(manifests.select(df, split="test", fold=0)) == 2  # fold-free rows kept
    assert set(manifests.select(df, ["BraTS21", "ATLAS"])["dataset"]) == {"BraTS21", "ATLAS"}


def test_write_makes_paths_under_root_relative(good, tmp_path):
    df = manifests.load_manifest(tmp_path / "m.csv")
    manifests.write_manifest(df, tmp_path / "again.csv", root=tmp_path)
    text = (tmp_path / "again.csv").read_text()
    assert str(tmp_path) not in text
    pd.testing.assert_frame_equal(manifests.load_manifest(tmp_path / "again.csv"), df)


def test_shipped_manifests_resolve_against_real_data_root(tmp_path, monkeypatch):
    monkeypatch.setenv("CDDPM_REAL_DATA", str(tmp_path))
    df = manifests.load_manifest(paths.manifests_dir() / "official.csv")
    assert df.loc[0, "t1"].startswith(str(tmp_path)) and df.loc[0, "t1"].endswith("-T1.nii.gz")
    monkeypatch.delenv("CDDPM_REAL_DATA")
    with pytest.raises(paths.SetupError, match="CDDPM_REAL_DATA is not set"):
        manifests.load_manifest(paths.manifests_dir() / "official.csv")


def test_valid_manifest_has_no_problems(good, tmp_path):
    assert manifests.validate_manifest(tmp_path / "m.csv") == []
    assert len(manifests.check_manifest(tmp_path / "m.csv")) == len(good)


def test_validation_reports_every_planted_fault(good, tmp_path):
    (tmp_path / "IXI/IXI002/t2.nii.gz").unlink()  # missing
    (tmp_path / "IXI/IXI003/t1.nii.gz").write_bytes(gzip.compress(b"not a nifti"))  # corrupt
    aff = np.diag([2.0, 2.0, 3.0, 1.0])
    nib.save(nib.Nifti1Image(np.ones((*SHAPE, 2), np.float32), aff), tmp_path / "IXI/IXI003/t2.nii.gz")  # 4D
    nan = _volume(5)
    nan[0, 0, 0] = np.nan
    nib.save(nib.Nifti1Image(nan, aff), tmp_path / "BraTS21/B1/t2.nii.gz")  # NaN
    save_nifti(np.zeros(SHAPE), aff, tmp_path / "IXI/IXI001/brain_mask.nii.gz", dtype=np.uint8)  # empty mask
    save_nifti(_mask((6, 7, 6)), aff, tmp_path / "ATLAS/sub-r001s001/seg.nii.gz", dtype=np.uint8)  # shape
    save_nifti(_mask(), np.diag([2.0, 2.0, 2.0, 1.0]), tmp_path / "BraTS21/B1/brain_mask.nii.gz",
               dtype=np.uint8)  # affine
    problems = manifests.validate_manifest(tmp_path / "m.csv")
    found = {(p.subject_id, p.column, p.message.split(" (")[0]) for p in problems}
    assert found == {
        ("IXI002", "t2", "file does not exist"),
        ("IXI003", "t1", "cannot be read as NIfTI"),
        ("IXI003", "t2", "expected a 3D volume, got shape"),
        ("B1", "t2", "1 non-finite"),
        ("IXI001", "brain_mask", "empty mask"),
        ("sub-r001s001", "seg", "grid differs from t1"),
        ("B1", "brain_mask", "grid differs from t2"),
    }, found
    shared = next(p for p in problems if p.subject_id == "IXI001")
    assert shared.rows == (0, 1) and "IXI/IXI001/brain_mask.nii.gz" in str(shared)  # one file, all its rows
    assert str(shared).startswith("row 0,1 (CSV line 2,3; IXI/IXI001) brain_mask ")  # as the schema errors say
    with pytest.raises(manifests.ManifestError, match="7 problem"):
        manifests.check_manifest(tmp_path / "m.csv")


def test_masks_with_one_positive_value_pass_others_are_named(good, tmp_path):
    aff = np.diag([2.0, 2.0, 3.0, 1.0])
    path = tmp_path / "IXI/IXI001/brain_mask.nii.gz"
    save_nifti(_mask() * 255, aff, path, dtype=np.uint8)  # 0/255: the pipeline reads "> 0"
    assert manifests.inspect_file(str(path), "brain_mask")[2] == []
    three = _mask().astype(np.uint8)
    three[0, 0, 0] = 2
    save_nifti(three, aff, path, dtype=np.uint8)
    assert "not binary" in manifests.inspect_file(str(path), "brain_mask")[2][0]


def test_row_level_rules(good, tmp_path):
    df = manifests.load_manifest(tmp_path / "m.csv")
    df.loc[df.dataset == "ATLAS", "seg"] = ""
    df.loc[df.dataset == "BraTS21", "t2"] = str(tmp_path / "IXI/IXI003/t1.nii.gz")
    df.loc[df.dataset == "BraTS21", ["t1", "t2"]] = [str(tmp_path / "IXI/IXI003/t1.nii.gz"), ""]
    msgs = {str(p) for p in manifests.validate_manifest(df)}
    assert any("unhealthy row without seg" in m for m in msgs)
    assert any("BraTS21 is evaluated on T2 but no t2 file" in m for m in msgs)


def test_summarize_counts_subjects(good, tmp_path):
    table = manifests.summarize(manifests.load_manifest(tmp_path / "m.csv"))
    assert table.loc["IXI", "train f0"] == 2 and table.loc["IXI", "val f1"] == 1 and table.loc["ATLAS", "val"] == 1


def test_data_config_takes_profile_values_for_none():
    cfg = manifests.DataConfig.from_namespace({"profile": "smoke", "source": "synthetic", "voxel_mm": None,
                                               "n_ixi_test": 3, "unrelated": 1})
    assert cfg.voxel_mm == 4.0 and cfg.n_ixi_pool == 10 and cfg.n_ixi_test == 3 and cfg.source == "synthetic"
    assert manifests.DataConfig.from_namespace({"profile": "paper"}).n_ixi_pool == 402
    with pytest.raises(ValueError, match="unknown profile"):
        manifests.DataConfig.from_namespace({"profile": "fast"})
    with pytest.raises(ConfigError, match="split"):
        manifests.DataConfig(split="mine")
