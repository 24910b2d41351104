"""Slices of preprocessed volumes for training and validation: cohort cache, sampling, augmentation (paper §4.4).

A :class:`SliceCohort` holds the volumes of one manifest selection (e.g. IXI T2 ``train`` of fold 0) in memory,
loaded with torchio (``ScalarImage`` + ``LabelMap`` in a ``Subject``) and kept as ``[Z, H, W]`` slice stacks
(``volumes.volume_to_slices`` convention). Batches are dicts ``{"image": [B, 1, H, W], "mask": [B, 1, H, W]}``.

- Training (:func:`train_loader`) draws slices **uniformly with replacement** from all slices of the cohort
  (paper §4.2: "slice-wise 2D processing, training samples slices uniformly with replacement");
  ``skip_empty=True`` restricts the draw to slices that contain brain. Models with ``slab_length = L > 1``
  (SVAE) get runs of ``L`` consecutive slices of one volume instead, ``batch_size // L`` runs per batch.
- The draw of step ``s`` is a pure function of ``(seed, s)``: a resumed run sees exactly the batches an
  uninterrupted one would, with any number of loader workers, and ``world`` data-parallel processes split one
  global batch of ``world · batch_size`` (rank ``r`` takes rows ``r·B … (r+1)·B − 1``).
- Validation (:func:`val_loader`) iterates over all slices in order (for slab models: consecutive windows of
  ``L`` slices covering every slice; the last window of a volume is aligned to its end).

Augmentation (paper §4.4, torchio): RandomBlur p = 0.25, RandomBiasField p = 0.25, RandomGamma p = 0.5,
RandomGhosting p = 0.5, torchio's default ranges (the paper gives none), drawn independently per training sample
(a slab gets one draw for all its slices). Afterwards intensities are clipped to ``[0, 1]`` and everything
outside the brain mask is set back to 0: bias field and gamma can leave the preprocessed range and blur and
ghosting leak signal into the background, which preprocessing guarantees to be 0 (architecture, "Volumes").
Each sample is augmented under its own seed in a private RNG, so augmentation never disturbs (nor depends on)
the model's random numbers.
"""
from __future__ import annotations

import contextlib
import warnings
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import pandas as pd
import torch
import torchio as tio
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Sampler

from .fingerprint import record_fingerprint, tensors_fingerprint
from .volumes import VolumeError

#: paper §4.4: augmentation probabilities (torchio transform -> p)
AUGMENT_P: dict[str, float] = {"RandomBlur": 0.25, "RandomBiasField": 0.25, "RandomGamma": 0.5,
                               "RandomGhosting": 0.5}
#: name torchio records in a subject's history when the transform was applied
APPLIED_NAME: dict[str, str] = {"RandomBlur": "Blur", "RandomBiasField": "BiasField", "RandomGamma": "Gamma",
                                "RandomGhosting": "Ghosting"}
_STEP_STREAM = 0x5A17  # distinguishes the sampling stream from other derived seeds


def derive_seed(*keys: int) -> int:
    """A 63-bit seed mixed from integer ``keys`` (numpy ``SeedSequence``; independent streams per key tuple)."""
    state = np.random.SeedSequence([int(k) % 2**63 for k in keys]).generate_state(2, dtype=np.uint32)
    return int(state[0]) << 31 ^ int(state[1])


# --------------------------------------------------------------------------------------------------------------
# Manifest selection and the in-memory cohort


