"""data: manifest selection, the slice cache, uniform sampling, slabs, augmentation, determinism."""
from __future__ import annotations

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import torch
from scipy import stats

from cddpm_lib import data, volumes
from cddpm_lib.volumes import VolumeError


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def manifest(tmp_path_factory):
    return data.write_phantom_cohort(tmp_path_factory.mktemp("cohort"), shape=(16, 16, 12), n_subjects=5, n_val=1,
                                     folds=(0, 1), seed=3)


@pytest.fixture(scope="module")
def cohort(manifest):
    return data.SliceCohort.from_manifest(manifest, split="train", fold=0, weighting="t2")


def test_manifest_paths_resolve_against_its_folder(manifest):
    df = data.read_manifest(manifest)
    assert set(df["fold"]) == {0, 1}
    assert all(p.startswith(str(manifest.parent)) for p in df["t2"])
    rows = data.select_rows(df, dataset="IXI", split="val", fold=1, weighting="t1")
    assert len(rows) == 1


def test_selection_errors_name_the_problem(manifest):
    df = data.read_manifest(manifest)
    with pytest.raises(ValueError, match=r"no IXI train rows for fold 4; folds present: \[0, 1\]"):
        data.select_rows(df, dataset="IXI", split="train", fold=4, weighting="t2")
    df.loc[0, "brain_mask"] = ""
    with pytest.raises(ValueError, match="have no 'brain_mask' file"):
        data.select_rows(df, dataset="IXI", split=df.loc[0, "split"], fold=int(df.loc[0, "fold"]), weighting="t1")


def test_subjects_without_the_weighting_are_left_out_with_a_warning(manifest):
    df = data.read_manifest(manifest)
    train = df[(df["split"] == "train") & (df["fold"] == 0)]
    df.loc[train.index[0], "t2"] = ""  # like the IXI subjects of the published split without a T2 scan
    with pytest.warns(UserWarning, match=rf"1 IXI train subject\(s\) \(fold 0\) without a 't2' image left out: "
                                         rf"\['{train['subject_id'].iloc[0]}'\]"):
        rows = data.select_rows(df, dataset="IXI", split="train", fold=0, weighting="t2")
    assert len(rows) == len(train) - 1 and (rows["t2"] != "").all()
    assert len(data.select_rows(df, dataset="IXI", split="train", fold=0, weighting="t1")) == len(train)
    df.loc[train.index, "t2"] = ""
    with pytest.raises(ValueError, match=r"none of the 4 IXI train subject\(s\) \(fold 0\) has a 't2' file"):
        data.select_rows(df, dataset="IXI", split="train", fold=0, weighting="t2")


def test_cohort_slices_match_nibabel(manifest, cohort):
    df = data.read_manifest(manifest)
    rows = data.select_rows(df, dataset="IXI", split="train", fold=0, weighting="t2")
    assert len(cohort) == len(rows) == 4 and cohort.image_size == (16, 16)
    for v, row in enumerate(rows.itertuples()):
        ref = volumes.volume_to_slices(np.asarray(nib.load(row.t2).dataobj, dtype=np.float32))
        np.testing.assert_allclose(cohort.images[v].numpy(), ref, atol=1e-6)
        mask = volumes.volume_to_slices(np.asarray(nib.load(row.brain_mask).dataobj))
        np.testing.assert_array_equal(cohort.masks[v].numpy(), mask)


def test_out_of_range_volume_rejected(tmp_path):
    volumes.save_nifti(np.full((4, 4, 3), 2.0), np.eye(4), tmp_path / "img.nii.gz")
    volumes.save_nifti(np.ones((4, 4, 3)), np.eye(4), tmp_path / "mask.nii.gz", dtype=np.uint8)
    with pytest.raises(VolumeError, match=r"img.nii.gz: intensities must lie in \[0, 1\]"):
        data.load_subject(tmp_path / "img.nii.gz", tmp_path / "mask.nii.gz")


def test_sampling_is_uniform_with_replacement(cohort):
    n_rows = cohort.n_slices
    sampler = data.StepSampler(n_rows, per_rank=16, seed=7, start=0, max_steps=250)
    rows = [r for keys in sampler for r, _ in keys]
    counts = np.bincount(rows, minlength=n_rows)
    assert stats.chisquare(counts).pvalue > 1e-3  # uniform over all slices
    assert any(len(set(r for r, _ in keys)) < 16 for keys in sampler)  # with replacement: repeats occur


def test_skip_empty_draws_only_brain_slices(cohort):
    all_rows = cohort.slab_starts(1, skip_empty=False)
    brain_rows = cohort.slab_starts(1, skip_empty=True)
    assert len(all_rows) == cohort.n_slices > len(brain_rows)  # the phantoms have empty top/bottom slices
    loader = data.train_loader(cohort, batch_size=32, seed=0, max_steps=5, skip_empty=True)
    for batch in loader:
        assert (batch["mask"].flatten(1).sum(1) > 0).all()


