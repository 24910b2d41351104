"""Pre-processing of raw brain MRIs into the kit's volumes (paper §4.2, after Baur et al. 2021).

Per subject:

1. resample to isotropic ``spacing_mm`` (cubic B-spline; masks/segmentations nearest neighbour),
2. affine registration to a template (Mattes mutual information, multi-resolution, rigid then affine; default
   the MNI152 T1 shipped with nilearn, or a user template such as SRI24's T1 given by path),
3. skull stripping: deepbet (default), HD-BET (the paper's tool) when installed and selected, or the registered
   template's brain mask (``template``, no network); inputs that come skull-stripped (``skull_stripped=1``,
   BraTS) take the mask from the image,
4. crop of black borders to the brain's bounding box,
5. N4 bias-field correction inside the brain mask (fitted on a shrunk image, applied at full resolution),
6. pad/crop to a common size, downsample, drop axial slices (paper: 192×192×160 → 96×96×80 → 96×96×50) and
   rescale intensities to [0, 1] from the 1st/99th percentile inside the brain mask (clipped, background 0),
7. write t1/t2, brain mask and a binary segmentation (all labels > 0 fused) with their affines.

Order. The paper registers before skull stripping. The templates available offline (nilearn's MNI152, and
SRI24) are brain-only, and mutual information between a head with skull, neck and background noise and a
brain-only template has wrong optima: on the synthetic cohort the head-to-template registration enlarged the
brain by 10–30 % for a third of the subjects (template-mask Dice 0.65–0.80), with the true transform scoring
*worse*. So deepbet/HD-BET run first, in the subject's space (both are pose-independent), and the brain-only
image is registered to the brain-only template (Dice 0.95–0.97 on every subject checked); the mask follows the
same transform. The result is the paper's: a skull-stripped brain in template space. ``skull_strip="template"``
keeps the paper's order (register the head, then take the template's mask): it needs no network but is only
reliable for heads without neck and background noise, or data already near template space (ATLAS); the QC table
records the method and, where the raw manifest has a brain mask, its Dice.

Steps 1–2 are composed into a single resampling when writing: the isotropic image serves skull stripping and
registration; the final volumes are interpolated once from the raw scan. The registration uses a fixed-image
mask (the template brain mask, dilated). One transform per subject is estimated on ``registration_weighting``
and applied to its masks; every other weighting of the session is first aligned rigidly to that scan
(``align_weightings``, Mattes MI over the head: motion between the sequences) and warped through both
transforms in one resampling. The QC row records each alignment's rotation and shift.

Real data (``$CDDPM_REAL_DATA``, manifests in ``data_manifests/``):

* **IXI** — T1 and T2 of the same session from Guy's (``IXI…-Guys-…``), Hammersmith (``-HH-``) and IoP (``-IOP-``)
  hospitals; T1 (sagittal) and T2 (axial) have different voxel grids but share world coordinates, so the transform
  estimated on one applies to the other up to patient motion between the sequences, which the rigid alignment
  of the T2 to the T1 takes out. Healthy: no ``seg``.
* **BraTS21** — already skull-stripped and in SRI24 space at 1 mm; labels {1, 2, 4} are fused to one tumour mask;
  skull stripping is skipped and the brain mask is ``image > 0`` (holes filled, largest component).
* **MSLUB** — raw T1/T2/FLAIR with the three-rater *consensus* lesion segmentation as ``seg``; needs skull stripping.
* **ATLAS v2** — T1 only, already in MNI152 space: registration to the default template converges near identity.
* **WMH** — T1 (+FLAIR) from three sites (Utrecht, Singapore, Amsterdam); label 1 = WMH, label 2 = other
  pathology; both are fused by the ``> 0`` rule.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import subprocess
import tempfile
import time
import traceback
from concurrent.futures import ProcessPoolExecutor, as_completed
from functools import lru_cache
from multiprocessing import get_context
from pathlib import Path
from typing import Any, ClassVar, Literal

import numpy as np
import pandas as pd
import SimpleITK as sitk
from scipy import ndimage

from . import manifests, paths
from .config import ConfigError, StageConfig
from .volumes import load_nifti, save_dataframe, save_json, save_nifti

WEIGHTINGS = ("t1", "t2")
PIPELINE_VERSION = 1  # bump when the algorithm changes: subjects done by an older version are redone
STEPS = ("load", "resample", "skull_strip", "register", "align", "warp", "crop", "n4", "resize", "rescale", "write")
#: an alignment of two scans of one session rotating or shifting more than this counts as diverged
MAX_ALIGN_DEG, MAX_ALIGN_MM = 20.0, 30.0
_LPS = np.diag([-1.0, -1.0, 1.0])  # NIfTI/nibabel (RAS) <-> ITK (LPS)


class PreprocessingError(RuntimeError):
    """A subject failed, or subjects failed and failures are not allowed; the message names them."""


@dataclasses.dataclass(frozen=True)
class PreprocessConfig(StageConfig):
    """Stage ``preprocessing`` (notebook ``01_preprocessing.ipynb``); defaults are paper §4.2.

    The final shape is ``pad_shape // downsample`` minus ``drop_slices`` axial slices (paper 96×96×50).
    ``from_namespace``: parameters left at ``None`` take ``profiles/preprocessing.yaml``'s value (``papermill -p
    profile smoke`` alone is a smoke run).
    """

    STAGE: ClassVar[str] = "preprocessing"
    profile: str = "paper"
    source: str = "real"
    spacing_mm: float = 1.0  # isotropic working resolution, paper: 1 mm
    template: str = "mni152"  # 'mni152' (nilearn, offline) or a NIfTI path (e.g. SRI24 T1)
    template_mask: str = ""  # brain mask of a path template; empty: template > 0
    registration_weighting: Literal["t1", "t2"] = "t1"  # transform estimated on this image when present
    align_weightings: bool = True  # align the other weightings rigidly to it first (motion between sequences)
    anti_alias: bool = True  # smooth a scan finer than spacing_mm before the final resampling (see anti_alias)
    registration_shrink: tuple[int, ...] = (4, 2, 1)  # multi-resolution pyramid
    registration_sampling: float = 0.05  # fraction of fixed voxels sampled by Mattes MI
    registration_iterations: int = 200
    registration_mask_dilation_mm: float = 6.0  # fixed-image mask = template brain mask dilated
    max_scale: float = 1.5  # a transform scaling by more than this (or 1/this) counts as diverged
    skull_strip: Literal["deepbet", "hdbet", "template"] = "deepbet"
    deepbet_shape: int = 256  # deepbet's network input size (its default); 192 is 2x faster
    n4_shrink: int = 4  # N4 fitted on the image shrunk by this factor
    n4_iterations: tuple[int, ...] = (50, 50, 50, 50)  # per fitting level
    pad_shape: tuple[int, int, int] = (192, 192, 160)  # common size at spacing_mm
    downsample: int = 2  # paper: resolution reduced by a factor of two
    drop_slices: tuple[int, int] = (15, 15)  # axial slices removed at the (bottom, top)
    percentiles: tuple[float, float] = (1.0, 99.0)  # intensity rescaling inside the brain mask
    weightings: tuple[str, ...] = ("t1", "t2")  # written when present in the raw manifest
    min_brain_ml: float = 500.0  # a smaller brain mask is a failure ("empty mask")
    n_jobs: int = 2  # parallel subject processes
    allow_failures: bool = False  # notebook: raise when any subject failed unless True
    montage_subjects: int = 3  # subjects shown before/after in the notebook

    def validate(self) -> None:
        paths.check_profile(self.profile)
        paths.check_source(self.source)
        if self.spacing_mm <= 0:
            raise ConfigError(f"spacing_mm must be > 0, got {self.spacing_mm}")
        if any(s % self.downsample for s in self.pad_shape):
            raise ConfigError(f"pad_shape {self.pad_shape} must be divisible by downsample={self.downsample}")
        if sum(self.drop_slices) >= self.pad_shape[2] // self.downsample:
            raise ConfigError(f"drop_slices {self.drop_slices} removes every axial slice")
        if not set(self.weightings) <= set(WEIGHTINGS) or not self.weightings:
            raise ConfigError(f"weightings {self.weightings} must be a non-empty subset of {WEIGHTINGS}")
        if not 0 < self.registration_sampling <= 1 or self.n4_shrink < 1 or self.n_jobs < 1:
            raise ConfigError("registration_sampling in (0, 1], n4_shrink >= 1 and n_jobs >= 1 are required")
        if not 0 <= self.percentiles[0] < self.percentiles[1] <= 100:
            raise ConfigError(f"percentiles {self.percentiles} must satisfy 0 <= low < high <= 100")

    @property
    def output_shape(self) -> tuple[int, int, int]:
        x, y, z = (s // self.downsample for s in self.pad_shape)
        return x, y, z - sum(self.drop_slices)

    def signature(self) -> str:
        """Hash of the fields that change the outputs (resumed subjects must match it)."""
        runtime = {"profile", "source", "n_jobs", "allow_failures", "montage_subjects"}
        d = {k: v for k, v in self.to_dict().items() if k not in runtime} | {"version": PIPELINE_VERSION}
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


# ---------------------------------------------------------------------------------------------------- conversions


def to_sitk(array: np.ndarray, affine: np.ndarray) -> sitk.Image:
    """``array [X, Y, Z]`` with a RAS ``affine [4, 4]`` -> SimpleITK image (LPS geometry)."""
    a = _LPS @ np.asarray(affine, float)[:3, :3]
    spacing = np.linalg.norm(a, axis=0)
    img = sitk.GetImageFromArray(np.ascontiguousarray(np.transpose(array, (2, 1, 0))))
    img.SetSpacing(spacing.tolist())
    img.SetDirection((a / spacing).flatten().tolist())
    img.SetOrigin((_LPS @ np.asarray(affine, float)[:3, 3]).tolist())
    return img


def sitk_affine(img: sitk.Image) -> np.ndarray:
    """RAS voxel-to-world affine ``[4, 4]`` of a SimpleITK image's grid."""
    affine = np.eye(4)
    affine[:3, :3] = _LPS @ (np.asarray(img.GetDirection()).reshape(3, 3) * np.asarray(img.GetSpacing()))
    affine[:3, 3] = _LPS @ np.asarray(img.GetOrigin())
    return affine


