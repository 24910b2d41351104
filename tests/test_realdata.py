"""Real data: shipped manifests in sync with the reference, the published leaks, the leak-free split, and a
miniature tree in each data set's own file naming (tiny synthetic volumes) that the official manifest resolves."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from cddpm_lib import headmodel, manifests, paths, realdata, synthetic
from cddpm_lib.volumes import save_nifti

LEAKED_TEST = ["IXI219-Guys-0894", "IXI237-Guys-1049", "IXI447-Guys-0979", "IXI493-Guys-1007", "IXI499-Guys-1004",
               "IXI512-Guys-1054", "IXI531-Guys-1057", "IXI549-Guys-1046", "IXI552-Guys-1063"]
TREE = {"IXI": ["IXI002-Guys-0828", "IXI309-IOP-0897", "IXI116-Guys-0739"], "BraTS21": ["BraTS2021_00016"],
        "MSLUB": ["patient01"], "ATLAS": ["sub-r001s001"], "WMH": ["GE3T_101", "Utrecht_0"]}


@pytest.fixture(scope="module")
def official() -> pd.DataFrame:
    return realdata.load_shipped("official")


def test_shipped_files_are_what_the_builder_writes(tmp_path):
    written = realdata.build_shipped_manifests(paths.manifests_dir() / realdata.REFERENCE_NAME, tmp_path)
    for name, path in written.items():
        assert path.read_bytes() == (paths.manifests_dir() / path.name).read_bytes(), f"{path.name} out of date"


def test_reference_is_shipped_unchanged():
    ref = realdata.read_reference()
    assert list(ref.columns) == list(realdata.REFERENCE_COLUMNS) and len(ref) == 4251
    assert ref.groupby("dataset")["subject_id"].nunique().to_dict() == {
        "ATLAS": 655, "BraTS21": 1251, "IXI": 566, "MSLUB": 30, "WMH": 60}


def test_published_split_leaks_are_found(official):
    leaks = realdata.find_leaks(official)
    counts = leaks["kind"].value_counts().to_dict()
    assert counts == {"val_in_several_folds": 32, "test_in_train_val": 9, "train_and_val_same_fold": 8}
    assert sorted(leaks.loc[leaks.kind == "test_in_train_val", "subject_id"]) == LEAKED_TEST
    assert set(leaks["dataset"]) == {"IXI"}


def test_leak_free_split_keeps_sizes_without_leaks(official):
    free = realdata.leak_free_split(official)
    assert realdata.find_leaks(free).empty
    ixi, pub = free[free.dataset == "IXI"], official[official.dataset == "IXI"]
    assert set(ixi.loc[ixi.split == "test", "subject_id"]) == set(pub.loc[pub.split == "test", "subject_id"])
    pool = set(pub.loc[pub.split != "test", "subject_id"]) - set(LEAKED_TEST)
    vals = [set(ixi.loc[(ixi.split == "val") & (ixi.fold == k), "subject_id"]) for k in range(5)]
    assert [len(v) for v in vals] == [44] * 5 and len(set().union(*vals)) == 220  # disjoint folds
    for k in range(5):
        train = set(ixi.loc[(ixi.split == "train") & (ixi.fold == k), "subject_id"])
        assert train == pool - vals[k] and len(train) == 365
        assert {s.split("-")[1] for s in vals[k]} == {"Guys", "HH", "IOP"}  # site-stratified
    pd.testing.assert_frame_equal(free[free.dataset != "IXI"].reset_index(drop=True),
                                  official[official.dataset != "IXI"].reset_index(drop=True))
    pd.testing.assert_frame_equal(free, realdata.leak_free_split(official))  # deterministic


def test_official_manifest_columns(official):
    row = official[official.subject_id == "IXI309-IOP-0897"].iloc[0]
    assert row.t2 == "" and row.t1 == "IXI/IXI309-IOP-0897-T1.nii.gz" and row.site == "IOP"
    brats = official[official.dataset == "BraTS21"]
    assert (brats.skull_stripped == 1).all() and (brats.fold == -1).all() and (brats.healthy == 0).all()
    assert realdata.real_paths("WMH", "GE3T_101")["seg"] == "WMH/training/Amsterdam/GE3T/101/wmh.nii.gz"
    assert realdata.real_paths("WMH", "Singapore_50")["t1"] == "WMH/training/Singapore/50/pre/T1.nii.gz"
    assert realdata.real_paths("ATLAS", "sub-r034s002")["t1"].startswith("ATLAS/Training/R034/sub-r034s002/ses-1/")
    assert realdata.real_paths("MSLUB", "patient07")["seg"] == "MSLUB/patient07/patient07_consensus_gt.nii.gz"
    assert realdata.real_site("WMH", "Utrecht_4") == "Utrecht" and realdata.real_site("ATLAS", "sub-r001s001") == "R001"


@pytest.fixture(scope="module")
def tree(tmp_path_factory, official):
    """Tiny synthetic scans (8 mm) written under each data set's real file names."""
    root = tmp_path_factory.mktemp("real")
    mp = pytest.MonkeyPatch()
    mp.setenv("CDDPM_DATA_ROOT", str(tmp_path_factory.mktemp("data")))
    cfg = synthetic.SyntheticConfig(voxel_mm=8.0)
    site = {"IXI": "Guys", "BraTS21": "BraTS-A", "MSLUB": "Ljubljana", "ATLAS": "R001", "WMH": "GE3T"}
    for dataset, subjects in TREE.items():
        for i, sid in enumerate(subjects):
            vols = headmodel.render_subject(synthetic.subject_spec(cfg, dataset, i, site[dataset]))
            row = official[official.subject_id == sid].iloc[0]
            for column in ("t1", "t2", "seg"):
                if row[column]:
                    data = vols[column] if column in vols else vols["t1"]  # T1 stands in where none is rendered
                    save_nifti(data, vols["affine"], root / row[column], dtype=np.uint8 if column == "seg" else None)
    yield root
    mp.undo()


