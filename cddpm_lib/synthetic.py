"""The embedded synthetic cohort: IXI-like healthy heads and four pathologies, built from nilearn's MNI152 2009
T1 template and its grey/white-matter/brain-mask maps (no download). A stand-in for the data of paper §4.1.

One subject is rendered in a single backward resampling from its *raw scanner grid* to the template:

1. scanner pose: random rotation/translation of the head in the field of view (pose ``[R, t]``),
2. anatomy: a small random affine (head size, shear) plus a smooth random displacement field and a radial
   scaling around the ventricles (ventricle size), then a tumour's mass effect (:func:`lesions.mass_effect`),
3. tissues sampled at the template coordinates: GM, WM, CSF (brain mask − GM − WM), the template's own T1
   texture (its residual after a fit on the tissue maps) and a signed distance to the intracranial hull from
   which the head's shells are drawn: CSF rim, inner table, diploe (marrow), outer table, galea, fat, skin —
   plus a neck below the skull base,
4. contrast: tissue means per weighting (T1: fat > WM > GM > CSF; T2: CSF > GM > WM) × the site's contrast
   factors × a per-subject jitter, then the site's blur (Gaussian),
5. pathology (:mod:`cddpm_lib.lesions`) drawn analytically on the output voxels — the mask is exactly the
   voxels whose intensity changed,
6. acquisition: a smooth multiplicative bias field (scanner coordinates), Rician noise, quantisation to int16
   scanner units; BraTS-like subjects are returned skull-stripped (background exactly 0).

Sites differ in contrast, bias, noise, blur, slice thickness, axis orientation and pose range; the unhealthy
data sets come from other sites than IXI's three (the paper's domain shift). Everything is deterministic from
``(seed, dataset, subject index)``. The template maps are averaged down to the output voxel size first
(factor 1–4 mm), so coarse cohorts are fast (cohort writing: :mod:`cddpm_lib.cohort`).
"""
from __future__ import annotations

import dataclasses
from functools import lru_cache
from pathlib import Path

import numpy as np
from scipy import ndimage

from . import lesions

WEIGHTINGS = ("t1", "t2")
TISSUES = ("csf", "gm", "wm", "bone", "marrow", "muscle", "fat", "skin")
#: relative tissue means (T1: WM > GM > CSF; T2: CSF > GM > WM)
BASE_MEANS: dict[str, dict[str, float]] = {
    "t1": {"csf": 0.18, "gm": 0.62, "wm": 1.00, "bone": 0.05, "marrow": 0.80, "muscle": 0.45, "fat": 1.10,
           "skin": 0.60},
    "t2": {"csf": 1.00, "gm": 0.55, "wm": 0.38, "bone": 0.05, "marrow": 0.50, "muscle": 0.33, "fat": 0.78,
           "skin": 0.50},
}
#: shells outside the intracranial hull, (tissue, thickness mm), inner to outer
SHELLS = (("csf", 1.5), ("bone", 1.5), ("marrow", 2.5), ("bone", 1.5), ("muscle", 1.5), ("fat", 4.0),
          ("skin", 1.0))
HEAD_CENTER_MM = np.array([0.0, -17.0, 12.0])  # template point placed at the centre of the field of view


@dataclasses.dataclass(frozen=True)
class Site:
    """A scanner/hospital: contrast factors per weighting and tissue, acquisition properties, pose range."""

    name: str
    contrast: dict[str, dict[str, float]]  # weighting -> tissue -> factor on BASE_MEANS (missing: 1)
    noise: float  # Rician sigma relative to the brightest brain tissue
    bias: float  # std of the log bias field over the head
    blur_mm: float  # Gaussian sigma of the point-spread function
    slice_factor: float = 1.0  # slice thickness / in-plane spacing (with anisotropic=True)
    flip_x: bool = False  # LAS instead of RAS voxel axes
    pose_deg: float = 10.0  # max rotation about each axis
    pose_mm: float = 15.0  # max translation along each axis
    scale: float = 1000.0  # scanner units of the brightest brain tissue


