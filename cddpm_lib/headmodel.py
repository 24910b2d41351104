"""A head model for synthetic brain MRIs, built from nilearn's MNI152 2009 T1 template and its grey/white-matter
maps (shipped with nilearn, no download): one subject's raw scan, rendered in a single backward resampling from
its *raw scanner grid* to the template (the data of paper §4.1 are replaced by such scans, see :mod:`synthetic`).

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
   scanner units; skull-stripped subjects have background exactly 0.

The template maps are averaged down to the output voxel size first (1–4 mm) and cached on disk, so coarse scans
render fast.
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


ATLAS_VERSION = 1  # bump when the derived maps change (invalidates the on-disk cache)


def build_atlas(factor: int) -> Atlas:
    """The template maps averaged to ``factor`` mm, plus texture, hull distance, depth and ventricles."""
    if factor not in (1, 2, 3, 4):
        raise ValueError(f"atlas factor must be 1-4 mm, got {factor}")
    t1, gm, wm, mask, affine = mni152_maps()
    t1, gm, wm, brain = (block_mean(v, factor) for v in (t1, gm * mask, wm * mask, mask))
    inside = brain > 0.5
    csf = np.clip(brain - gm - wm, 0, 1)
    design = np.stack([gm[inside], wm[inside], csf[inside]], 1)
    coef = np.linalg.solve(design.T @ design, design.T @ t1[inside])
    texture = np.where(inside, (t1 - coef[0] * gm - coef[1] * wm - coef[2] * csf) / coef[1], 0.0)
    affine = affine @ np.diag([factor, factor, factor, 1.0])
    affine[:3, 3] += affine[:3, :3] @ np.full(3, (factor - 1) / (2.0 * factor))  # block centres
    outer = ndimage.distance_transform_edt(~inside, sampling=factor) > 5.0  # closing by 5 mm
    hull = ndimage.binary_fill_holes(ndimage.distance_transform_edt(~outer, sampling=factor) > 5.0)
    depth = ndimage.distance_transform_edt(inside, sampling=factor).astype(np.float32)
    ventricles = (csf > 0.5) & (depth > 10.0)
    labels, n = ndimage.label(ventricles)
    sizes = ndimage.sum(ventricles, labels, range(1, n + 1)) * factor ** 3
    ventricles = np.isin(labels, 1 + np.flatnonzero(sizes >= 1000.0))  # components >= 1 ml
    to_mm = lambda ijk: affine[:3, :3] @ ijk + affine[:3, 3]  # noqa: E731
    return Atlas(factor, gm, wm, brain, texture.astype(np.float32), signed_distance(hull, factor), depth,
                 ndimage.distance_transform_edt(~ventricles, sampling=factor).astype(np.float32), affine,
                 to_mm(np.argwhere(inside).mean(0)), to_mm(np.argwhere(ventricles).mean(0)))


@lru_cache(maxsize=4)
def load_atlas(factor: int = 2) -> Atlas:
    """:func:`build_atlas`, cached in memory and on disk (``$CDDPM_DATA_ROOT/cache``; rebuilt when unreadable)."""
    from . import paths
    from .volumes import load_npz, save_npz

    cache = paths.data_root() / "cache" / f"mni152_atlas_{factor}mm_v{ATLAS_VERSION}.npz"
    if cache.exists():
        try:
            return Atlas(**{k: (int(v) if k == "factor" else v) for k, v in load_npz(cache).items()})
        except (ValueError, TypeError):
            pass
    atlas = build_atlas(factor)
    save_npz(cache, **dataclasses.asdict(atlas))
    return atlas


def atlas_factor(voxel_mm: float) -> int:
    """Template resolution used for an output voxel size: the nearest of 1–4 mm."""
    return int(np.clip(round(voxel_mm), 1, 4))


def sample_maps(volumes: list[np.ndarray], atlas: Atlas, u: np.ndarray) -> list[np.ndarray]:
    """Trilinear values of template maps at template mm ``u [3, N]`` (edges extend: the neck continues)."""
    inv = np.linalg.inv(atlas.affine)
    ijk = (inv[:3, :3] @ u + inv[:3, 3:4]).astype(np.float32)
    return [ndimage.map_coordinates(v, ijk, order=1, mode="nearest").astype(np.float32) for v in volumes]


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
    displacement: np.ndarray  # [3, J, 5] Fourier modes per axis: wave vector (rad/mm), phase, amplitude (mm)
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


def sample_subject(site: Site, rng: np.random.Generator, *, voxel_mm: float, dataset: str = "",
                   subject_id: str = "", weightings: tuple[str, ...] = WEIGHTINGS, lesion_kind: str = "",
                   skull_stripped: bool = False, fov_mm: tuple[float, float, float] = (200.0, 232.0, 208.0),
                   anisotropic: bool = True) -> SubjectSpec:
    """Draw one subject scanned at ``site``; ``lesion_kind`` one of :data:`lesions.KINDS` or ``""`` (healthy)."""
    shape, affine = raw_grid(voxel_mm, fov_mm, site, anisotropic)
    pose = np.eye(4)
    rot = rotation_matrix(rng.uniform(-1, 1, 3) * site.pose_deg * np.array([1.0, 0.5, 0.5]))
    pose[:3, :3] = rot.T
    pose[:3, 3] = HEAD_CENTER_MM - rot.T @ (rng.uniform(-1, 1, 3) * site.pose_mm)
    atlas = load_atlas(atlas_factor(voxel_mm))
    m = rotation_matrix(rng.uniform(-3, 3, 3)) @ np.diag(rng.uniform(0.95, 1.05) * rng.uniform(0.97, 1.03, 3))
    anatomy = np.eye(4)
    anatomy[:3, :3] = m
    anatomy[:3, 3] = atlas.brain_center - m @ atlas.brain_center
    means = {w: {t: BASE_MEANS[w][t] * site.contrast.get(w, {}).get(t, 1.0) * rng.uniform(0.97, 1.03)
                 for t in TISSUES} for w in WEIGHTINGS}
    lesion = lesions.sample_lesion(lesion_kind, rng, atlas, min_radius_mm=0.8 * voxel_mm) if lesion_kind else None
    return SubjectSpec(dataset, subject_id, site, tuple(weightings), bool(skull_stripped), shape, affine, pose,
                       anatomy, random_displacement(rng), float(rng.uniform(-0.1, 0.3)),
                       float(rng.uniform(0.8, 1.25)), means, rng.normal(0, 1, 10) * site.bias,
                       int(rng.integers(2 ** 31)), lesion)


def random_displacement(rng: np.random.Generator, modes: int = 8, rms_mm: float = 2.0,
                        wavelengths_mm: tuple[float, float] = (50.0, 150.0)) -> np.ndarray:
    """A smooth random displacement field as ``modes`` plane waves per axis: ``[3, modes, 5]``."""
    k = rng.standard_normal((3, modes, 3))
    k *= (2 * np.pi / rng.uniform(*wavelengths_mm, (3, modes, 1))) / np.linalg.norm(k, axis=2, keepdims=True)
    amp = rng.standard_normal((3, modes, 1)) * rms_mm * np.sqrt(2.0 / modes)
    return np.concatenate([k, rng.uniform(0, 2 * np.pi, (3, modes, 1)), amp], axis=2)


def displace(displacement: np.ndarray, u: np.ndarray) -> np.ndarray:
    """``D(u) = sum_j a_j sin(k_j . u + phi_j)`` per axis at points ``u [3, N]`` (mm) -> ``[3, N]``."""
    u = u.astype(np.float32)
    modes = displacement.astype(np.float32)
    return np.stack([(m[:, 4:5] * np.sin(m[:, :3] @ u + m[:, 3:4])).sum(0) for m in modes])


def _upsample2(field: np.ndarray, shape: tuple[int, int, int]) -> np.ndarray:
    """Exact trilinear upsampling by 2 of ``[C, a, b, c]`` sampled at even voxel indices -> ``[C, *shape]``."""
    for axis in (1, 2, 3):
        f = np.moveaxis(field, axis, 0)
        out = np.empty((2 * f.shape[0] - 1, *f.shape[1:]), f.dtype)
        out[0::2], out[1::2] = f, 0.5 * (f[:-1] + f[1:])
        field = np.moveaxis(out, 0, axis)
    return field[:, :shape[0], :shape[1], :shape[2]]


def template_coords(spec: SubjectSpec, atlas: Atlas) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Template mm of every raw voxel ``(u_lesion, u_anatomy)``, each ``[3, N]`` (before/after the mass effect),
    and the signed distance to the intracranial hull ``[N]`` (mm) at ``u_anatomy``.

    The smooth chain (pose, affine, displacement, ventricles, mass effect) and the distance are evaluated on
    every second voxel and upsampled trilinearly when voxels are <= 2.5 mm (they vary over centimetres).
    """
    step = 2 if np.linalg.norm(spec.affine[:3, :3], axis=0).max() <= 2.5 else 1
    coarse = [np.arange(0, n + 1, 2)[: (n + 2) // 2] if step == 2 else np.arange(n) for n in spec.shape]
    ijk = np.stack(np.meshgrid(*coarse, indexing="ij")).reshape(3, -1).astype(np.float64)
    chain = spec.anatomy @ spec.pose @ spec.affine
    u = chain[:3, :3] @ ijk + chain[:3, 3:4]
    u = u + displace(spec.displacement, u)
    d = u - atlas.vent_center[:, None]
    u = atlas.vent_center[:, None] + d * (1.0 - spec.ventricle_scale * np.exp(-(d ** 2).sum(0) / (2 * 20.0 ** 2)))
    u_anat = lesions.mass_effect(spec.lesion, u)
    moved = u_anat is not u
    fields = np.concatenate([u_anat, sample_maps([atlas.hull_dist], atlas, u_anat)[0][None]]
                            + ([u] if moved else [])).astype(np.float32)
    if step == 2:
        fields = _upsample2(fields.reshape(len(fields), *(len(c) for c in coarse)), spec.shape)
    fields = fields.reshape(len(fields), -1)
    return (fields[4:] if moved else fields[:3]), fields[:3], fields[3]


def _ramp(x: np.ndarray, width: float) -> np.ndarray:
    return np.clip(0.5 + x / width, 0.0, 1.0)


def tissue_weights(spec: SubjectSpec, atlas: Atlas, u: np.ndarray, dist: np.ndarray
                   ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Fractions of each tissue ``[N]`` per raw voxel (from template mm ``u [3, N]`` and hull distance
    ``dist [N]``), plus the sampled ``gm, wm, brain, texture`` maps."""
    n, width = u.shape[1], float(atlas.factor)
    near = np.flatnonzero(dist < width)
    maps = {k: np.zeros(n, np.float32) for k in ("gm", "wm", "brain", "texture")}
    for k, values in zip(maps, sample_maps([getattr(atlas, k) for k in maps], atlas, u[:, near])):
        maps[k][near] = values
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
    axes = [np.arange(n, dtype=np.float32).reshape([-1 if i == k else 1 for k in range(3)])
            for i, n in enumerate(spec.shape)]
    x, y, z = ((sum(spec.affine[r, c] * axes[c] for c in range(3)) + spec.affine[r, 3]) / 100.0 for r in range(3))
    c = spec.bias
    log = (c[0] * x + c[1] * y + c[2] * z
           + 0.5 * (c[3] * x * x + c[4] * y * y + c[5] * z * z + c[6] * x * y + c[7] * x * z + c[8] * y * z))
    return np.exp(np.broadcast_to(log, spec.shape)).astype(np.float32).ravel()


def render_subject(spec: SubjectSpec, *, with_lesion: bool = True, min_lesion_voxels: int = 3) -> dict:
    """Render a subject's raw volumes.

    Returns ``{"t1"/"t2": int16 [X, Y, Z] scanner units, "brain_mask": uint8, "seg": uint8, "affine": [4, 4],
    "lesion": LesionSpec | None}``. With ``with_lesion=False`` the same subject (same anatomy, mass effect and
    noise) without the lesion's intensity change: the two differ exactly on ``seg``. A lesion that covers fewer
    than ``min_lesion_voxels`` output voxels is redrawn (deterministically from ``spec.seed``).
    """
    atlas = load_atlas(atlas_factor(abs(spec.affine[1, 1])))
    u_lesion, u, dist = template_coords(spec, atlas)
    w, maps = tissue_weights(spec, atlas, u, dist)
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
            step = np.where((clean[same] >= healthy[same]) | (base[same] == 0), 1, -1)
            final[same] = base[same] + step
        if spec.skull_stripped:
            final = final * brain
        if weighting in spec.weightings:
            out[weighting] = final.reshape(spec.shape).astype(np.int16)
    return out


def _quantise(x: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(x), 0, 32767).astype(np.int16)
