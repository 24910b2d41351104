"""Pathology simulators of the synthetic cohort, with exact binary masks (stand-ins for paper §4.1's data sets).

Four kinds, one per unhealthy data set of the paper (Table 1):

* ``glioma`` (BraTS21-like, shown on T2): one large irregular mass (about 10–300 ml) with a necrotic core, a
  rim and surrounding oedema lobes, and *mass effect* (the neighbouring anatomy is pushed away from the centre),
* ``ms`` (MSLUB-like, T2): 4–30 small ovoid white-matter lesions, mostly periventricular and oriented radially
  to the ventricles (Dawson's fingers),
* ``stroke`` (ATLAS-like, T1): one chronic territorial infarct reaching from the cortex into the white matter
  (0.1–100 ml) or, in a quarter of the subjects, a small deep lacune; hypointense like CSF, gliotic rim,
* ``wmh`` (WMH-like, T1): 5–40 small, subtly hypointense deep/periventricular white-matter lesions.

Every lesion is a union of :class:`Blob` primitives — ellipsoids with a smoothly perturbed surface — defined in
**template (MNI) millimetres**, so they follow each subject's deformation. They are evaluated analytically at the
template coordinates of the *output* voxels (:func:`lesion_field`), hence mask and image agree on the output
grid without any resampling of the mask. The support is intersected with the subject's brain mask and a tissue
rule (MS/WMH only in white matter, stroke only in brain tissue), so a lesion never leaves the brain.

The atlas passed to the samplers is :class:`cddpm_lib.synthetic.Atlas` (template-space maps ``gm``, ``wm``,
``depth`` = mm inside the brain, ``vent_dist`` = mm to the ventricles, ``affine`` voxel → mm, ``vent_center``).
"""
from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

KINDS = ("glioma", "ms", "stroke", "wmh")
#: the pathology simulated for each unhealthy data set
DATASET_KIND: dict[str, str] = {"BraTS21": "glioma", "MSLUB": "ms", "ATLAS": "stroke", "WMH": "wmh"}
#: every voxel of the mask receives at least this fraction of the lesion contrast (no invisible mask voxels)
FLOOR = 0.35
EDGE_MM = 1.5  # width of the graded lesion border (inside the mask)


@dataclasses.dataclass(frozen=True)
class Blob:
    """Ellipsoid with an irregular surface, in template mm.

    ``radius(v) = radii * (1 + roughness * n(v))`` along unit direction ``v``, where ``n`` (in [-1, 1]) is a sum
    of ``cos(freq_j * k_j·v + phase_j)`` waves. ``role``: ``lesion``, ``tumour`` or ``oedema`` (documentation
    only). ``level`` in [0, 1]: the lesion's contrast parameter (see :func:`target_intensity`).
    """

    center: np.ndarray  # [3] mm
    rotation: np.ndarray  # [3, 3] columns = principal axes
    radii: np.ndarray  # [3] mm
    roughness: float
    waves: np.ndarray  # [J, 6]: k (3), freq, phase, weight
    role: str = "lesion"
    level: float = 0.5


@dataclasses.dataclass(frozen=True)
class LesionSpec:
    """One subject's pathology: the union of ``blobs`` is the lesion (the mask).

    Tumours add a ``core`` blob (necrosis where its relative radius < 1, solid rim up to ``1 + rim``, oedema
    beyond; compartments do not change the mask) and a mass effect ``(center [3] mm, strength, sigma mm)``.
    """

    kind: str
    blobs: tuple[Blob, ...]
    mass_effect: tuple[np.ndarray, float, float] | None = None
    core: Blob | None = None
    rim: float = 0.0

    @property
    def nominal_volume_ml(self) -> float:
        return float(sum(4 / 3 * np.pi * np.prod(b.radii) for b in self.blobs) / 1000)


# ------------------------------------------------------------------------------------------------- primitives