def read_manifest(path: str | Path) -> pd.DataFrame:
    """Read a preprocessed manifest (architecture schema); relative paths resolve against its folder."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"manifest {path} does not exist; run the preprocessing stage (notebook 01) first")
    df = pd.read_csv(path, dtype={"subject_id": str}, keep_default_na=False)
    missing = {"dataset", "subject_id", "split", "fold", "t1", "t2", "brain_mask"} - set(df.columns)
    if missing:
        raise ValueError(f"{path}: manifest lacks column(s) {sorted(missing)}")
    for col in ("t1", "t2", "brain_mask", "seg"):
        if col in df.columns:
            df[col] = [str(p if Path(p).is_absolute() else (path.parent / p).resolve()) if p else ""
                       for p in df[col].astype(str)]
    df["fold"] = df["fold"].astype(int)
    return df


def select_rows(df: pd.DataFrame, *, dataset: str, split: str, fold: int | None, weighting: str,
                where: str = "manifest") -> pd.DataFrame:
    """Rows of ``dataset``/``split`` (and ``fold`` unless None) that have a ``weighting`` image, each with a mask.

    Subjects without a ``weighting`` image are left out with a warning naming them: the published IXI split lists
    subjects whose T2 does not exist (``has_t2 = 0``), which the T1 models use and the T2 models cannot. A subject
    with the image but without a brain mask is an error (its preprocessing did not finish).
    """
    rows = df[(df["dataset"] == dataset) & (df["split"] == split)]
    if fold is not None:
        rows = rows[rows["fold"] == int(fold)]
    if rows.empty:
        folds = sorted(df.loc[(df["dataset"] == dataset) & (df["split"] == split), "fold"].unique().tolist())
        raise ValueError(f"{where}: no {dataset} {split} rows for fold {fold}; folds present: {folds}")
    lacking = rows.loc[rows[weighting] == "", "subject_id"].tolist()
    if len(lacking) == len(rows):
        raise ValueError(f"{where}: none of the {len(rows)} {dataset} {split} subject(s) (fold {fold}) has a "
                         f"{weighting!r} file")
    if lacking:
        warnings.warn(f"{where}: {len(lacking)} {dataset} {split} subject(s) (fold {fold}) without a {weighting!r} "
                      f"image left out: {lacking[:10]}", stacklevel=2)
        rows = rows[rows[weighting] != ""]
    empty = rows.loc[rows["brain_mask"] == "", "subject_id"].tolist()
    if empty:
        raise ValueError(f"{where}: {dataset} {split} subject(s) {empty[:5]} have no 'brain_mask' file")
    return rows.reset_index(drop=True)


class SliceCohort:
    """Volumes of one selection cached as slice stacks: ``images[v]: [Z, H, W]`` float32, ``masks[v]`` uint8."""

    def __init__(self, images: Sequence[Tensor], masks: Sequence[Tensor], subject_ids: Sequence[str]) -> None:
        if not images:
            raise ValueError("SliceCohort: no volumes")
        shapes = {tuple(im.shape[1:]) for im in images}
        if len(shapes) != 1:
            raise ValueError(f"SliceCohort: slices differ in size across volumes: {sorted(shapes)}")
        self.images = [im.float().contiguous() for im in images]
        self.masks = [m.to(torch.uint8).contiguous() for m in masks]
        self.subject_ids = list(subject_ids)
        self.image_size: tuple[int, int] = shapes.pop()  # type: ignore[assignment]

    @classmethod
    def from_manifest(cls, manifest: str | Path | pd.DataFrame, *, split: str, fold: int | None, weighting: str,
                      dataset: str = "IXI") -> "SliceCohort":
        """Load (torchio) every volume of the selection, e.g. IXI T2 ``train`` of fold 0."""
        df = read_manifest(manifest) if not isinstance(manifest, pd.DataFrame) else manifest
        rows = select_rows(df, dataset=dataset, split=split, fold=fold, weighting=weighting, where=str(manifest))
        images, masks = [], []
        for row in rows.itertuples(index=False):
            image, mask = load_subject(getattr(row, weighting), row.brain_mask)
            images.append(image)
            masks.append(mask)
        return cls(images, masks, rows["subject_id"].tolist())

    def __len__(self) -> int:
        return len(self.images)

    def fingerprint(self) -> str:
        """SHA-1 of the subject ids, slice stacks and masks (:mod:`cddpm_lib.fingerprint`): equal for the same
        data, whatever files they were read from."""
        return record_fingerprint([self.subject_ids, tensors_fingerprint([*self.images, *self.masks])])

    @property
    def n_slices(self) -> int:
        return sum(im.shape[0] for im in self.images)

    def slab_starts(self, slab_length: int = 1, skip_empty: bool = False) -> Tensor:
        """``[N, 2]`` (volume, first slice) of every run of ``slab_length`` consecutive slices; with
        ``skip_empty`` only runs whose every slice contains brain."""
        out = []
        for v, mask in enumerate(self.masks):
            z_count = mask.shape[0]
            if z_count < slab_length:
                raise ValueError(f"subject {self.subject_ids[v]}: {z_count} slices < slab_length {slab_length}")
            ok = mask.flatten(1).any(1) if skip_empty else torch.ones(z_count, dtype=torch.bool)
            runs = ok.unfold(0, slab_length, 1).all(1)
            z = torch.nonzero(runs).flatten()
            out.append(torch.stack([torch.full_like(z, v), z], 1))
        starts = torch.cat(out)
        if len(starts) == 0:
            raise ValueError("SliceCohort: no slice contains brain; check the brain masks")
        return starts

    def slab(self, v: int, z: int, length: int = 1) -> tuple[Tensor, Tensor]:
        """Slices ``z … z+length−1`` of volume ``v``: ``(image [L, 1, H, W], mask [L, 1, H, W] float)``."""
        return self.images[v][z:z + length, None].clone(), self.masks[v][z:z + length, None].float()


def load_subject(image_path: str | Path, mask_path: str | Path) -> tuple[Tensor, Tensor]:
    """One preprocessed volume and its brain mask via torchio -> ``([Z, X, Y] float, [Z, X, Y] uint8)``."""
    subject = tio.Subject(image=tio.ScalarImage(image_path), mask=tio.LabelMap(mask_path))
    for p in (image_path, mask_path):
        if not Path(p).exists():
            raise VolumeError(f"{p}: file does not exist")
    try:
        subject.load()
        subject.check_consistent_spatial_shape()
    except Exception as exc:
        raise VolumeError(f"{image_path} / {mask_path}: cannot be loaded together ({exc})") from exc
    image = subject["image"].data[0].permute(2, 0, 1).float()
    mask = (subject["mask"].data[0].permute(2, 0, 1) > 0).to(torch.uint8)
    if not torch.isfinite(image).all() or image.min() < -1e-4 or image.max() > 1 + 1e-4:
        raise VolumeError(f"{image_path}: intensities must lie in [0, 1] after preprocessing, found "
                          f"[{float(image.min()):.3g}, {float(image.max()):.3g}]")
    return image.clamp(0, 1), mask


# --------------------------------------------------------------------------------------------------------------
# Augmentation


def augmentation(probabilities: dict[str, float] | None = None) -> tio.Compose:
    """The paper's torchio augmentation (§4.4) with probabilities ``AUGMENT_P`` (override per transform)."""
    p = {**AUGMENT_P, **(probabilities or {})}
    unknown = set(p) - set(AUGMENT_P)
    if unknown:
        raise ValueError(f"augmentation: unknown transform(s) {sorted(unknown)}; known: {sorted(AUGMENT_P)}")
    # copy=False: every sample is a fresh Subject, torchio's defensive deep copies would only cost time
    return tio.Compose([getattr(tio, name)(p=prob, copy=False) for name, prob in p.items()], copy=False)