SITES: dict[str, Site] = {s.name: s for s in (
    # IXI (healthy): Guy's (Philips 1.5 T), Hammersmith (Philips 3 T), IoP (GE 1.5 T)
    Site("Guys", {}, 0.030, 0.15, 0.6),
    Site("HH", {"t1": {"gm": 0.92, "csf": 0.85}, "t2": {"gm": 0.95, "wm": 0.90, "csf": 1.05}}, 0.025, 0.30, 0.4,
         1.2, scale=1400.0),
    Site("IOP", {"t1": {"gm": 1.06, "csf": 1.20}, "t2": {"gm": 1.05, "wm": 1.08}}, 0.040, 0.20, 0.8,
         flip_x=True, scale=700.0),
    # unhealthy sets: other scanners and contrasts (domain shift); BraTS and ATLAS come registered (small pose)
    Site("BraTS-A", {"t2": {"csf": 0.90, "gm": 1.12, "wm": 1.15}, "t1": {"gm": 1.05, "csf": 1.30}}, 0.020, 0.10,
         1.0, pose_deg=3.0, pose_mm=3.0),
    Site("BraTS-B", {"t2": {"gm": 1.05, "wm": 1.20}, "t1": {"gm": 0.95}}, 0.035, 0.15, 1.2, pose_deg=3.0,
         pose_mm=3.0, scale=500.0),
    Site("Ljubljana", {"t2": {"gm": 0.90, "wm": 0.85, "csf": 1.10}, "t1": {"gm": 0.95}}, 0.030, 0.35, 0.5,
         pose_deg=12.0, scale=1600.0),
    Site("R001", {"t1": {"gm": 1.08, "csf": 1.40}}, 0.035, 0.20, 0.7, pose_deg=2.0, pose_mm=2.0),
    Site("R002", {"t1": {"gm": 0.97, "csf": 0.90}}, 0.045, 0.25, 1.0, pose_deg=2.0, pose_mm=2.0, scale=300.0),
    Site("Utrecht", {"t1": {"gm": 1.04}}, 0.030, 0.30, 0.6, 1.5, scale=900.0),
    Site("Singapore", {"t1": {"gm": 0.96, "csf": 1.25}}, 0.040, 0.25, 0.8, 1.5, flip_x=True),
    Site("GE3T", {"t1": {"gm": 1.10, "csf": 0.80}}, 0.035, 0.35, 0.7, 1.5, scale=2000.0),
)}
DATASET_SITES: dict[str, tuple[str, ...]] = {
    "IXI": ("Guys", "HH", "IOP"), "BraTS21": ("BraTS-A", "BraTS-B"), "MSLUB": ("Ljubljana",),
    "ATLAS": ("R001", "R002"), "WMH": ("Utrecht", "Singapore", "GE3T")}
#: weightings written per data set (main one first; the second only with ``extra_weightings``)
DATASET_WEIGHTINGS: dict[str, tuple[str, ...]] = {
    "IXI": ("t1", "t2"), "BraTS21": ("t2", "t1"), "MSLUB": ("t2", "t1"), "ATLAS": ("t1",), "WMH": ("t1",)}
SKULL_STRIPPED = {"BraTS21"}


# ----------------------------------------------------------------------------------------------------- atlas


@dataclasses.dataclass(frozen=True)
class Atlas:
    """Template maps at ``factor`` mm: probabilities ``gm, wm, brain``, ``texture`` (T1 residual / WM mean),
    ``hull_dist`` (mm, < 0 inside the intracranial hull), ``depth`` (mm inside the brain), ``vent_dist`` (mm to
    the ventricles); ``affine`` voxel -> template mm; ``brain_center``/``vent_center`` in mm."""

    factor: int
    gm: np.ndarray
    wm: np.ndarray
    brain: np.ndarray
    texture: np.ndarray
    hull_dist: np.ndarray
    depth: np.ndarray
    vent_dist: np.ndarray
    affine: np.ndarray
    brain_center: np.ndarray
    vent_center: np.ndarray