def random_rotation(rng: np.random.Generator, first_axis: np.ndarray | None = None) -> np.ndarray:
    """A random rotation ``[3, 3]``; with ``first_axis`` its first column is that (unit) direction."""
    q, r = np.linalg.qr(rng.standard_normal((3, 3)))
    q = q * np.sign(np.diag(r))
    if first_axis is not None:
        a = np.asarray(first_axis, float) / (np.linalg.norm(first_axis) + 1e-12)
        b = q[:, 1] - (q[:, 1] @ a) * a
        b /= np.linalg.norm(b) + 1e-12
        q = np.stack([a, b, np.cross(a, b)], axis=1)
    return q


def random_waves(rng: np.random.Generator, n: int = 6, max_freq: float = 4.0) -> np.ndarray:
    """``[n, 6]`` random surface waves: unit vector, frequency, phase and weight (weights sum to 1)."""
    k = rng.standard_normal((n, 3))
    k /= np.linalg.norm(k, axis=1, keepdims=True)
    w = rng.uniform(0.3, 1.0, n)
    return np.column_stack([k, rng.uniform(1.0, max_freq, n), rng.uniform(0, 2 * np.pi, n), w / w.sum()])


def surface_noise(directions: np.ndarray, waves: np.ndarray) -> np.ndarray:
    """``n(v)`` in [-1, 1] for unit ``directions [3, N]`` -> ``[N]``."""
    proj = waves[:, :3] @ directions  # [J, N]
    return (waves[:, 5:6] * np.cos(waves[:, 3:4] * proj + waves[:, 4:5])).sum(0)


def blob_radius(blob: Blob, points: np.ndarray) -> np.ndarray:
    """Relative radius ``rho`` of ``points [3, N]`` (mm): < 1 inside the perturbed ellipsoid, 0 at its centre."""
    local = blob.rotation.T @ (points - blob.center[:, None])  # [3, N] in the blob's axes
    scaled = local / blob.radii[:, None]
    rho = np.sqrt((scaled ** 2).sum(0))
    if blob.roughness > 0:
        direction = local / (np.linalg.norm(local, axis=0, keepdims=True) + 1e-9)
        rho = rho / (1.0 + blob.roughness * surface_noise(blob.rotation @ direction, blob.waves))
    return rho