def from_sitk(img: sitk.Image) -> tuple[np.ndarray, np.ndarray]:
    """SimpleITK image -> ``(array [X, Y, Z], RAS affine [4, 4])``; inverse of :func:`to_sitk`."""
    return np.transpose(sitk.GetArrayFromImage(img), (2, 1, 0)), sitk_affine(img)


# --------------------------------------------------------------------------------- steps 1–2: resampling, template


def anti_alias(image: sitk.Image, spacing_mm: float) -> sitk.Image:
    """Smooth the axes of ``image`` finer than ``spacing_mm`` before resampling to that spacing (anti-aliasing).

    Gaussian of sigma ``0.5·sqrt(new² − old²)`` mm per axis (none on axes already as coarse); float32 out. On the
    coarse quick/smoke grids it halves the registration error on 6 mm grids and keeps the 3 mm images free of the
    aliasing of a 2 mm scan sampled directly; at the paper's 1 mm it is a 0.2 mm blur of 0.94 mm axes or nothing.
    """
    sigma = [0.5 * np.sqrt(max(spacing_mm ** 2 - s ** 2, 0.0)) for s in image.GetSpacing()]
    image = sitk.Cast(image, sitk.sitkFloat32)
    for axis, sig in enumerate(sigma):
        if sig > 0:
            image = sitk.RecursiveGaussian(image, sig, False, sitk.RecursiveGaussianImageFilter.ZeroOrder, axis)
    return image


def resample_isotropic(image: sitk.Image, spacing_mm: float, *, label: bool = False) -> sitk.Image:
    """Step 1 (§4.2): resample to ``spacing_mm`` isotropic, same field of view; B-spline, labels nearest.

    Images are anti-aliased first (:func:`anti_alias`); labels are not.
    """
    size = [max(1, int(round(n * s / spacing_mm))) for n, s in zip(image.GetSize(), image.GetSpacing())]
    interp = sitk.sitkNearestNeighbor if label else sitk.sitkBSpline
    pixel = image.GetPixelID()
    if not label:
        image = anti_alias(image, spacing_mm)
        pixel = image.GetPixelID()
    return sitk.Resample(image, size, sitk.Transform(), interp, image.GetOrigin(), (spacing_mm,) * 3,
                         image.GetDirection(), 0.0, pixel)


@lru_cache(maxsize=4)
def load_template(template: str = "mni152", template_mask: str = "") -> tuple[sitk.Image, sitk.Image]:
    """Template T1 and its brain mask, reoriented to RAS so that the last array axis is axial.

    ``"mni152"``: nilearn's MNI152 2009 T1 at 1 mm (brain only, ships with nilearn). A path (e.g. SRI24's
    T1) uses ``template_mask`` when given, else ``template > 0`` (brain-only templates).
    """
    import nibabel as nib

    if template == "mni152":
        from nilearn import datasets

        img, msk = datasets.load_mni152_template(resolution=1), datasets.load_mni152_brain_mask(resolution=1)
    else:
        if not Path(template).exists():
            raise ConfigError(f"template {template!r} does not exist; give 'mni152' or a NIfTI path")
        img = nib.load(template)
        msk = nib.load(template_mask) if template_mask else nib.Nifti1Image(
            (np.asanyarray(img.dataobj) > 0).astype(np.uint8), img.affine)
    img, msk = nib.as_closest_canonical(img), nib.as_closest_canonical(msk)
    t = to_sitk(np.asarray(img.dataobj, np.float32), img.affine)
    m = to_sitk((np.asarray(msk.dataobj) > 0).astype(np.uint8), msk.affine)
    return t, sitk.Resample(m, t, sitk.Transform(), sitk.sitkNearestNeighbor, 0)