def block_mean(volume: np.ndarray, factor: int) -> np.ndarray:
    """Average ``factor``³ blocks (edge-padded to a multiple of ``factor``)."""
    if factor == 1:
        return volume.astype(np.float32)
    pad = [(0, (-s) % factor) for s in volume.shape]
    v = np.pad(volume.astype(np.float32), pad, mode="edge")
    x, y, z = (s // factor for s in v.shape)
    return v.reshape(x, factor, y, factor, z, factor).mean(axis=(1, 3, 5))


def signed_distance(mask: np.ndarray, spacing: float) -> np.ndarray:
    """Euclidean distance (mm) to the mask's border: positive outside, negative inside."""
    return (ndimage.distance_transform_edt(~mask, sampling=spacing)
            - ndimage.distance_transform_edt(mask, sampling=spacing)).astype(np.float32)


def mni152_maps() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """nilearn's MNI152 2009 (1 mm) ``t1, gm, wm`` in [0, 1], brain ``mask`` and the affine.

    Read straight from nilearn's package data (what ``nilearn.datasets.load_mni152_*`` return at resolution 1,
    the mask being ``t1 > 0.2``) without importing ``nilearn.datasets``, which is slow to import.
    """
    import nibabel as nib
    import nilearn

    folder = Path(nilearn.__file__).parent / "datasets" / "data"
    vols = []
    for name in ("t1", "gm", "wm"):
        path = folder / f"mni_icbm152_{name}_tal_nlin_sym_09a_converted.nii.gz"
        if not path.exists():
            raise FileNotFoundError(f"{path}: nilearn's MNI152 template is missing; reinstall nilearn>=0.10")
        img = nib.load(str(path))
        vol = np.asarray(img.dataobj, np.float32)
        vols.append(vol / vol.max())
    return vols[0], vols[1], vols[2], vols[0] > 0.2, np.asarray(img.affine, float)


@lru_cache(maxsize=4)
def load_atlas(factor: int = 2) -> Atlas:
    """The template maps averaged to ``factor`` mm, plus texture, hull distance, depth and ventricles."""
    if factor not in (1, 2, 3, 4):
        raise ValueError(f"atlas factor must be 1-4 mm, got {factor}")
    t1, gm, wm, mask, affine = mni152_maps()
    gm, wm = gm * mask, wm * mask
    csf = np.clip(mask - gm - wm, 0, 1)
    design = np.stack([gm[mask], wm[mask], csf[mask]], 1)
    coef = np.linalg.lstsq(design, t1[mask], rcond=None)[0]
    texture = np.zeros_like(t1)
    texture[mask] = (t1[mask] - design @ coef) / coef[1]  # residual in units of the WM mean
    gm, wm, brain, texture = (block_mean(v, factor) for v in (gm, wm, mask, texture))
    affine = affine @ np.diag([factor, factor, factor, 1.0])
    affine[:3, 3] += affine[:3, :3] @ np.full(3, (factor - 1) / (2.0 * factor))  # block centres
    inside = brain > 0.5
    outer = ndimage.distance_transform_edt(~inside, sampling=factor) > 5.0  # closing by 5 mm
    hull = ndimage.binary_fill_holes(ndimage.distance_transform_edt(~outer, sampling=factor) > 5.0)
    depth = ndimage.distance_transform_edt(inside, sampling=factor).astype(np.float32)
    ventricles = (np.clip(brain - gm - wm, 0, 1) > 0.5) & (depth > 10.0)
    labels, n = ndimage.label(ventricles)
    sizes = ndimage.sum(ventricles, labels, range(1, n + 1)) * factor ** 3
    ventricles = np.isin(labels, 1 + np.flatnonzero(sizes >= 1000.0))  # components >= 1 ml
    to_mm = lambda ijk: affine[:3, :3] @ ijk + affine[:3, 3]  # noqa: E731
    return Atlas(factor, gm, wm, brain, texture, signed_distance(hull, factor), depth,
                 ndimage.distance_transform_edt(~ventricles, sampling=factor).astype(np.float32), affine,
                 to_mm(np.argwhere(inside).mean(0)), to_mm(np.argwhere(ventricles).mean(0)))


def atlas_factor(voxel_mm: float) -> int:
    """Template resolution used for an output voxel size: the nearest of 1–4 mm."""
    return int(np.clip(round(voxel_mm), 1, 4))


def sample_map(volume: np.ndarray, atlas: Atlas, u: np.ndarray) -> np.ndarray:
    """Trilinear value of a template map at template mm ``u [3, N]`` (edges extend: the neck continues)."""
    inv = np.linalg.inv(atlas.affine)
    ijk = inv[:3, :3] @ u + inv[:3, 3:4]
    return ndimage.map_coordinates(volume, ijk, order=1, mode="nearest").astype(np.float32)


# ------------------------------------------------------------------------------------------------ a subject


@dataclasses.dataclass(frozen=True)
class SubjectSpec:
    """Everything random about one subject (drawn by :func:`sample_subject`)."""

    dataset: str
    subject_id: str
    site: Site
    weightings: tuple[str, ...]
    skull_stripped: bool
    shape: tuple[int, int, int]
    affine: np.ndarray  # raw grid voxel -> scanner mm
    pose: np.ndarray  # [4, 4] scanner mm -> template mm of the undeformed head (backward map)
    anatomy: np.ndarray  # [4, 4] small affine (backward, about the brain centre)
    displacement: np.ndarray  # [3, a, b, c] mm on a 24 mm control grid over the template
    ventricle_scale: float  # > 0: larger ventricles
    shell_scale: float  # skull/scalp thickness factor
    means: dict[str, dict[str, float]]  # weighting -> tissue -> mean
    bias: np.ndarray  # [10] coefficients of the log bias polynomial
    seed: int  # noise and lesion re-draws
    lesion: lesions.LesionSpec | None


def rotation_matrix(angles_deg: np.ndarray) -> np.ndarray:
    """Rotation about x, then y, then z (degrees)."""
    a, b, c = np.deg2rad(angles_deg)
    rx = np.array([[1, 0, 0], [0, np.cos(a), -np.sin(a)], [0, np.sin(a), np.cos(a)]])
    ry = np.array([[np.cos(b), 0, np.sin(b)], [0, 1, 0], [-np.sin(b), 0, np.cos(b)]])
    rz = np.array([[np.cos(c), -np.sin(c), 0], [np.sin(c), np.cos(c), 0], [0, 0, 1]])
    return rz @ ry @ rx


def raw_grid(voxel_mm: float, fov_mm: tuple[float, float, float], site: Site, anisotropic: bool
             ) -> tuple[tuple[int, int, int], np.ndarray]:
    """Shape and affine of a site's raw grid, centred on scanner (0, 0, 0)."""
    spacing = np.array([voxel_mm, voxel_mm, voxel_mm * (site.slice_factor if anisotropic else 1.0)])
    shape = tuple(int(np.ceil(f / s)) for f, s in zip(fov_mm, spacing))
    affine = np.diag([*(spacing * [-1.0 if site.flip_x else 1.0, 1.0, 1.0]), 1.0])
    affine[:3, 3] = -affine[:3, :3] @ ((np.array(shape) - 1) / 2.0)
    return shape, affine


def sample_subject(dataset: str, subject_id: str, site: str, rng: np.random.Generator, *, voxel_mm: float,
                   fov_mm: tuple[float, float, float] = (192.0, 224.0, 200.0), anisotropic: bool = True,
                   weightings: tuple[str, ...] | None = None, lesion_kind: str | None = None) -> SubjectSpec:
    """Draw one subject of ``dataset`` at ``site``; ``lesion_kind`` defaults to the data set's pathology."""
    s = SITES[site]
    shape, affine = raw_grid(voxel_mm, fov_mm, s, anisotropic)
    pose = np.eye(4)
    rot = rotation_matrix(rng.uniform(-1, 1, 3) * s.pose_deg * np.array([1.0, 0.5, 0.5]))
    pose[:3, :3] = rot.T
    pose[:3, 3] = HEAD_CENTER_MM - rot.T @ (rng.uniform(-1, 1, 3) * s.pose_mm)
    atlas = load_atlas(atlas_factor(voxel_mm))
    m = rotation_matrix(rng.uniform(-3, 3, 3)) @ np.diag(rng.uniform(0.92, 1.08) * rng.uniform(0.96, 1.04, 3))
    anatomy = np.eye(4)
    anatomy[:3, :3] = m
    anatomy[:3, 3] = atlas.brain_center - m @ atlas.brain_center
    means = {w: {t: BASE_MEANS[w][t] * s.contrast.get(w, {}).get(t, 1.0) * rng.uniform(0.97, 1.03)
                 for t in TISSUES} for w in WEIGHTINGS}
    kind = lesion_kind if lesion_kind is not None else lesions.DATASET_KIND.get(dataset)
    lesion = lesions.sample_lesion(kind, rng, atlas, min_radius_mm=0.8 * voxel_mm) if kind else None
    return SubjectSpec(dataset, subject_id, s, tuple(weightings or DATASET_WEIGHTINGS[dataset]),
                       dataset in SKULL_STRIPPED, shape, affine, pose, anatomy,
                       rng.normal(0.0, 2.0, (3, 10, 12, 11)), float(rng.uniform(-0.15, 0.35)),
                       float(rng.uniform(0.8, 1.25)), means, rng.normal(0, 1, 10) * s.bias,
                       int(rng.integers(2 ** 31)), lesion)


def _upsample2(field: np.ndarray, shape: tuple[int, int, int]) -> np.ndarray:
    """Exact trilinear upsampling by 2 of ``[C, a, b, c]`` sampled at even voxel indices -> ``[C, *shape]``."""
    for axis in (1, 2, 3):
        f = np.moveaxis(field, axis, 0)
        out = np.empty((2 * f.shape[0] - 1, *f.shape[1:]), f.dtype)
        out[0::2], out[1::2] = f, 0.5 * (f[:-1] + f[1:])
        field = np.moveaxis(out, 0, axis)
    return field[:, :shape[0], :shape[1], :shape[2]]


def template_coords(spec: SubjectSpec) -> tuple[np.ndarray, np.ndarray]:
    """Template mm of every raw voxel: ``(u_lesion, u_anatomy)``, each ``[3, N]`` (before/after mass effect).

    The smooth chain (pose, affine, displacement, ventricles, mass effect) is evaluated on every second voxel
    and upsampled trilinearly (exact on that grid; the chain varies over centimetres).
    """
    step = 2 if spec.affine[2, 2] <= 2.5 else 1
    coarse = [np.arange(0, n + step, step)[: (n - 1) // step + 2] for n in spec.shape]
    ijk = np.stack(np.meshgrid(*coarse, indexing="ij")).reshape(3, -1).astype(np.float64)
    chain = spec.anatomy @ spec.pose @ spec.affine
    u = chain[:3, :3] @ ijk + chain[:3, 3:4]
    lo, step_mm = np.array([-110.0, -150.0, -110.0]), 24.0  # control grid of the displacement
    ctrl = (u - lo[:, None]) / step_mm
    u = u + np.stack([ndimage.map_coordinates(c, ctrl, order=3, mode="nearest") for c in spec.displacement])
    vc = load_atlas(atlas_factor(abs(spec.affine[1, 1]))).vent_center[:, None]
    d = u - vc
    u = vc + d * (1.0 - spec.ventricle_scale * np.exp(-(d ** 2).sum(0) / (2 * 20.0 ** 2)))
    both = np.concatenate([u, lesions.mass_effect(spec.lesion, u)]).astype(np.float32)
    if step == 2:
        both = _upsample2(both.reshape(6, *(len(c) for c in coarse)), spec.shape)
    both = both.reshape(6, -1)
    return both[:3], both[3:]


def _ramp(x: np.ndarray, width: float) -> np.ndarray:
    return np.clip(0.5 + x / width, 0.0, 1.0)


def tissue_weights(spec: SubjectSpec, atlas: Atlas, u: np.ndarray) -> tuple[dict[str, np.ndarray], dict]:
    """Fractions of each tissue ``[N]`` per raw voxel, plus sampled ``gm, wm, brain, texture`` maps."""
    n, width = u.shape[1], float(atlas.factor)
    dist = sample_map(atlas.hull_dist, atlas, u)
    near = np.flatnonzero(dist < width)
    maps = {k: np.zeros(n, np.float32) for k in ("gm", "wm", "brain", "texture")}
    for k in maps:
        maps[k][near] = sample_map(getattr(atlas, k), atlas, u[:, near])
    outside = _ramp(dist, width)
    w = {t: np.zeros(n, np.float32) for t in TISSUES}
    w["gm"], w["wm"] = maps["gm"] * (1 - outside), maps["wm"] * (1 - outside)
    w["csf"] = np.clip((1 - outside) - w["gm"] - w["wm"], 0, 1)
    r = np.sqrt(((u[0] - 0.0) / 55.0) ** 2 + ((u[1] + 25.0) / 60.0) ** 2)  # neck: elliptic cylinder
    neck_depth = (1.0 - r) * 57.0 * _ramp(-40.0 - u[2], 10.0)
    neck = _ramp(neck_depth, width) * outside
    edge = 0.0
    for tissue, thickness in SHELLS:
        inner, edge = edge, edge + thickness * spec.shell_scale
        w[tissue] += (_ramp(dist - inner, width) - _ramp(dist - edge, width)) * (1 - neck)
    w["muscle"] += neck * _ramp(neck_depth - 7.0, width)
    w["fat"] += neck * (_ramp(neck_depth - 1.0, width) - _ramp(neck_depth - 7.0, width))
    w["skin"] += neck * (1 - _ramp(neck_depth - 1.0, width))
    return w, maps


def bias_field(spec: SubjectSpec) -> np.ndarray:
    """Smooth multiplicative field ``[N]`` in scanner coordinates (exp of a quadratic polynomial)."""
    ijk = np.stack(np.meshgrid(*[np.arange(s) for s in spec.shape], indexing="ij")).reshape(3, -1)
    x, y, z = (spec.affine[:3, :3] @ ijk + spec.affine[:3, 3:4]) / 100.0
    terms = np.stack([x, y, z, x * x, y * y, z * z, x * y, x * z, y * z, np.ones_like(x)])
    return np.exp(np.tensordot(spec.bias * np.r_[np.ones(3), 0.5 * np.ones(6), 0.0], terms, 1)).astype(np.float32)


def render_subject(spec: SubjectSpec, *, with_lesion: bool = True, min_lesion_voxels: int = 3) -> dict:
    """Render a subject's raw volumes.

    Returns ``{"t1"/"t2": int16 [X, Y, Z] scanner units, "brain_mask": uint8, "seg": uint8, "affine": [4, 4],
    "lesion": LesionSpec | None}``. With ``with_lesion=False`` the same subject (same anatomy, mass effect and
    noise) without the lesion's intensity change: the two differ exactly on ``seg``. A lesion that covers fewer
    than ``min_lesion_voxels`` output voxels is redrawn (deterministically from ``spec.seed``).
    """
    atlas = load_atlas(atlas_factor(abs(spec.affine[1, 1])))
    u_lesion, u = template_coords(spec)
    w, maps = tissue_weights(spec, atlas, u)
    brain = maps["brain"] > 0.5
    lesion, weight, index, rho = spec.lesion, None, None, None
    for attempt in range(20 if lesion is not None else 0):
        weight, index, rho = lesions.lesion_field(lesion, u_lesion, u)
        weight[~lesions.allowed_tissue(lesion.kind, brain, maps["gm"], maps["wm"])] = 0.0
        if (weight > 0).sum() >= min_lesion_voxels:
            break
        lesion = lesions.sample_lesion(lesion.kind, np.random.default_rng([spec.seed, attempt]), atlas,
                                       min_radius_mm=0.8 * abs(spec.affine[1, 1]))
        lesion = dataclasses.replace(lesion, mass_effect=spec.lesion.mass_effect)
    seg = weight > 0 if weight is not None else np.zeros(u.shape[1], bool)
    noise_rng = np.random.default_rng(spec.seed)
    bias = bias_field(spec)
    spacing = np.linalg.norm(spec.affine[:3, :3], axis=0)
    out = {"affine": spec.affine, "brain_mask": brain.reshape(spec.shape).astype(np.uint8),
           "seg": seg.reshape(spec.shape).astype(np.uint8), "lesion": lesion}
    for weighting in WEIGHTINGS:  # both drawn so that noise does not depend on which are written
        means = spec.means[weighting]
        clean = sum(w[t] * means[t] for t in TISSUES)
        gain = means["wm"] if weighting == "t1" else -0.8 * means["gm"]
        clean = (clean + gain * maps["texture"]).reshape(spec.shape)
        clean = ndimage.gaussian_filter(clean, spec.site.blur_mm / spacing).ravel()
        healthy = clean
        if seg.any() and with_lesion:
            target = lesions.target_intensity(lesion, weighting, means, index, rho) * (1 + 0.5 * maps["texture"])
            clean = lesions.insert_lesion(clean, weight, target)
        ref = max(means["wm"], means["csf"])
        n1, n2 = noise_rng.standard_normal((2, clean.size), dtype=np.float32) * spec.site.noise * ref
        scale = spec.site.scale / ref
        final = _quantise(np.sqrt((clean * bias + n1) ** 2 + n2 ** 2) * scale)
        if seg.any() and with_lesion:  # a change lost to rounding is kept as one scanner unit
            base = _quantise(np.sqrt((healthy * bias + n1) ** 2 + n2 ** 2) * scale)
            same = seg & (final == base)
            final[same] = np.clip(base[same] + np.where(clean[same] >= healthy[same], 1, -1), 0, 32767)
        if spec.skull_stripped:
            final = final * brain
        if weighting in spec.weightings:
            out[weighting] = final.reshape(spec.shape).astype(np.int16)
    return out


def _quantise(x: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(x), 0, 32767).astype(np.int16)