def test_official_manifest_resolves_against_the_tree(tree):
    with pytest.warns(UserWarning, match=r"(?s)keep no subject .*\n  BraTS21 test \(all 1151 subjects\)"):
        present, missing = realdata.build_real_manifest("official", tree)
    assert {d: sorted(set(g)) for d, g in present.groupby("dataset")["subject_id"]} == {
        d: sorted(s) for d, s in TREE.items()}
    assert (present[present.subject_id == "IXI002-Guys-0828"].shape[0]) == 5  # one row per fold
    assert all(p.startswith(str(tree)) for p in present["t1"])
    assert manifests.validate_manifest(present) == []
    assert len(missing) > 0 and not missing["subject_id"].isin(sum(TREE.values(), [])).any()
    with pytest.warns(UserWarning, match="keep no subject"):
        leak_free, _ = realdata.build_real_manifest("leak_free", tree)
    assert manifests.validate_manifest(leak_free) == []
    emptied = realdata.emptied_parts(realdata.load_shipped("official"), present)
    assert "IXI test (all 157 subjects)" not in emptied  # IXI116-Guys-0739 is a test subject of the tree
    assert "MSLUB test (all 20 subjects)" in emptied and "IXI val fold 0 (all 44 subjects)" in emptied


def test_missing_files_fail_with_counts_and_a_fix(tree):
    with pytest.raises(manifests.ManifestError) as err:
        realdata.build_real_manifest("official", tree, allow_missing=False)
    msg = str(err.value)
    assert "BraTS21: 1250 of 1251 subjects lack files" in msg and "data_manifests/README.md" in msg
    with pytest.raises(manifests.ManifestError, match="none of the files"):
        realdata.build_real_manifest("official", tree / "nothing")


def test_data_stage_on_real_data_records_the_manifest(tree, tmp_path, monkeypatch):
    monkeypatch.setenv("CDDPM_REAL_DATA", str(tree))
    monkeypatch.setenv("CDDPM_DATA_ROOT", str(tmp_path))
    cfg = manifests.DataConfig(profile="smoke", source="real", split="leak_free", allow_missing=True)
    df = manifests.prepare_data(cfg)
    info = json.loads((tmp_path / "real/smoke/data_info.json").read_text())
    assert info["manifest"] == "leak_free" and info["manifest_origin"] == "data_manifests/leak_free.csv"
    assert info["subjects"] == {d: len(s) for d, s in TREE.items()} and info["leaks"] == 0
    assert info["empty_parts"] == realdata.emptied_parts(realdata.load_shipped("leak_free"), df) != []
    assert len(manifests.load_manifest(paths.raw_manifest_path("real", "smoke"))) == len(df)


def test_data_stage_lists_broken_real_files(tree, tmp_path, monkeypatch):
    broken = tmp_path / "real"
    import shutil

    shutil.copytree(tree, broken)
    seg = broken / realdata.real_paths("WMH", "Utrecht_0")["seg"]
    seg.write_bytes(b"garbage")
    monkeypatch.setenv("CDDPM_REAL_DATA", str(broken))
    monkeypatch.setenv("CDDPM_DATA_ROOT", str(tmp_path / "data"))
    with pytest.raises(manifests.ManifestError, match=r"Utrecht_0\) seg .*wmh.nii.gz: cannot be read"):
        manifests.prepare_data(manifests.DataConfig(profile="smoke", source="real", allow_missing=True))
