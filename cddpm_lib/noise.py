"""Noise of the forward diffusion process (paper §3.1, §4.4) and of the DAE baseline.

- :class:`SimplexNoise` — structured multi-octave simplex noise of Wyatt et al. (AnoDDPM, 2022), which the paper
  uses for DDPM, pDDPM and cDDPM (§4.4). The base noise is 2D *OpenSimplex* noise (K. Spencer's algorithm, the
  one the authors' code and the ``opensimplex`` package implement), computed for whole batches at once: as torch
  array operations on any device (:func:`opensimplex2d`) and, on a CPU, by a numba-compiled kernel of the same
  arithmetic that is several times faster there (:func:`fractal_simplex`, ``backend``).
- :class:`GaussianNoise` — ``ε ~ N(0, I)`` of the standard DDPM (Ho et al. 2020).
- :func:`coarse_noise` — low-resolution Gaussian noise for the DAE baseline (Kascenas et al. 2022).

Octave convention. The authors call ``rand_3d_fixed_T_octaves(shape, T, octaves=6, persistence=0.8,
frequency=64)``, which samples the noise at pixel coordinates divided by 64 and halves that divisor at each
octave. Here ``frequency`` is the reciprocal (lattice units per pixel): octave ``k`` samples at
``pixel · frequency · 2^k`` with amplitude ``persistence^k``, so ``frequency=1/64`` reproduces the authors'
``frequency=64``. The authors evaluate a 3D noise at the fixed third coordinate ``t / 64``; a fixed-z slice of
3D OpenSimplex noise and 2D OpenSimplex noise have the same character (smooth, isotropic, band-limited), and
the kit uses the 2D noise.

Differences to the authors' code (options): they draw one field and repeat it over the batch
(``shared_across_batch=True`` reproduces that; default: an independent field per sample, from its own random
permutation table and random offset). Like the authors, fields are not normalised by default (their standard
deviation is about 0.6 with these settings; with the images diffused in [−1, 1] as the authors do, see
:mod:`cddpm_lib.diffusion`, ``t_test`` then destroys as much of the image as in the authors' runs);
``normalize=True`` makes each field zero-mean with unit variance, the variance the DDPM schedule assumes.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Protocol, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

#: OpenSimplex 2D constants: skew onto the rhombic lattice and back, normalisation (K. Spencer)
STRETCH_2D = (1 / math.sqrt(3) - 1) / 2
SQUISH_2D = (math.sqrt(3) - 1) / 2
NORM_2D = 47.0
#: the 8 lattice gradients of 2D OpenSimplex (directions to the vertices of an octagon); row = (perm & 14) / 2
GRADIENTS_2D = ((5, 2), (2, 5), (-5, 2), (-2, 5), (5, -2), (2, -5), (-5, -2), (-2, -5))
#: the permutation table repeats every 256 lattice cells, so offsets beyond that add nothing
LATTICE_PERIOD = 256
#: how :func:`fractal_simplex` computes: ``auto`` (numba on a CPU where installed, else torch), ``torch``, ``numba``
SIMPLEX_BACKENDS = ("auto", "torch", "numba")


class NoiseFn(Protocol):
    """A noise generator: ``noise(shape, generator=None, device=None) -> ε`` of that shape (float32)."""

    def __call__(self, shape: Sequence[int], generator: torch.Generator | None = None,
                 device: torch.device | str | None = None) -> Tensor: ...


def _source_device(generator: torch.Generator | None, device: torch.device | str | None) -> torch.device:
    """Device on which random numbers are drawn: the generator's when given (results independent of ``device``)."""
    if generator is not None:
        return generator.device
    return torch.device(device) if device is not None else torch.device("cpu")


def random_permutations(n: int, generator: torch.Generator | None = None,
                        device: torch.device | str | None = None) -> Tensor:
    """``n`` independent random permutations of ``0..255`` -> ``[n, 256]`` int64."""
    keys = torch.rand(n, LATTICE_PERIOD, generator=generator, device=_source_device(generator, device))
    return keys.argsort(dim=1).to(device if device is not None else keys.device)