@contextlib.contextmanager
def private_rng(seed: int, threads: int = 1) -> Iterator[None]:
    """Run a block on torch's CPU RNG seeded with ``seed`` (restored afterwards) and ``threads`` threads
    (torchio's FFT-based transforms are ~20× slower on several threads for single slices)."""
    n = torch.get_num_threads()
    with torch.random.fork_rng(devices=[]):
        torch.random.default_generator.manual_seed(seed)  # CPU only: torchio draws on the CPU
        torch.set_num_threads(threads)
        try:
            yield
        finally:
            torch.set_num_threads(n)


def augment_slab(image: Tensor, mask: Tensor, transform: tio.Transform) -> tuple[Tensor, list[str]]:
    """Augment ``image: [L, 1, H, W]`` (one draw for the whole slab) -> ``(image in [0, 1], 0 outside mask;
    names of the transforms applied)``. Uses torch's global RNG: call inside :func:`private_rng`."""
    vol = image[:, 0].permute(1, 2, 0)[None]  # [1, H, W, L]: torchio's (C, W, H, D)
    lab = mask[:, 0].permute(1, 2, 0)[None].to(torch.uint8)
    out = transform(tio.Subject(image=tio.ScalarImage(tensor=vol), mask=tio.LabelMap(tensor=lab)))
    aug = out["image"].data[0].permute(2, 0, 1)[:, None].float()
    aug = aug.clamp(0.0, 1.0) * mask
    return aug, [t.name for t in out.get_applied_transforms()]


# --------------------------------------------------------------------------------------------------------------
# Training stream and validation batches