@lru_cache(maxsize=4)
def template_grid(template: str, template_mask: str, spacing_mm: float,
                  dilation_mm: float) -> tuple[sitk.Image, sitk.Image, sitk.Image]:
    """Template, brain mask and dilated registration mask on the template's field of view at ``spacing_mm``."""
    t, m = load_template(template, template_mask)
    fixed = resample_isotropic(t, spacing_mm)
    grid = sitk.Resample(m, fixed, sitk.Transform(), sitk.sitkNearestNeighbor, 0)
    radius = max(1, int(round(dilation_mm / spacing_mm)))
    return fixed, grid, sitk.BinaryDilate(grid, [radius] * 3)


def _mattes_mi(fixed: sitk.Image, moving: sitk.Image, initial: sitk.Transform, fixed_mask: sitk.Image | None,
               shrink: tuple[int, ...], sampling: float, iterations: int, seed: int) -> tuple[sitk.Transform, float]:
    """One multi-resolution Mattes-MI optimisation (Gaussian sigmas ``shrink / 2`` voxels per level); the fixed
    ``seed`` of the random metric samples and a single thread (the metric's per-thread partial sums are added in
    a thread-count-dependent order) make the result identical whatever ``n_jobs`` and the machine's cores."""
    reg = sitk.ImageRegistrationMethod()
    reg.SetNumberOfThreads(1)
    reg.SetMetricAsMattesMutualInformation(numberOfHistogramBins=32)
    reg.SetMetricSamplingStrategy(reg.RANDOM)
    if seed <= 0:
        raise ValueError(f"seed must be > 0 (ITK reads 0 as 'seed from the wall clock'), got {seed}")
    reg.SetMetricSamplingPercentage(sampling, seed)
    if fixed_mask is not None:
        reg.SetMetricFixedMask(sitk.Cast(fixed_mask, sitk.sitkUInt8))
    reg.SetInterpolator(sitk.sitkLinear)
    reg.SetOptimizerAsRegularStepGradientDescent(learningRate=1.0, minStep=1e-4, numberOfIterations=iterations,
                                                 relaxationFactor=0.5)
    reg.SetOptimizerScalesFromPhysicalShift()
    reg.SetShrinkFactorsPerLevel(list(shrink))
    reg.SetSmoothingSigmasPerLevel([s / 2 if s > 1 else 0 for s in shrink])
    reg.SetInitialTransform(initial, inPlace=False)
    out = reg.Execute(fixed, moving)
    if out.GetName() == "CompositeTransform":
        out = sitk.CompositeTransform(out).GetNthTransform(0)
    return out, float(reg.GetMetricValue())


def register_affine(fixed: sitk.Image, moving: sitk.Image, fixed_mask: sitk.Image | None = None, *,
                    shrink: tuple[int, ...] = (4, 2, 1), sampling: float = 0.05, iterations: int = 200,
                    seed: int = 1) -> tuple[sitk.AffineTransform, float]:
    """Step 2 (§4.2): affine registration with Mattes mutual information, multi-resolution.

    Rigid first (moments-initialised, whole pyramid ``shrink``), then affine from the rigid result (the last two
    levels): fitting 12 parameters at once from the moments let MI trade scale against the skull (template-derived
    heads with skull, 3 mm grid, known pose: mean errors 8–12 mm for two of three subjects; rigid then affine:
    0.7–0.8 mm for all). The pipeline registers the skull-stripped brain (see the module docstring).
    Returns the transform mapping *fixed* (template) points to *moving* (subject) points — what
    ``sitk.Resample(moving, fixed, transform)`` needs — and the final metric value (lower is better).
    """
    moving = sitk.Cast(moving, sitk.sitkFloat32)
    fixed = sitk.Cast(fixed, sitk.sitkFloat32)
    init = sitk.CenteredTransformInitializer(fixed, moving, sitk.VersorRigid3DTransform(),
                                             sitk.CenteredTransformInitializerFilter.MOMENTS)
    rigid, _ = _mattes_mi(fixed, moving, init, fixed_mask, shrink, sampling, iterations, seed)
    rigid = sitk.VersorRigid3DTransform(rigid)
    affine = sitk.AffineTransform(3)
    affine.SetCenter(rigid.GetCenter())
    affine.SetMatrix(rigid.GetMatrix())
    affine.SetTranslation(rigid.GetTranslation())
    out, metric = _mattes_mi(fixed, moving, affine, fixed_mask, shrink[-2:], sampling, iterations, seed)
    return sitk.AffineTransform(out), metric


def register_rigid(fixed: sitk.Image, moving: sitk.Image, fixed_mask: sitk.Image | None = None, *,
                   shrink: tuple[int, ...] = (4, 2, 1), sampling: float = 0.05, iterations: int = 200,
                   seed: int = 1) -> tuple[sitk.VersorRigid3DTransform, float]:
    """Rigid alignment of another scan of the same session (e.g. the T2) to ``fixed`` (the scan the template
    transform was estimated on), Mattes mutual information over ``fixed_mask`` (the pipeline passes none: the
    whole head, skull and scalp included, moves as one body between the sequences and anchors the fit; restricted
    to the T1's brain mask, 1 in 6 synthetic quick-profile sessions of one pose went 16 degrees astray, over the
    head none did).

    Starts from the identity: the scans of one session share world coordinates, and only head motion between the
    sequences separates them (centring their fields of view, as a moments or geometry initialiser would, would
    add the difference of the two fields of view instead). Returns the transform mapping *fixed* points to
    *moving* points and the final metric value.
    """
    fixed = sitk.Cast(fixed, sitk.sitkFloat32)
    init = sitk.VersorRigid3DTransform()
    init.SetCenter(fixed.TransformContinuousIndexToPhysicalPoint([(n - 1) / 2 for n in fixed.GetSize()]))
    out, metric = _mattes_mi(fixed, sitk.Cast(moving, sitk.sitkFloat32), init, fixed_mask, shrink, sampling,
                             iterations, seed)
    return sitk.VersorRigid3DTransform(out), metric


def rigid_motion(transform: sitk.VersorRigid3DTransform) -> tuple[float, float]:
    """(rotation angle in degrees, shift in mm of the rotation centre) of a rigid transform."""
    versor = np.asarray(transform.GetVersor())[:3]  # the unit quaternion (x, y, z, w)'s vector part
    angle = 2 * np.degrees(np.arcsin(min(1.0, float(np.linalg.norm(versor)))))
    return angle, float(np.linalg.norm(transform.GetTranslation()))