def _wrapped_tables(perm: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor, Tensor]:
    """The hash lookups of :func:`opensimplex2d`, widened so that no index needs masking with ``& 255``.

    ``perm1[k] = perm[(k − 1) & 255]`` for ``k`` in 0..258 (a lattice coordinate mod 256, plus a vertex offset in
    −1..2, plus one); ``gx[k], gy[k] = GRADIENTS_2D[(perm[(k − 1) & 255] & 14) / 2]`` for ``k`` in 0..513 (a perm
    value plus a lattice coordinate mod 256 plus an offset, plus one). ``perm1`` holds the values as ``dtype``:
    the index arithmetic stays in floating point (exact for these small integers) up to the gathers.
    """
    grads = torch.tensor(GRADIENTS_2D, dtype=dtype, device=perm.device)
    g = grads[(perm & 0x0E) >> 1]  # [B, 256, 2]
    k1 = (torch.arange(LATTICE_PERIOD + 3, device=perm.device) - 1) % LATTICE_PERIOD
    k2 = (torch.arange(2 * LATTICE_PERIOD + 2, device=perm.device) - 1) % LATTICE_PERIOD
    return perm[:, k1].to(dtype), g[:, k2, 0].contiguous(), g[:, k2, 1].contiguous()


def opensimplex2d(x: Tensor, y: Tensor, perm: Tensor) -> Tensor:
    """2D OpenSimplex noise at points ``(x, y)``, vectorised: ``x, y: [B, N]``, ``perm: [B, 256]`` -> ``[B, N]``.

    Each point gets the contributions of four lattice vertices of the stretched (rhombic) grid — (1, 0), (0, 1),
    the base vertex (0, 0) or (1, 1) of its triangle, and one extra vertex chosen by its position — each
    ``max(0, 2 − |d|²)^4 · (g · d)`` with ``d`` the offset to the vertex and ``g`` the gradient picked by hashing
    ``perm[(perm[xsv & 255] + ysv) & 255] & 14``, summed and divided by 47. Values lie in about ``[−1, 1]``.

    The vertex choice is arithmetic on 0/1 masks and the hash runs through widened tables
    (:func:`_wrapped_tables`), so everything up to the gathers is floating-point arithmetic on whole arrays.
    """
    stretch = (x + y) * STRETCH_2D
    xs, ys = x + stretch, y + stretch
    xsb, ysb = torch.floor(xs), torch.floor(ys)
    squish = (xsb + ysb) * SQUISH_2D
    dx0, dy0 = x - (xsb + squish), y - (ysb + squish)
    xins, yins = xs - xsb, ys - ysb
    in_sum = xins + yins
    lower = in_sum <= 1  # inside the triangle at (0, 0), else inside the one at (1, 1)
    # near: lower triangle -> (0, 0) is among the two closest vertices; upper -> (1, 1) is
    near = torch.where(lower, ((1 - in_sum) > xins) | ((1 - in_sum) > yins),
                       ((2 - in_sum) < xins) | ((2 - in_sum) < yins)).to(x.dtype)
    low, x_wins = lower.to(x.dtype), (xins > yins).to(x.dtype)
    # base vertex (bi, bi) of the triangle; extra vertex (ei, ej): lower triangle -> (1, −1) or (−1, 1) when near
    # (x or y wins), else (1, 1); upper triangle -> (2, 0) or (0, 2) when near, else (0, 0)
    near_x, low_near = near * x_wins, low * near
    bi = 1 - low
    ei = low + 2 * (near_x - low_near)
    ej = low + 2 * (near - near_x - low_near)
    xm = torch.remainder(xsb, LATTICE_PERIOD) + 1  # + 1: the tables are indexed one past the value
    ym = torch.remainder(ysb, LATTICE_PERIOD) + 1
    perm1, gx, gy = _wrapped_tables(perm, x.dtype)
    value = torch.zeros_like(x)
    for i, j in ((1, 0), (0, 1), (bi, bi), (ei, ej)):
        if isinstance(i, int):
            dx, dy = dx0 - (i + (i + j) * SQUISH_2D), dy0 - (j + (i + j) * SQUISH_2D)
        else:
            shift = (i + j) * SQUISH_2D
            dx, dy = dx0 - i - shift, dy0 - j - shift
        attn = (2 - dx * dx - dy * dy).clamp_min_(0)
        attn = attn * attn
        h = (perm1.gather(1, (xm + i).long()) + ym + j).long()
        value += attn * attn * (gx.gather(1, h) * dx + gy.gather(1, h) * dy)
    return value / NORM_2D