def test_slabs_are_consecutive_slices_of_one_volume(cohort):
    dataset = data.TrainBatches(cohort, slab_length=3)
    keys = [(i, 0) for i in range(0, len(dataset), 7)]
    batch = dataset[keys]
    assert batch["image"].shape == (3 * len(keys), 1, 16, 16)
    for j, (row, _) in enumerate(keys):
        v, z = dataset.starts[row].tolist()
        torch.testing.assert_close(batch["image"][3 * j:3 * j + 3, 0], cohort.images[v][z:z + 3])
    loader = data.train_loader(cohort, batch_size=8, slab_length=3, seed=0, max_steps=1)
    assert next(iter(loader))["image"].shape[0] == 6  # batch_size // L slabs of L slices


def _batches(loader):
    return [b["image"] for b in loader]


def test_stream_is_a_function_of_seed_and_step(cohort):
    full = _batches(data.train_loader(cohort, batch_size=4, seed=1, max_steps=6, augment=True))
    again = _batches(data.train_loader(cohort, batch_size=4, seed=1, max_steps=6, augment=True))
    tail = _batches(data.train_loader(cohort, batch_size=4, seed=1, max_steps=6, start_step=4, augment=True))
    workers = _batches(data.train_loader(cohort, batch_size=4, seed=1, max_steps=6, augment=True, num_workers=2))
    other = _batches(data.train_loader(cohort, batch_size=4, seed=2, max_steps=6, augment=True))
    for a, b, w in zip(full, again, workers):
        assert torch.equal(a, b) and torch.equal(a, w)
    assert all(torch.equal(a, b) for a, b in zip(full[4:], tail)) and len(tail) == 2
    assert not torch.equal(full[0], other[0])


def test_ranks_split_the_global_batch(cohort):
    single = data.StepSampler(100, per_rank=8, seed=5, start=0, max_steps=3)
    ranks = [data.StepSampler(100, per_rank=4, seed=5, start=0, max_steps=3, rank=r, world=2) for r in (0, 1)]
    for step in range(3):
        assert ranks[0].keys(step) + ranks[1].keys(step) == single.keys(step)


def test_augmentation_probabilities_are_the_papers(cohort):
    transform = data.augmentation()
    image, mask = cohort.slab(0, 6)
    n = 600
    counts = dict.fromkeys(data.AUGMENT_P, 0)
    for i in range(n):
        with data.private_rng(i):
            _, applied = data.augment_slab(image, mask, transform)
        for name in data.AUGMENT_P:
            counts[name] += data.APPLIED_NAME[name] in applied
    for name, p in data.AUGMENT_P.items():
        assert stats.binomtest(counts[name], n, p).pvalue > 1e-3, (name, counts[name] / n, p)


def test_augmented_slices_stay_in_range_and_inside_the_brain(cohort):
    transform = data.augmentation({name: 1.0 for name in data.AUGMENT_P})
    image, mask = cohort.slab(1, 4, 3)
    with data.private_rng(0):
        out, applied = data.augment_slab(image, mask, transform)
    assert len(applied) == 4 and not torch.equal(out, image)
    assert out.min() >= 0 and out.max() <= 1 and (out[mask == 0] == 0).all()


def test_augmentation_does_not_touch_the_global_rng(cohort):
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    data.TrainBatches(cohort, augment=True)[[(0, 11), (5, 12)]]
    assert torch.equal(torch.rand(3), expected)


@pytest.mark.parametrize("slab_length", [1, 5])
def test_validation_covers_every_slice(cohort, slab_length):
    windows = data.ValWindows(cohort, slab_length)
    seen = [set() for _ in range(len(cohort))]
    for v, z in windows.starts:
        seen[v].update(range(z, z + slab_length))
    assert all(s == set(range(cohort.images[v].shape[0])) for v, s in enumerate(seen))
    total = sum(b["image"].shape[0] for b in data.val_loader(cohort, batch_size=8, slab_length=slab_length))
    assert total == len(windows) * slab_length
    if slab_length == 1:
        assert total == cohort.n_slices


def test_validation_subset_is_fixed_and_spread(cohort):
    every = data.ValWindows(cohort).starts
    subset = data.ValWindows(cohort, max_windows=7).starts
    assert len(subset) == 7 and subset == data.ValWindows(cohort, max_windows=7).starts
    assert set(subset) <= set(every) and subset[0] == every[0] and subset[-1] == every[-1]
    assert {v for v, _ in subset} == set(range(len(cohort)))  # every validation volume is represented
    assert data.ValWindows(cohort, max_windows=10**6).starts == every
    batches = list(data.val_loader(cohort, batch_size=4, max_windows=7))
    assert sum(b["image"].shape[0] for b in batches) == 7


def test_phantom_manifest_follows_the_schema(manifest):
    df = pd.read_csv(manifest)
    assert list(df.columns) == ["dataset", "subject_id", "split", "fold", "t1", "t2", "brain_mask", "seg", "site",
                                "skull_stripped", "healthy"]
    assert (df.groupby("fold")["split"].apply(lambda s: (s == "val").sum()) == 1).all()