def then(first: sitk.Transform, second: sitk.Transform | None) -> sitk.Transform:
    """The transform applying ``first``, then ``second`` (``None``: ``first`` alone)."""
    if second is None:
        return first
    both = sitk.CompositeTransform(3)
    both.AddTransform(second)  # a composite applies the transform added last first
    both.AddTransform(first)
    return both


def transform_scales(transform: sitk.Transform, center: tuple[float, float, float]) -> np.ndarray:
    """Singular values of the transform's linear part (finite differences at ``center``): its scalings."""
    c = np.asarray(center, float)
    p0 = np.asarray(transform.TransformPoint(c.tolist()))
    jac = np.stack([np.asarray(transform.TransformPoint((c + 10 * e).tolist())) - p0 for e in np.eye(3)]) / 10
    return np.linalg.svd(jac, compute_uv=False)


def warp(image: sitk.Image, reference: sitk.Image, transform: sitk.Transform, *, label: bool = False,
         anti_alias_input: bool = True) -> np.ndarray:
    """Resample ``image`` onto ``reference`` through ``transform``; labels nearest neighbour (no blurred labels).

    Images are anti-aliased to the reference's spacing first (:func:`anti_alias`, ``anti_alias=True``; the axes of
    the scan and of the grid are taken as matched, as they are up to the registration's rotation).
    Returns ``[X, Y, Z]``; images are clipped at 0 (B-spline overshoot).
    """
    interp = sitk.sitkNearestNeighbor if label else sitk.sitkBSpline
    pixel = sitk.sitkUInt8 if label else sitk.sitkFloat32
    image = sitk.Cast(image, pixel)
    if not label and anti_alias_input:
        image = anti_alias(image, max(reference.GetSpacing()))
    out = sitk.Resample(image, reference, transform, interp, 0.0, pixel)
    arr = from_sitk(out)[0]
    return arr if label else np.clip(arr, 0, None)


# ------------------------------------------------------------------------------------------- step 3: skull stripping


def largest_component(mask: np.ndarray) -> np.ndarray:
    """Largest 26-connected component of a binary mask, holes filled."""
    labels, n = ndimage.label(mask, structure=np.ones((3, 3, 3)))
    if n == 0:
        return np.zeros(mask.shape, bool)
    keep = labels == (np.argmax(np.bincount(labels.ravel())[1:]) + 1)
    return ndimage.binary_fill_holes(keep)


def mask_from_image(image: np.ndarray, rel_threshold: float = 0.01) -> np.ndarray:
    """Brain mask of an already skull-stripped image (BraTS): ``image > rel_threshold · p99``, largest component.

    An image with negative values (standardised intensities, z-scores) has brain voxels of either sign around an
    exact-zero background: its mask is ``image != 0`` (largest component).
    """
    if (image < 0).any():
        return largest_component(image != 0)
    fg = image[image > 0]
    if fg.size == 0:
        return np.zeros(image.shape, bool)
    return largest_component(image > rel_threshold * np.percentile(fg, 99))


@lru_cache(maxsize=1)
def _deepbet_model():
    import torch
    from deepbet import BrainExtraction

    return BrainExtraction(no_gpu=not torch.cuda.is_available())


def deepbet_mask(image: np.ndarray, *, shape: int = 256, threshold: float = 0.5) -> np.ndarray:
    """deepbet brain mask of a RAS-oriented head ``image [X, Y, Z]`` (any spacing, any pose).

    deepbet finds the head's bounding box on a 128³ copy and segments that box resampled to ``shape``³ (256 is
    its default), so it does not depend on the input spacing and runs directly on the 3 mm and 6 mm grids of the
    quick/smoke profiles. Dice against the generator's brain masks, on the subject's own grid: 0.95–0.97 at 3 mm
    (``shape`` 192), 0.93/0.91/0.81 at 6 mm (192/160/128); see ``benchmarks/results/preprocessing.md``.
    """
    bet = _deepbet_model()
    prob = bet.run_model(np.ascontiguousarray(image, np.float32), shape=(shape,) * 3)
    return np.asarray(bet.postprocess(prob > threshold), bool)