@functools.cache
def _compiled_fractal():
    """The CPU kernel of :func:`fractal_simplex` (:func:`cddpm_lib.simplex_kernel.fractal`), or ``None`` where numba
    is not installed (then the torch form runs)."""
    import importlib.util

    if importlib.util.find_spec("numba") is None:
        return None
    from .simplex_kernel import fractal

    return fractal


def fractal_simplex(height: int, width: int, perm: Tensor, offset: Tensor, octaves: int = 6,
                    persistence: float = 0.8, frequency: float = 1 / 64, dtype: torch.dtype = torch.float32,
                    backend: str = "auto") -> Tensor:
    """Sum of ``octaves`` OpenSimplex layers (AnoDDPM): ``Σ_k persistence^k · n(pixel · frequency · 2^k + offset)``.

    perm: [B, 256] permutation tables; offset: [B, 2] lattice offsets (x, y) -> [B, height, width].
    Pixel ``(row, col)`` is sampled at ``(x, y) = (col, row)`` scaled, as in the authors' code.

    backend: ``torch`` — :func:`opensimplex2d` on whole arrays (CPU or GPU); ``numba`` — the compiled CPU kernel
    (:mod:`cddpm_lib.simplex_kernel`, in float64 and then cast to ``dtype``; the two agree to 1e-9 in float64,
    while the torch form in float32 also rounds the sample coordinates, about 1e-4 apart); ``auto`` — numba for CPU
    tensors where it is installed, torch otherwise.
    """
    if backend not in SIMPLEX_BACKENDS:
        raise ValueError(f"fractal_simplex: backend must be one of {SIMPLEX_BACKENDS}, got {backend!r}")
    if perm.ndim != 2 or perm.shape[1] != LATTICE_PERIOD or tuple(offset.shape) != (perm.shape[0], 2):
        raise ValueError(f"fractal_simplex: expected perm [B, {LATTICE_PERIOD}] and offset [B, 2], got "
                         f"{tuple(perm.shape)} and {tuple(offset.shape)}")
    kernel = _compiled_fractal() if backend != "torch" and perm.device.type == "cpu" else None
    if backend == "numba" and kernel is None:
        raise RuntimeError("fractal_simplex: backend='numba' needs numba installed and CPU tensors")
    if kernel is not None:
        out = np.empty((perm.shape[0], height, width), dtype=np.float64)
        kernel(np.ascontiguousarray(perm.detach().numpy(), dtype=np.int64),
               offset.detach().to("cpu", torch.float64).numpy(), int(octaves), float(persistence), float(frequency),
               out)
        return torch.from_numpy(out).to(dtype)
    device = perm.device
    rows = torch.arange(height, device=device, dtype=dtype)
    cols = torch.arange(width, device=device, dtype=dtype)
    yy, xx = torch.meshgrid(rows, cols, indexing="ij")
    xx, yy = xx.reshape(1, -1), yy.reshape(1, -1)
    offset = offset.to(device=device, dtype=dtype)
    noise = torch.zeros(perm.shape[0], height * width, device=device, dtype=dtype)
    for k in range(octaves):
        scale = frequency * 2 ** k
        noise = noise + persistence ** k * opensimplex2d(xx * scale + offset[:, :1], yy * scale + offset[:, 1:], perm)
    return noise.reshape(-1, height, width)


def standardize_fields(noise: Tensor, eps: float = 1e-8) -> Tensor:
    """Zero mean and unit variance per field over the last two axes (``[..., H, W]``)."""
    mean = noise.mean(dim=(-2, -1), keepdim=True)
    std = noise.std(dim=(-2, -1), keepdim=True)
    return (noise - mean) / (std + eps)