class StepSampler(Sampler):
    """Yields, for each step ``start … max_steps−1``, this rank's keys ``[(row, sample_seed), …]``.

    Rows are drawn uniformly with replacement from ``n_rows`` from a generator seeded by ``(seed, step)``.
    """

    def __init__(self, n_rows: int, per_rank: int, seed: int, start: int, max_steps: int, rank: int = 0,
                 world: int = 1) -> None:
        self.n_rows, self.per_rank, self.seed = int(n_rows), int(per_rank), int(seed)
        self.start, self.max_steps, self.rank, self.world = int(start), int(max_steps), int(rank), int(world)

    def keys(self, step: int) -> list[tuple[int, int]]:
        g = torch.Generator().manual_seed(derive_seed(self.seed, _STEP_STREAM, step))
        total = self.per_rank * self.world
        rows = torch.randint(self.n_rows, (total,), generator=g)
        seeds = torch.randint(2**62, (total,), generator=g)
        part = slice(self.rank * self.per_rank, (self.rank + 1) * self.per_rank)
        return list(zip(rows[part].tolist(), seeds[part].tolist()))

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        for step in range(self.start, self.max_steps):
            yield self.keys(step)

    def __len__(self) -> int:
        return max(0, self.max_steps - self.start)


class TrainBatches(Dataset):
    """Map from a step's keys to a batch ``{"image": [n·L, 1, H, W], "mask": …}`` (augmented if asked)."""

    def __init__(self, cohort: SliceCohort, slab_length: int = 1, skip_empty: bool = False,
                 augment: bool = False) -> None:
        self.cohort, self.slab_length = cohort, int(slab_length)
        self.starts = cohort.slab_starts(self.slab_length, skip_empty)
        self.transform = augmentation() if augment else None

    def __len__(self) -> int:
        return len(self.starts)

    def __getitem__(self, keys: list[tuple[int, int]]) -> dict[str, Tensor]:
        images, masks = [], []
        for row, sample_seed in keys:
            v, z = self.starts[row].tolist()
            image, mask = self.cohort.slab(v, z, self.slab_length)
            if self.transform is not None:
                with private_rng(sample_seed):
                    image, _ = augment_slab(image, mask, self.transform)
            images.append(image)
            masks.append(mask)
        return {"image": torch.cat(images), "mask": torch.cat(masks)}


def train_loader(cohort: SliceCohort, *, batch_size: int, seed: int, max_steps: int, start_step: int = 0,
                 slab_length: int = 1, skip_empty: bool = False, augment: bool = False, num_workers: int = 0,
                 rank: int = 0, world: int = 1, pin_memory: bool = False) -> DataLoader:
    """Endless-by-step training batches (one per step ``start_step … max_steps−1``); see the module docstring.

    ``batch_size`` counts slices per process; slab models get ``max(1, batch_size // slab_length)`` slabs.
    """
    dataset = TrainBatches(cohort, slab_length, skip_empty, augment)
    per_rank = max(1, batch_size // slab_length)
    sampler = StepSampler(len(dataset), per_rank, seed, start_step, max_steps, rank, world)
    return DataLoader(dataset, sampler=sampler, batch_size=None, num_workers=num_workers, pin_memory=pin_memory,
                      generator=torch.Generator().manual_seed(seed), prefetch_factor=2 if num_workers else None)


class ValWindows(Dataset):
    """All slices of a cohort in order, as windows of ``slab_length`` slices (the last one end-aligned); with
    ``max_windows`` > 0 only that many of them, evenly spaced over the cohort (the same ones at every validation)."""

    def __init__(self, cohort: SliceCohort, slab_length: int = 1, max_windows: int = 0) -> None:
        self.cohort, self.slab_length = cohort, int(slab_length)
        starts = []
        for v, image in enumerate(cohort.images):
            z_count = image.shape[0]
            if z_count < slab_length:
                raise ValueError(f"subject {cohort.subject_ids[v]}: {z_count} slices < slab_length {slab_length}")
            zs = list(range(0, z_count - slab_length + 1, slab_length))
            if zs[-1] != z_count - slab_length:
                zs.append(z_count - slab_length)
            starts += [(v, z) for z in zs]
        if 0 < max_windows < len(starts):  # a fixed, evenly spaced subset: every volume and depth stays represented
            starts = [starts[i] for i in np.linspace(0, len(starts) - 1, max_windows).round().astype(int)]
        self.starts = starts

    def __len__(self) -> int:
        return len(self.starts)

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor]:
        return self.cohort.slab(*self.starts[i], self.slab_length)