def hdbet_mask(image: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """HD-BET (Isensee et al. 2019, the paper's choice) brain mask through its ``hd-bet`` command (CPU or GPU).

    Supports the 1.x (``-mode fast -tta 0``, ``*_mask.nii.gz``) and 2.x (``--disable_tta --save_bet_mask``,
    ``*_bet.nii.gz``) command lines. Raises :class:`PreprocessingError` when HD-BET is not installed.
    """
    exe = shutil.which("hd-bet")
    if exe is None:
        raise PreprocessingError("skull_strip='hdbet' but the hd-bet command is not installed: install HD-BET "
                                 "and its model weights (https://github.com/MIC-DKFZ/HD-BET), or use "
                                 "skull_strip='deepbet'")
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    helptext = subprocess.run([exe, "-h"], capture_output=True, text=True).stdout
    with tempfile.TemporaryDirectory() as tmp:
        src, dst = Path(tmp) / "in.nii.gz", Path(tmp) / "out.nii.gz"
        save_nifti(image.astype(np.float32), affine, src)
        flags = (["--disable_tta", "--save_bet_mask"] if "--disable_tta" in helptext
                 else ["-mode", "fast", "-tta", "0", "-s", "1"])
        subprocess.run([exe, "-i", str(src), "-o", str(dst), "-device", device, *flags], check=True,
                       capture_output=True)
        found = sorted(p for p in Path(tmp).glob("out*") if p.name.endswith(("_mask.nii.gz", "_bet.nii.gz")))
        if not found:
            raise PreprocessingError(f"hd-bet wrote no mask in {tmp}: {sorted(os.listdir(tmp))}")
        return load_nifti(found[0])[0] > 0.5


# ------------------------------------------------------------------------------------- steps 4–6: crop, N4, resize


def shift_affine(affine: np.ndarray, offset_vox) -> np.ndarray:
    """Affine of a sub-grid starting at voxel ``offset_vox`` (may be negative = padding)."""
    out = np.array(affine, float)
    out[:3, 3] = affine[:3, :3] @ np.asarray(offset_vox, float) + affine[:3, 3]
    return out


def bounding_box(mask: np.ndarray) -> tuple[slice, slice, slice]:
    """Step 4 (§4.2, "cut black borders"): the tight bounding box of a non-empty mask."""
    idx = np.argwhere(mask)
    if idx.size == 0:
        raise PreprocessingError("cannot crop to an empty brain mask")
    lo, hi = idx.min(0), idx.max(0) + 1
    return tuple(slice(int(a), int(b)) for a, b in zip(lo, hi))


def n4_bias_correct(image: np.ndarray, mask: np.ndarray, spacing_mm: float, *, shrink: int = 4,
                    iterations: tuple[int, ...] = (50, 50, 50, 50)) -> tuple[np.ndarray, np.ndarray]:
    """Step 5 (§4.2): N4 bias-field correction inside ``mask``; returns ``(corrected, log_bias)`` ``[X, Y, Z]``.

    The field is fitted on the image shrunk by ``shrink`` (capped so every axis keeps ≥ 8 voxels) and the log
    bias field is reconstructed on the full-resolution grid: ``corrected = image / exp(log_bias)``.
    """
    fit_mask = (mask & (image > 0)).astype(np.uint8)
    img = sitk.GetImageFromArray(np.ascontiguousarray(image.T, np.float32))
    msk = sitk.GetImageFromArray(np.ascontiguousarray(fit_mask.T))
    for im in (img, msk):
        im.SetSpacing((spacing_mm,) * 3)
    shrink = int(max(1, min(shrink, min(image.shape) // 8)))
    n4 = sitk.N4BiasFieldCorrectionImageFilter()
    n4.SetMaximumNumberOfIterations(list(iterations))
    n4.Execute(sitk.Shrink(img, [shrink] * 3), sitk.Shrink(msk, [shrink] * 3))
    log_bias = sitk.GetArrayFromImage(n4.GetLogBiasFieldAsImage(img)).T
    return (image / np.exp(log_bias)).astype(np.float32) * mask, log_bias


def pad_or_crop(volume: np.ndarray, shape: tuple[int, int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Step 6: centre ``volume`` in ``shape`` (zero padding or central crop per axis).

    Returns the volume and the voxel offset of its first voxel in the input grid (for :func:`shift_affine`).
    """
    out = np.zeros(shape, volume.dtype)
    offset, src, dst = [], [], []
    for n, t in zip(volume.shape, shape):
        start = (n - t) // 2  # > 0: crop, < 0: pad
        offset.append(start)
        src.append(slice(max(start, 0), max(start, 0) + min(n, t)))
        dst.append(slice(max(-start, 0), max(-start, 0) + min(n, t)))
    out[tuple(dst)] = volume[tuple(src)]
    return out, np.asarray(offset)


def downsample_mean(volume: np.ndarray, factor: int) -> np.ndarray:
    """Reduce resolution by ``factor`` with ``factor³`` block means (anti-aliased; paper: factor 2)."""
    if factor == 1:
        return volume.astype(np.float32)
    x, y, z = (s // factor for s in volume.shape)
    v = volume[: x * factor, : y * factor, : z * factor].astype(np.float32)
    return v.reshape(x, factor, y, factor, z, factor).mean(axis=(1, 3, 5))


def downsample_affine(affine: np.ndarray, factor: int) -> np.ndarray:
    """Affine of :func:`downsample_mean`'s output: voxels ``factor`` times larger, centred on each block."""
    out = shift_affine(affine, [(factor - 1) / 2] * 3)
    out[:3, :3] = affine[:3, :3] * factor
    return out


def rescale_percentiles(image: np.ndarray, mask: np.ndarray,
                        percentiles=(1.0, 99.0)) -> tuple[np.ndarray, float, float]:
    """Step 6 (end): map the ``percentiles`` inside ``mask`` to [0, 1], clip, zero outside the mask."""
    values = image[mask]
    if values.size == 0:
        raise PreprocessingError("cannot rescale intensities: the brain mask is empty")
    lo, hi = np.percentile(values, percentiles)
    if not hi > lo:
        raise PreprocessingError(f"cannot rescale intensities: percentiles {percentiles} are equal ({lo:g})")
    return (np.clip((image - lo) / (hi - lo), 0, 1) * mask).astype(np.float32), float(lo), float(hi)


def resize_to_output(volumes: dict[str, np.ndarray], affine: np.ndarray, cfg: PreprocessConfig):
    """Step 6: pad/crop to ``cfg.pad_shape``, downsample, drop axial slices; labels re-binarised at 0.5.

    ``volumes``: name -> ``[X, Y, Z]`` on one grid; names ``brain_mask``/``seg`` are labels. Returns
    ``(volumes, affine)`` of shape ``cfg.output_shape``.
    """
    bottom, top = cfg.drop_slices
    out = {}
    for name, vol in volumes.items():
        padded, offset = pad_or_crop(vol.astype(np.float32), cfg.pad_shape)
        small = downsample_mean(padded, cfg.downsample)
        small = small[:, :, bottom: small.shape[2] - top]
        out[name] = (small >= 0.5).astype(np.uint8) if name in ("brain_mask", "seg") else small
    aff = downsample_affine(shift_affine(affine, offset), cfg.downsample)
    return out, shift_affine(aff, [0, 0, bottom])


def dice(a: np.ndarray, b: np.ndarray) -> float:
    """Dice coefficient of two binary masks (1.0 when both are empty)."""
    a, b = np.asarray(a, bool), np.asarray(b, bool)
    total = a.sum() + b.sum()
    return 1.0 if total == 0 else float(2 * (a & b).sum() / total)


# ------------------------------------------------------------------------------------------------- one subject


class _Clock:
    """Seconds per step; remembers the step running when an exception escapes."""

    def __init__(self) -> None:
        self.times: dict[str, float] = {}
        self.step = "setup"

    def __call__(self, step: str) -> "_Clock":
        self.step, self._t0 = step, time.perf_counter()
        return self

    def __enter__(self) -> None:
        return None

    def __exit__(self, exc_type, *_) -> None:
        if exc_type is None:
            self.times[self.step] = time.perf_counter() - self._t0


#: per-subject registration transform (template -> subject points), written beside the volumes
TRANSFORM_FILE = "transform.tfm"


def transform_file(weighting: str, registration_weighting: str) -> str:
    """File of the transform that placed ``weighting``'s scan: :data:`TRANSFORM_FILE` for the registration
    weighting, ``transform_<weighting>.tfm`` (registration and rigid alignment, composed) for the others."""
    return TRANSFORM_FILE if weighting == registration_weighting else f"transform_{weighting}.tfm"


def save_transform(transform: sitk.Transform, path: str | os.PathLike) -> Path:
    """Write a SimpleITK transform atomically (``.tfm``)."""
    from .volumes import atomic_path

    with atomic_path(path, suffix=".tfm") as tmp:
        sitk.WriteTransform(transform, str(tmp))
    return Path(path)


def to_native(volume: np.ndarray, affine: np.ndarray, native: sitk.Image, transform: sitk.Transform, *,
              label: bool = False) -> np.ndarray:
    """Map a volume on the preprocessed grid (``affine``, template space) back onto the subject's ``native``
    grid through the registration ``transform`` (template -> subject points): the inverse of steps 2–6 for maps
    and masks (intensities are not un-rescaled). Outside the preprocessed field of view: 0. Returns ``[X, Y, Z]``
    in the native scan's voxel order."""
    moving = to_sitk(np.asarray(volume, np.float32), affine)
    out = sitk.Resample(moving, native, transform.GetInverse(),
                        sitk.sitkNearestNeighbor if label else sitk.sitkLinear, 0.0, sitk.sitkFloat32)
    return from_sitk(out)[0]


def _load_sitk(path: str, *, label: bool = False) -> sitk.Image:
    arr, affine = load_nifti(path)
    return to_sitk((arr > 0).astype(np.uint8) if label else arr.astype(np.float32), affine)


def native_brain_mask(image: sitk.Image, method: str, *, deepbet_shape: int = 256) -> sitk.Image:
    """Step 3 in the subject's space: brain mask (``uint8`` image on ``image``'s grid).

    ``method``: ``image>0`` (input already skull-stripped; pass the raw scan, whose background is exactly 0),
    ``deepbet`` or ``hdbet`` (pass the isotropic image). deepbet sees the image in RAS orientation (axes
    flipped/permuted from the scan's, and back for the mask).
    """
    import nibabel as nib

    arr, affine = from_sitk(image)
    if method == "image>0":
        mask = mask_from_image(arr)
    elif method == "hdbet":
        mask = hdbet_mask(arr, affine)
    else:
        ornt = nib.io_orientation(affine)
        ras = np.array([[0, 1], [1, 1], [2, 1]])
        canonical = nib.orientations.apply_orientation(arr, nib.orientations.ornt_transform(ornt, ras))
        mask = deepbet_mask(canonical, shape=deepbet_shape)
        mask = nib.orientations.apply_orientation(mask, nib.orientations.ornt_transform(ras, ornt))
    return to_sitk(np.asarray(mask, np.uint8), affine)


def _check_scales(tx: sitk.Transform, fixed: sitk.Image, metric: float, cfg: PreprocessConfig, qc: dict) -> None:
    center = fixed.TransformContinuousIndexToPhysicalPoint([(n - 1) / 2 for n in fixed.GetSize()])
    scales = transform_scales(tx, center)
    qc.update(registration_metric=metric, registration_scale_min=scales.min(), registration_scale_max=scales.max())
    if not np.isfinite(metric) or scales.max() > cfg.max_scale or scales.min() < 1 / cfg.max_scale:
        raise PreprocessingError(f"registration diverged: scalings {np.round(scales, 3).tolist()} outside "
                                 f"[1/{cfg.max_scale}, {cfg.max_scale}] (metric {metric:.3f})")


def _run_steps(subject: dict[str, Any], cfg: PreprocessConfig, out_dir: Path, qc: dict, clock: _Clock) -> None:
    present = [w for w in cfg.weightings if subject.get(w)]
    if not present:
        raise PreprocessingError(f"no image among weightings {cfg.weightings} in the manifest row")
    ref = cfg.registration_weighting if cfg.registration_weighting in present else present[0]
    method = "image>0" if int(subject.get("skull_stripped", 0)) == 1 else cfg.skull_strip
    qc.update(registration_weighting=ref, skull_strip=method)
    with clock("load"):
        raw = {w: _load_sitk(subject[w]) for w in present}
        labels = {k: _load_sitk(subject[k], label=True) for k in ("brain_mask", "seg") if subject.get(k)}
    with clock("resample"):
        iso = resample_isotropic(raw[ref], cfg.spacing_mm)
        fixed, tmask, regmask = template_grid(cfg.template, cfg.template_mask, cfg.spacing_mm,
                                              cfg.registration_mask_dilation_mm)
    ref_head, native = iso, None  # ref_head: the reference scan with its skull (the other scans align to it)
    with clock("skull_strip"):
        if method != "template":
            native = native_brain_mask(raw[ref] if method == "image>0" else iso, method,
                                       deepbet_shape=cfg.deepbet_shape)
            ml = float(sitk.GetArrayViewFromImage(native).sum() * np.prod(native.GetSpacing()) / 1000)
            if ml < cfg.min_brain_ml:
                raise PreprocessingError(f"brain mask empty or too small: {ml:.0f} ml < "
                                         f"min_brain_ml={cfg.min_brain_ml:g} ({method})")
            on_iso = sitk.Resample(native, iso, sitk.Transform(), sitk.sitkNearestNeighbor, 0)
            iso = sitk.Cast(iso, sitk.sitkFloat32) * sitk.Cast(on_iso, sitk.sitkFloat32)
    with clock("register"):
        tx, metric = register_affine(fixed, iso, regmask, shrink=cfg.registration_shrink,
                                     sampling=cfg.registration_sampling, iterations=cfg.registration_iterations)
        _check_scales(tx, fixed, metric, cfg, qc)
    aligned: dict[str, sitk.Transform] = {}
    with clock("align"):
        for w in [w for w in present if w != ref] if cfg.align_weightings else []:
            aligned[w], align_metric = register_rigid(ref_head, raw[w], shrink=cfg.registration_shrink,
                                                      sampling=cfg.registration_sampling,
                                                      iterations=cfg.registration_iterations)
            deg, mm = rigid_motion(aligned[w])
            qc.update({f"{w}_align_deg": deg, f"{w}_align_mm": mm, f"{w}_align_metric": align_metric})
            if not np.isfinite(align_metric) or deg > MAX_ALIGN_DEG or mm > MAX_ALIGN_MM:
                raise PreprocessingError(f"aligning {w} to {ref} diverged: {deg:.1f} deg, {mm:.1f} mm (at most "
                                         f"{MAX_ALIGN_DEG:g} deg and {MAX_ALIGN_MM:g} mm between sequences of a "
                                         f"session); set align_weightings=False to use the {ref} transform alone")
    with clock("warp"):
        images = {w: warp(raw[w], fixed, then(tx, aligned.get(w)), anti_alias_input=cfg.anti_alias) for w in present}
        labs = {k: warp(v, fixed, tx, label=True) > 0 for k, v in labels.items()}
        mask = from_sitk(tmask)[0] > 0 if native is None else warp(native, fixed, tx, label=True) > 0
        qc["brain_ml"] = float(mask.sum() * cfg.spacing_mm ** 3 / 1000)
        qc["dice_vs_reference"] = dice(mask, labs["brain_mask"]) if "brain_mask" in labs else np.nan
        images = {w: im * mask for w, im in images.items()}
        affine = sitk_affine(fixed)
    with clock("crop"):
        box = bounding_box(mask)
        images = {w: im[box] for w, im in images.items()}
        mask, seg = mask[box], (labs["seg"][box] if "seg" in labs else None)
        affine = shift_affine(affine, [s.start for s in box])
    with clock("n4"):
        images = {w: n4_bias_correct(im, mask, cfg.spacing_mm, shrink=cfg.n4_shrink,
                                     iterations=cfg.n4_iterations)[0] for w, im in images.items()}
    with clock("resize"):
        vols = {**images, "brain_mask": mask, **({"seg": seg} if seg is not None else {})}
        vols, affine = resize_to_output(vols, affine, cfg)
        final_mask = vols["brain_mask"].astype(bool)
        if "seg" in vols:  # lesion the skull stripping cut off: kept labelled, left to the evaluation's brain mask
            lesion = vols["seg"].astype(bool)
            qc["seg_outside_brain_pct"] = 100 * float((lesion & ~final_mask).sum() / lesion.sum()) if lesion.any() \
                else np.nan
    with clock("rescale"):
        for w in present:
            vols[w], qc[f"{w}_p1"], qc[f"{w}_p99"] = rescale_percentiles(vols[w], final_mask, cfg.percentiles)
    with clock("write"):
        sub_dir = out_dir / str(subject["dataset"]) / str(subject["subject_id"])
        for name, vol in vols.items():
            label = name in ("brain_mask", "seg")
            save_nifti(vol, affine, sub_dir / f"{name}.nii.gz", dtype=np.uint8 if label else np.float32)
        save_transform(tx, sub_dir / TRANSFORM_FILE)
        for w, rigid in aligned.items():
            save_transform(then(tx, rigid), sub_dir / transform_file(w, ref))
        qc["files"] = ",".join(vols)


def preprocess_subject(subject: dict[str, Any], cfg: PreprocessConfig, out_dir: str | os.PathLike) -> dict:
    """Steps 1–7 for one subject (a raw manifest row with absolute paths); never raises.

    Returns its QC row: ``status`` ok/failed, ``failure_step`` and ``failure_reason`` on failure, registration
    metric and scalings, skull-stripping method, brain volume (ml), Dice against the raw brain mask when given,
    the 1st/99th intensity percentiles of each weighting, ``time_<step>`` seconds. On success a ``qc.json``
    beside the volumes (written last, atomically) marks the subject as done for resumed runs.
    """
    out_dir = Path(out_dir)
    qc: dict[str, Any] = {"dataset": subject["dataset"], "subject_id": subject["subject_id"], "status": "failed",
                          "failure_step": "", "failure_reason": "", "reused": False}
    clock = _Clock()
    try:
        _run_steps(subject, cfg, out_dir, qc, clock)
        qc["status"] = "ok"
    except Exception as exc:  # reported per subject; the others go on
        qc["failure_step"], qc["failure_reason"] = clock.step, f"{type(exc).__name__}: {exc}".strip()
        qc["traceback"] = traceback.format_exc(limit=3)
    qc.update({f"time_{k}": v for k, v in clock.times.items()}, time_total=sum(clock.times.values()))
    if qc["status"] == "ok":
        save_json({"signature": cfg.signature(), "qc": qc},
                  out_dir / str(subject["dataset"]) / str(subject["subject_id"]) / "qc.json")
    return qc


# ---------------------------------------------------------------------------------------------- whole manifest


def _done_qc(subject: dict, cfg: PreprocessConfig, out_dir: Path) -> dict | None:
    """QC row of a subject whose outputs exist, load as the expected shape and match ``cfg``; else None."""
    import nibabel as nib

    sub_dir = out_dir / str(subject["dataset"]) / str(subject["subject_id"])
    try:
        rec = json.loads((sub_dir / "qc.json").read_text())
        files = rec["qc"]["files"].split(",")
        ok = rec["signature"] == cfg.signature() and rec["qc"]["status"] == "ok" and all(
            nib.load(str(sub_dir / f"{f}.nii.gz")).shape == cfg.output_shape for f in files)
    except (OSError, ValueError, KeyError, nib.filebasedimages.ImageFileError):
        return None
    return {**rec["qc"], "reused": True} if ok else None


def _init_worker(threads: int) -> None:
    from .runtime import exit_with_parent

    exit_with_parent()  # a stopped run leaves no worker behind
    sitk.ProcessObject_SetGlobalDefaultNumberOfThreads(threads)
    os.environ["OMP_NUM_THREADS"] = str(threads)
    import torch

    torch.set_num_threads(threads)


def _run_all(todo: list[dict], cfg: PreprocessConfig, out_dir: Path, progress: bool) -> list[dict]:
    from tqdm.auto import tqdm

    bar = tqdm(total=len(todo), desc="preprocessing", unit="subject", disable=not progress or not todo)
    rows = []
    if cfg.n_jobs == 1 or len(todo) <= 1:
        for subject in todo:
            rows.append(preprocess_subject(subject, cfg, out_dir))
            bar.update()
        return rows
    threads = max(1, (os.cpu_count() or 1) // cfg.n_jobs)
    with ProcessPoolExecutor(cfg.n_jobs, mp_context=get_context("spawn"), initializer=_init_worker,
                             initargs=(threads,)) as pool:
        futures = {pool.submit(preprocess_subject, s, cfg, out_dir): s for s in todo}
        for fut in as_completed(futures):
            s = futures[fut]
            try:
                rows.append(fut.result())
            except Exception as exc:  # the worker process died (e.g. out of memory)
                rows.append({"dataset": s["dataset"], "subject_id": s["subject_id"], "status": "failed",
                             "failure_step": "worker", "failure_reason": f"{type(exc).__name__}: {exc}"})
            bar.update()
    bar.close()
    return rows


def preprocess_manifest(cfg: PreprocessConfig, raw_manifest: str | os.PathLike | pd.DataFrame,
                        out_dir: str | os.PathLike, manifest_path: str | os.PathLike | None = None, *,
                        progress: bool = True) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Pre-process every subject of ``raw_manifest`` into ``out_dir/<dataset>/<subject>/``.

    Subjects run in ``cfg.n_jobs`` processes; subjects whose valid outputs exist (same config) are reused, so an
    interrupted run resumes. Failing subjects are reported in the QC table and left out of the manifest.
    Writes ``manifest_path`` (default ``out_dir/../preprocessed_manifest.csv``; same rows, splits and folds,
    paths relative to its folder) and ``preprocessing_qc.csv`` beside it.

    Returns ``(manifest with absolute paths, qc)``.
    """
    out_dir = Path(out_dir)
    raw = raw_manifest.copy() if isinstance(raw_manifest, pd.DataFrame) else manifests.load_manifest(raw_manifest)
    manifest_path = Path(manifest_path) if manifest_path else out_dir.parent / "preprocessed_manifest.csv"
    subjects = raw.drop_duplicates(["dataset", "subject_id"]).to_dict("records")
    done = {(s["dataset"], s["subject_id"]): _done_qc(s, cfg, out_dir) for s in subjects}
    todo = [s for s in subjects if done[(s["dataset"], s["subject_id"])] is None]
    new = {(r["dataset"], r["subject_id"]): r for r in _run_all(todo, cfg, out_dir, progress)}
    qc = pd.DataFrame([done[k] or new[k] for k in ((s["dataset"], s["subject_id"]) for s in subjects)])
    qc = qc.drop(columns=["traceback"], errors="ignore")
    if "files" not in qc:  # no subject succeeded
        qc["files"] = ""
    ok = qc.loc[qc["status"] == "ok"].set_index(["dataset", "subject_id"])["files"]
    rows = []
    for row in raw.to_dict("records"):
        key = (row["dataset"], row["subject_id"])
        if key not in ok.index:
            continue
        files = ok[key].split(",")
        sub_dir = out_dir / str(row["dataset"]) / str(row["subject_id"])
        for col in ("t1", "t2", "brain_mask", "seg"):
            row[col] = str(sub_dir / f"{col}.nii.gz") if col in files else ""
        rows.append({**row, "skull_stripped": 1})
    manifest = pd.DataFrame(rows, columns=list(manifests.COLUMNS))
    manifests.write_manifest(manifest, manifest_path, root=manifest_path.parent)
    save_dataframe(qc, manifest_path.parent / "preprocessing_qc.csv")
    return manifest, qc


# --------------------------------------------------------------------------------------------- QC and figures


def failure_summary(qc: pd.DataFrame) -> pd.DataFrame:
    """Failed subjects with the step that failed and why (empty when all succeeded)."""
    cols = ["dataset", "subject_id", "failure_step", "failure_reason"]
    return qc.loc[qc["status"] != "ok", cols].reset_index(drop=True)


def check_failures(qc: pd.DataFrame, allow_failures: bool = False) -> None:
    """Raise :class:`PreprocessingError` listing failed subjects unless ``allow_failures``."""
    failed = failure_summary(qc)
    if len(failed) and not allow_failures:
        lines = [f"  {r.dataset}/{r.subject_id} at {r.failure_step}: {r.failure_reason}" for r in failed.itertuples()]
        raise PreprocessingError(f"{len(failed)} of {len(qc)} subject(s) failed (set allow_failures=True to go "
                                 "on without them):\n" + "\n".join(lines))


def qc_summary(qc: pd.DataFrame) -> pd.DataFrame:
    """Per data set: subjects, failures, skull-stripping method, median brain volume and Dice, the largest share of
    a lesion outside the brain mask (%; those voxels stay labelled, the evaluation's eroded brain mask leaves them
    out), and median seconds."""
    q = qc.assign(ok=qc["status"] == "ok")
    for col in ("brain_ml", "dice_vs_reference", "time_total", "skull_strip", "seg_outside_brain_pct"):
        q[col] = q[col] if col in q else np.nan
    return q.groupby("dataset").agg(subjects=("subject_id", "size"), failed=("ok", lambda s: int((~s).sum())),
                                    skull_strip=("skull_strip", lambda s: ",".join(sorted(set(s.dropna())))),
                                    brain_ml=("brain_ml", "median"), dice=("dice_vs_reference", "median"),
                                    lesion_outside_brain_pct=("seg_outside_brain_pct", "max"),
                                    seconds=("time_total", "median"))


def plot_timings(qc: pd.DataFrame):
    """Box plot of seconds per subject for each step (successful subjects; reused ones keep the times recorded
    when they were processed)."""
    import matplotlib.pyplot as plt

    q = qc.loc[qc["status"] == "ok"]
    steps = [s for s in STEPS if f"time_{s}" in q]
    fig, ax = plt.subplots(figsize=(8, 3))
    ax.boxplot([q[f"time_{s}"].to_numpy(float) for s in steps], showfliers=True)
    ax.set_xticks(range(1, len(steps) + 1), steps, rotation=30)
    ax.set_ylabel("seconds / subject")
    ax.set_title(f"pre-processing time per step ({len(q)} subjects)")
    fig.tight_layout()
    return fig


def plot_before_after(raw: pd.DataFrame | str | os.PathLike, manifest: pd.DataFrame, n_subjects: int = 3,
                      weighting: str = "t2"):
    """Mid axial slice of the raw scan next to the pre-processed axial and coronal slices (mask and lesion
    outlines in cyan and red), for the first subject of up to ``n_subjects`` data sets, lesion data sets first.

    ``raw``: the raw manifest (path or frame with absolute paths); ``manifest``: the pre-processed one."""
    import matplotlib.pyplot as plt
    import nibabel as nib

    raw = raw if isinstance(raw, pd.DataFrame) else manifests.load_manifest(raw)

    rows = manifest.loc[manifest[weighting] != ""].drop_duplicates("dataset")  # one subject per data set
    rows = rows.assign(_les=rows["seg"] == "").sort_values("_les", kind="stable").head(n_subjects)
    raw_path = {(d, s): p for d, s, p in zip(raw["dataset"], raw["subject_id"], raw[weighting])}
    fig, axes = plt.subplots(len(rows), 3, figsize=(9, 3 * max(1, len(rows))), squeeze=False)
    for ax_row, r in zip(axes, rows.itertuples()):
        arr = np.asarray(nib.as_closest_canonical(nib.load(raw_path[(r.dataset, r.subject_id)])).dataobj, np.float32)
        img, mask = load_nifti(getattr(r, weighting))[0], load_nifti(r.brain_mask)[0]
        seg = load_nifti(r.seg)[0] if r.seg else np.zeros_like(mask)
        z = int(np.argmax(seg.sum((0, 1)))) if seg.any() else img.shape[2] // 2
        y = int(np.argmax(seg.sum((0, 2)))) if seg.any() else img.shape[1] // 2
        ax_row[0].imshow(np.rot90(arr[:, :, arr.shape[2] // 2]), cmap="gray")
        ax_row[0].set_title(f"{r.dataset}/{r.subject_id} raw {arr.shape}", fontsize=8)
        for ax, sl in ((ax_row[1], np.s_[:, :, z]), (ax_row[2], np.s_[:, y, :])):
            ax.imshow(np.rot90(img[sl]), cmap="gray", vmin=0, vmax=1)
            ax.contour(np.rot90(mask[sl]), levels=[0.5], colors="c", linewidths=0.6)
            if seg[sl].any():
                ax.contour(np.rot90(seg[sl]), levels=[0.5], colors="r", linewidths=0.6)
        ax_row[1].set_title(f"pre-processed axial {img.shape}", fontsize=8)
        ax_row[2].set_title("pre-processed coronal", fontsize=8)
    for ax in axes.ravel():
        ax.axis("off")
    fig.tight_layout()
    return fig