@dataclass(frozen=True)
class SimplexNoise:
    """Structured simplex noise of Wyatt et al. (AnoDDPM) for the diffusion forward process (paper §4.4).

    Defaults: 6 octaves, persistence 0.8, ``frequency=1/64`` (the authors' ``frequency=64``, module docstring).
    ``shared_across_batch``: one field repeated over the batch (authors) instead of one per sample.
    ``normalize``: zero mean, unit variance per field (default off, as in the authors' code).
    ``backend``: how :func:`fractal_simplex` computes the fields (``auto``: the compiled kernel on a CPU).
    """

    octaves: int = 6
    persistence: float = 0.8
    frequency: float = 1 / 64
    normalize: bool = False
    shared_across_batch: bool = False
    backend: str = "auto"

    def __post_init__(self) -> None:
        if self.octaves < 1 or self.frequency <= 0 or not 0 < self.persistence:
            raise ValueError(f"SimplexNoise: need octaves >= 1, frequency > 0 and persistence > 0, got "
                             f"{self.octaves}, {self.frequency}, {self.persistence}")
        if self.backend not in SIMPLEX_BACKENDS:
            raise ValueError(f"SimplexNoise: backend must be one of {SIMPLEX_BACKENDS}, got {self.backend!r}")

    def __call__(self, shape: Sequence[int], generator: torch.Generator | None = None,
                 device: torch.device | str | None = None) -> Tensor:
        """ε of ``shape = [B, C, H, W]`` (float32); each of the ``B · C`` fields independent unless shared. The
        random tables come from ``generator`` (on its device); the fields are computed on ``device``."""
        *lead, height, width = (int(s) for s in shape)
        n = math.prod(lead)
        n_fields = 1 if self.shared_across_batch else n
        src = _source_device(generator, device)
        perm = random_permutations(n_fields, generator, src)
        offset = torch.rand(n_fields, 2, generator=generator, device=src) * LATTICE_PERIOD
        out_device = torch.device(device) if device is not None else src
        noise = fractal_simplex(height, width, perm.to(out_device), offset.to(out_device), self.octaves,
                                self.persistence, self.frequency, backend=self.backend)
        if self.normalize:
            noise = standardize_fields(noise)
        if self.shared_across_batch:
            noise = noise.expand(n, height, width)
        return noise.reshape(*lead, height, width).contiguous()


@dataclass(frozen=True)
class GaussianNoise:
    """``ε ~ N(0, I)`` (Ho et al. 2020)."""

    def __call__(self, shape: Sequence[int], generator: torch.Generator | None = None,
                 device: torch.device | str | None = None) -> Tensor:
        src = _source_device(generator, device)
        eps = torch.randn(*shape, generator=generator, device=src)
        return eps.to(device) if device is not None else eps


def make_noise(kind: str, image_size: Sequence[int] = (96, 96), octaves: int = 6, persistence: float = 0.8,
               frequency: float | None = None, normalize: bool = False, shared_across_batch: bool = False) -> NoiseFn:
    """Noise by name: ``simplex`` or ``gaussian``.

    ``frequency=None`` scales the authors' 1/64 at 96 px to the image size (``1/64 · 96 / H``), so the noise keeps
    its size relative to the anatomy when the kit's CPU profiles shrink the volumes (64 px, 32 px).
    """
    if kind == "gaussian":
        return GaussianNoise()
    if kind == "simplex":
        if frequency is None:
            frequency = (1 / 64) * 96 / float(image_size[0])
        return SimplexNoise(octaves, persistence, frequency, normalize, shared_across_batch)
    raise ValueError(f"unknown noise {kind!r}; use 'simplex' or 'gaussian'")


def coarse_noise(shape: Sequence[int], mask: Tensor | None = None, resolution: Sequence[int] | None = None,
                 std: float = 0.2, generator: torch.Generator | None = None,
                 device: torch.device | str | None = None) -> Tensor:
    """Coarse Gaussian noise of the DAE baseline (Kascenas et al. 2022): ``[B, C, H, W]``.

    ``N(0, std²)`` drawn on a ``resolution`` grid (default: 16×16 per 128 px, i.e. ``round(16 · H / 128)``),
    bilinearly upsampled to ``H × W`` and, when ``mask`` (``[B, 1|C, H, W]``) is given, zeroed outside it.
    """
    b, c, h, w = (int(s) for s in shape)
    if resolution is None:
        resolution = (max(1, round(16 * h / 128)), max(1, round(16 * w / 128)))
    src = _source_device(generator, device)
    low = torch.randn(b, c, *resolution, generator=generator, device=src) * std
    noise = F.interpolate(low, size=(h, w), mode="bilinear", align_corners=False)
    if device is not None:
        noise = noise.to(device)
    if mask is not None:
        noise = noise * mask.to(noise.device, noise.dtype)
    return noise