def blob_field(blob: Blob, points: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Lesion weight ``L [N]`` (0 outside; ``FLOOR..1`` inside, graded over ``EDGE_MM``) and ``rho [N]``."""
    rho = blob_radius(blob, points)
    depth_mm = (1.0 - rho) * float(np.mean(blob.radii))
    weight = np.where(rho < 1.0, np.clip(depth_mm / EDGE_MM, FLOOR, 1.0), 0.0)
    return weight, rho


# ---------------------------------------------------------------------------------------------- field on a grid


def lesion_field(spec: LesionSpec, u_lesion: np.ndarray, u_anatomy: np.ndarray
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Evaluate ``spec`` at template coordinates of output voxels.

    ``u_lesion [3, N]``: coordinates before the mass effect (tumours are drawn there, round and undeformed);
    ``u_anatomy [3, N]``: after it (other lesions move with the anatomy). Returns ``(L [N], blob_index [N],
    rho [N])``: the lesion weight, the strongest blob per voxel (-1 outside) and its relative radius (tumours:
    the relative radius of the necrotic ``core`` blob, which sets the compartments).
    """
    n = u_anatomy.shape[1]
    weight = np.zeros(n, np.float32)
    index = np.full(n, -1, np.int16)
    rho_out = np.full(n, np.inf, np.float32)
    pts_all = u_lesion if spec.kind == "glioma" else u_anatomy
    reach = np.array([float(b.radii.max()) * (1.0 + b.roughness) + 1.0 for b in spec.blobs])
    centres = np.stack([b.center for b in spec.blobs])
    lo, hi = (centres - reach[:, None]).min(0), (centres + reach[:, None]).max(0)
    cand = np.flatnonzero(np.all((pts_all >= lo[:, None]) & (pts_all <= hi[:, None]), axis=0))  # speed
    pts_cand = pts_all[:, cand]
    for i, blob in enumerate(spec.blobs):
        near = np.all(np.abs(pts_cand - blob.center[:, None]) < reach[i], axis=0)
        idx = cand[near]
        if idx.size == 0:
            continue
        w, rho = blob_field(blob, pts_cand[:, near])
        better = w > weight[idx]
        sel = idx[better]
        weight[sel], index[sel], rho_out[sel] = w[better], i, rho[better]
    if spec.core is not None:
        inside = np.flatnonzero(weight > 0)
        rho_out[inside] = blob_radius(spec.core, u_lesion[:, inside])
    return weight, index, rho_out


def allowed_tissue(kind: str, brain: np.ndarray, gm: np.ndarray, wm: np.ndarray) -> np.ndarray:
    """Where a lesion of ``kind`` may change the image: inside the brain mask and the kind's tissue."""
    if kind in ("ms", "wmh"):
        return brain & (wm > 0.35)
    if kind == "stroke":
        return brain & (gm + wm > 0.4)
    return brain


def target_intensity(spec: LesionSpec, weighting: str, means: dict[str, float], index: np.ndarray,
                     rho: np.ndarray) -> np.ndarray:
    """Lesion intensity ``[N]`` for voxels with ``index >= 0``, relative to the site's tissue ``means``.

    T2: tumour/oedema/MS/WMH hyperintense (between GM and CSF, necrosis near CSF); T1: hypointense (stroke near
    CSF with a gliotic rim, WMH/MS between WM and GM, i.e. subtle).
    """
    csf, gm, wm = means["csf"], means["gm"], means["wm"]
    levels = np.array([b.level for b in spec.blobs] + [0.0])[index]
    t2 = weighting == "t2"
    if spec.kind == "glioma":
        core, rim = 1.0, 1.0 + spec.rim
        oedema = gm + (0.45 + 0.25 * levels) * (csf - gm) if t2 else gm - (0.2 + 0.2 * levels) * (gm - csf)
        rim_v = gm + 0.15 * (csf - gm) if t2 else gm - 0.05 * (gm - csf)
        core_v = csf * (0.85 + 0.1 * levels) if t2 else csf + 0.25 * (gm - csf)
        out = np.where(rho < rim, rim_v, oedema)
        return np.where(rho < core, core_v, out).astype(np.float32)
    if spec.kind == "stroke":
        core_v = csf + levels * (gm - csf) if not t2 else csf - 0.3 * levels * (csf - gm)
        rim_v = gm - 0.3 * (gm - csf) if not t2 else gm + 0.5 * (csf - gm)
        return np.where(rho > 0.8, rim_v, core_v).astype(np.float32)
    if spec.kind == "ms":
        return (gm + levels * (csf - gm) if t2 else wm - (0.2 + levels) * (wm - gm)).astype(np.float32)
    if spec.kind == "wmh":
        return (gm + (0.25 + 0.5 * levels) * (csf - gm) if t2 else wm - levels * (wm - gm)).astype(np.float32)
    raise ValueError(f"unknown lesion kind {spec.kind!r}; choose one of {KINDS}")


def insert_lesion(image: np.ndarray, weight: np.ndarray, target: np.ndarray) -> np.ndarray:
    """``(1 - L) * image + L * target`` on the flat voxels; unchanged wherever ``L == 0``."""
    return np.where(weight > 0, (1.0 - weight) * image + weight * target, image).astype(np.float32)


# --------------------------------------------------------------------------------------------------- samplers


def _random_point(rng: np.random.Generator, atlas: Any, condition: np.ndarray) -> np.ndarray:
    """Template mm of a random voxel where ``condition`` holds (jittered within the voxel)."""
    candidates = np.flatnonzero(condition.ravel())
    if candidates.size == 0:
        raise ValueError("lesion placement: no template voxel satisfies the placement rule")
    ijk = np.array(np.unravel_index(rng.choice(candidates), condition.shape), float) + rng.uniform(-0.5, 0.5, 3)
    return atlas.affine[:3, :3] @ ijk + atlas.affine[:3, 3]


def _supratentorial(atlas: Any, z_min_mm: float = -20.0) -> np.ndarray:
    z_mm = atlas.affine[2, 2] * np.arange(atlas.wm.shape[2]) + atlas.affine[2, 3]
    return np.broadcast_to(z_mm > z_min_mm, atlas.wm.shape)


def sample_glioma(rng: np.random.Generator, atlas: Any, min_radius_mm: float = 1.0) -> LesionSpec:
    """BraTS-like tumour: radius 15–40 mm (whole tumour 14–270 ml); an off-centre irregular necrotic core of
    20–45 % of the radius with a solid rim 30–80 % of the core radius thick; 1–2 oedema lobes."""
    radius = rng.uniform(15.0, 40.0)
    centre = _random_point(rng, atlas, (atlas.wm > 0.5) & (atlas.depth > 0.45 * radius) & _supratentorial(atlas))
    radii = radius * rng.uniform(0.75, 1.0, 3)
    main = Blob(centre, random_rotation(rng), radii, rng.uniform(0.15, 0.3), random_waves(rng), "tumour",
                rng.uniform(0, 1))
    core_r = radius * rng.uniform(0.2, 0.45)
    offset = rng.standard_normal(3)
    core = Blob(centre + offset / np.linalg.norm(offset) * rng.uniform(0.0, 0.25) * radius, random_rotation(rng),
                core_r * rng.uniform(0.7, 1.0, 3), rng.uniform(0.2, 0.4), random_waves(rng, 8, 6.0), "tumour")
    lobes = []
    for _ in range(rng.integers(1, 3)):  # oedema spreading beyond the mass
        direction = rng.standard_normal(3)
        direction /= np.linalg.norm(direction)
        lobe_r = radius * rng.uniform(0.45, 0.8, 3)
        lobes.append(Blob(centre + direction * radius * rng.uniform(0.5, 0.9), random_rotation(rng), lobe_r,
                          rng.uniform(0.15, 0.3), random_waves(rng), "oedema", rng.uniform(0, 1)))
    return LesionSpec("glioma", (main, *lobes), (centre, float(rng.uniform(0.15, 0.35)), float(radius)), core,
                      float(rng.uniform(0.3, 0.8)))


def sample_ms(rng: np.random.Generator, atlas: Any, min_radius_mm: float = 1.0) -> LesionSpec:
    """MS: 4–30 ovoids, long radius 2–12 mm (log-uniform, ≥ ``min_radius_mm``), 70 % within 2–10 mm of the
    ventricles (lesion loads of about 0.3–20 ml)."""
    blobs = []
    peri = (atlas.wm > 0.6) & (atlas.vent_dist > 2.0) & (atlas.vent_dist < 10.0)
    deep = (atlas.wm > 0.7) & (atlas.depth > 6.0)
    for _ in range(rng.integers(4, 31)):
        centre = _random_point(rng, atlas, peri if rng.random() < 0.7 else deep)
        long_r = max(float(np.exp(rng.uniform(np.log(2.0), np.log(12.0)))), min_radius_mm)
        short = max(long_r * rng.uniform(0.45, 0.75), min_radius_mm)
        rot = random_rotation(rng, centre - atlas.vent_center)  # long axis radial to the ventricles
        blobs.append(Blob(centre, rot, np.array([long_r, short, short * rng.uniform(0.8, 1.0)]),
                          rng.uniform(0.05, 0.15), random_waves(rng, 4), "lesion", rng.uniform(0.35, 0.7)))
    return LesionSpec("ms", tuple(blobs))


def sample_stroke(rng: np.random.Generator, atlas: Any, min_radius_mm: float = 1.0) -> LesionSpec:
    """Chronic stroke: a cortical–subcortical wedge (long radius 5–35 mm, log-uniform) or a lacune (2–8 mm)."""
    if rng.random() < 0.25:  # lacunar infarct in deep grey/white matter
        centre = _random_point(rng, atlas, (atlas.depth > 20.0) & (atlas.gm + atlas.wm > 0.7))
        r = max(rng.uniform(2.0, 8.0), min_radius_mm)
        blob = Blob(centre, random_rotation(rng), r * rng.uniform(0.7, 1.0, 3), rng.uniform(0.05, 0.2),
                    random_waves(rng, 4), "lesion", rng.uniform(0.05, 0.35))
        return LesionSpec("stroke", (blob,))
    surface = _random_point(rng, atlas, (atlas.gm > 0.5) & (atlas.depth > 1.0) & (atlas.depth < 6.0)
                            & _supratentorial(atlas))
    inward = atlas.brain_center - surface
    inward /= np.linalg.norm(inward)
    long_r = float(np.exp(rng.uniform(np.log(5.0), np.log(35.0))))
    radii = np.maximum(long_r * np.array([1.0, rng.uniform(0.45, 0.9), rng.uniform(0.45, 0.9)]), min_radius_mm)
    blob = Blob(surface + inward * long_r * rng.uniform(0.3, 0.6), random_rotation(rng, inward), radii,
                rng.uniform(0.1, 0.25), random_waves(rng), "lesion", rng.uniform(0.05, 0.35))
    return LesionSpec("stroke", (blob,))


def sample_wmh(rng: np.random.Generator, atlas: Any, min_radius_mm: float = 1.0) -> LesionSpec:
    """WMH: 5–40 lesions (radius 1.5–10 mm, log-uniform), 60 % periventricular caps, the rest deep white matter
    (loads of about 1–20 ml)."""
    blobs = []
    peri = (atlas.wm > 0.5) & (atlas.vent_dist > 0.5) & (atlas.vent_dist < 6.0)
    deep = (atlas.wm > 0.7) & (atlas.depth > 8.0)
    for _ in range(rng.integers(5, 41)):
        centre = _random_point(rng, atlas, peri if rng.random() < 0.6 else deep)
        r = max(float(np.exp(rng.uniform(np.log(1.5), np.log(10.0)))), min_radius_mm)
        blobs.append(Blob(centre, random_rotation(rng), r * rng.uniform(0.6, 1.0, 3), rng.uniform(0.05, 0.2),
                          random_waves(rng, 4), "lesion", rng.uniform(0.25, 0.6)))
    return LesionSpec("wmh", tuple(blobs))


SAMPLERS = {"glioma": sample_glioma, "ms": sample_ms, "stroke": sample_stroke, "wmh": sample_wmh}


def sample_lesion(kind: str, rng: np.random.Generator, atlas: Any, min_radius_mm: float = 1.0) -> LesionSpec:
    """Draw one subject's pathology of ``kind`` (see :data:`KINDS`)."""
    if kind not in SAMPLERS:
        raise ValueError(f"unknown lesion kind {kind!r}; choose one of {KINDS}")
    return SAMPLERS[kind](rng, atlas, min_radius_mm)


def mass_effect(spec: LesionSpec | None, u: np.ndarray) -> np.ndarray:
    """Backward map of the tumour's mass effect on template points ``u [3, N]`` (mm).

    ``u' = c + (u - c) (1 - m exp(-|u - c|^2 / 2 s^2))``: output voxels near the tumour sample anatomy from
    closer to its centre, i.e. tissue is pushed outwards. Monotone in ``|u - c|`` for ``m < 1``.
    """
    if spec is None or spec.mass_effect is None:
        return u
    centre, strength, sigma = spec.mass_effect
    d = u - np.asarray(centre)[:, None]
    shrink = 1.0 - strength * np.exp(-(d ** 2).sum(0) / (2 * sigma ** 2))
    return (np.asarray(centre)[:, None] + d * shrink).astype(u.dtype)