def _cat_windows(items: list[tuple[Tensor, Tensor]]) -> dict[str, Tensor]:
    return {"image": torch.cat([a for a, _ in items]), "mask": torch.cat([b for _, b in items])}


def val_loader(cohort: SliceCohort, *, batch_size: int, slab_length: int = 1, max_windows: int = 0) -> DataLoader:
    """Validation batches over all slices (or ``max_windows`` evenly spaced ones), in order (no augmentation,
    no randomness)."""
    windows = ValWindows(cohort, slab_length, max_windows)
    return DataLoader(windows, batch_size=max(1, batch_size // slab_length), shuffle=False,
                      collate_fn=_cat_windows)


# --------------------------------------------------------------------------------------------------------------
# A phantom cohort in the manifest schema (tests, benchmarks, trying stages 02/03 without stages 00–01)


def phantom_volume(shape: tuple[int, int, int], rng: np.random.Generator, weighting: str = "t2"
                   ) -> tuple[np.ndarray, np.ndarray]:
    """Ellipsoidal "brain" with smooth texture and a ventricle-like core: ``(image [X, Y, Z] in [0, 1], mask)``.

    The top and bottom axial slices lie outside the ellipsoid (empty slices exist, as in real volumes).
    """
    from scipy.ndimage import gaussian_filter

    grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, s) for s in shape], indexing="ij"))
    radii = np.array([0.8, 0.9, 0.75]) * rng.uniform(0.9, 1.05, 3)
    r2 = ((grid / radii[:, None, None, None]) ** 2).sum(0)
    mask = r2 <= 1.0
    texture = gaussian_filter(rng.standard_normal(shape), sigma=max(1.0, shape[0] / 16))
    texture = texture / (np.abs(texture).max() + 1e-8)
    core = ((grid / (0.35 * radii[:, None, None, None])) ** 2).sum(0) <= 1.0
    tissue, csf = (0.55, 0.95) if weighting == "t2" else (0.75, 0.2)
    image = np.where(core, csf, tissue) + 0.15 * texture + 0.1 * (1 - r2.clip(0, 1))
    return (np.clip(image, 0, 1) * mask).astype(np.float32), mask.astype(np.uint8)


def write_phantom_cohort(root: str | Path, *, shape: tuple[int, int, int] = (32, 32, 16), n_subjects: int = 6,
                         n_val: int = 2, folds: Sequence[int] = (0,), seed: int = 0) -> Path:
    """Write ``n_subjects`` IXI phantoms (T1, T2, brain mask) and ``preprocessed_manifest.csv`` under ``root``.

    Fold ``k`` validates on ``n_val`` subjects (rotating with ``k``) and trains on the rest. Returns the path.
    """
    from .volumes import save_dataframe, save_nifti

    root = Path(root)
    rng = np.random.default_rng(seed)
    rows = []
    subjects = [f"IXI{i:03d}" for i in range(n_subjects)]
    for sid in subjects:
        files = {}
        for w in ("t2", "t1"):
            image, mask = phantom_volume(shape, np.random.default_rng(rng.integers(2**32)), w)
            files[w] = save_nifti(image, np.eye(4), root / "preprocessed" / "IXI" / sid / f"{w}.nii.gz")
        files["brain_mask"] = save_nifti(mask, np.eye(4), root / "preprocessed" / "IXI" / sid / "brain_mask.nii.gz",
                                         dtype=np.uint8)
        files = {k: str(p.relative_to(root)) for k, p in files.items()}
        for k in folds:
            val = {subjects[(k * n_val + j) % n_subjects] for j in range(n_val)}
            rows.append({"dataset": "IXI", "subject_id": sid, "split": "val" if sid in val else "train",
                         "fold": k, **files, "seg": "", "site": "phantom", "skull_stripped": 1, "healthy": 1})
    df = pd.DataFrame(rows)[["dataset", "subject_id", "split", "fold", "t1", "t2", "brain_mask", "seg", "site",
                             "skull_stripped", "healthy"]]
    return save_dataframe(df, root / "preprocessed_manifest.csv")
