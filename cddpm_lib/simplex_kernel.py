"""The CPU kernel of the structured simplex noise: :func:`cddpm_lib.noise.fractal_simplex` computed point by point,
compiled with numba.

The arithmetic is that of :func:`cddpm_lib.noise.opensimplex2d` (K. Spencer's 2D OpenSimplex: the point's triangle
on the stretched lattice, its two far vertices, the triangle's base vertex and one extra vertex, each contributing
``max(0, 2 − |d|²)^4 · (g · d)``), summed over the octaves. It makes one pass over every point, its octaves and
four vertices without intermediate arrays, which on one CPU thread is several times faster than the array form
(``BENCHMARKS.md``); the torch form stays the path on a GPU. The functions live at module level so that numba's
on-disk cache (``cache=True``) serves every process; :mod:`cddpm_lib.noise` imports this module only where numba is
installed.
"""
from __future__ import annotations

import numba
import numpy as np

from .noise import GRADIENTS_2D, NORM_2D, SQUISH_2D, STRETCH_2D

GRAD_X = np.array([g[0] for g in GRADIENTS_2D], dtype=np.float64)
GRAD_Y = np.array([g[1] for g in GRADIENTS_2D], dtype=np.float64)


@numba.njit(cache=True, fastmath=True)
def vertex(p, xsb, ysb, dx0, dy0, i, j):
    """``max(0, 2 − |d|²)^4 · (g · d)`` of lattice vertex ``(xsb + i, ysb + j)``; ``p``: the field's permutation."""
    shift = (i + j) * SQUISH_2D
    dx, dy = dx0 - i - shift, dy0 - j - shift
    falloff = 2.0 - dx * dx - dy * dy
    if falloff <= 0.0:
        return 0.0
    g = (p[(p[(xsb + i) & 0xFF] + ysb + j) & 0xFF] & 0x0E) >> 1
    falloff *= falloff
    return falloff * falloff * (GRAD_X[g] * dx + GRAD_Y[g] * dy)


@numba.njit(cache=True, fastmath=True)
def fractal(perm, offset, octaves, persistence, frequency, out):
    """``out[b, row, col] = Σ_k persistence^k · n_b((col, row) · frequency · 2^k + offset[b])``.

    perm: int64 ``[B, 256]``; offset: float64 ``[B, 2]``; out: float64 ``[B, H, W]``, overwritten.
    """
    out[:] = 0.0
    for b in range(out.shape[0]):
        p = perm[b]
        amplitude, scale = 1.0 / NORM_2D, frequency
        for _ in range(octaves):
            for row in range(out.shape[1]):
                y = row * scale + offset[b, 1]
                for col in range(out.shape[2]):
                    x = col * scale + offset[b, 0]
                    stretch = (x + y) * STRETCH_2D
                    xs, ys = x + stretch, y + stretch
                    fx, fy = np.floor(xs), np.floor(ys)
                    xsb, ysb = int(fx), int(fy)
                    squish = (fx + fy) * SQUISH_2D
                    dx0, dy0 = x - (fx + squish), y - (fy + squish)
                    xins, yins = xs - fx, ys - fy
                    in_sum = xins + yins
                    value = vertex(p, xsb, ysb, dx0, dy0, 1, 0) + vertex(p, xsb, ysb, dx0, dy0, 0, 1)
                    if in_sum <= 1.0:  # triangle at (0, 0); extra vertex (1, −1)/(−1, 1) or (1, 1)
                        value += vertex(p, xsb, ysb, dx0, dy0, 0, 0)
                        if (1.0 - in_sum) > xins or (1.0 - in_sum) > yins:
                            ei, ej = (1, -1) if xins > yins else (-1, 1)
                        else:
                            ei, ej = 1, 1
                    else:  # triangle at (1, 1); extra vertex (2, 0)/(0, 2) or (0, 0)
                        value += vertex(p, xsb, ysb, dx0, dy0, 1, 1)
                        if (2.0 - in_sum) < xins or (2.0 - in_sum) < yins:
                            ei, ej = (2, 0) if xins > yins else (0, 2)
                        else:
                            ei, ej = 0, 0
                    value += vertex(p, xsb, ysb, dx0, dy0, ei, ej)
                    out[b, row, col] += amplitude * value
            amplitude *= persistence
            scale *= 2.0
