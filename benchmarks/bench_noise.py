"""Structured simplex noise (paper §4.4, Wyatt et al.): the kit's batched torch noise against ``opensimplex``.

One batch of ``--batch`` independent fields of 96 × 96 pixels, 6 octaves, persistence 0.8, base frequency 1/64
(the authors' settings) is generated twice in this process:

- **reference**: the ``opensimplex`` package, one field at a time (``OpenSimplex(seed).noise2array`` per octave),
  which is how the authors' code builds its noise (they use a numba-compiled fork of the same algorithm); the
  package compiles its loops with numba when numba is installed (a dependency of the kit) and runs them in pure
  Python otherwise, and the table says which ran (the compilation is left out of the timing);
- **kit**: :class:`cddpm_lib.noise.SimplexNoise` — all fields of the batch in one call: on a CPU the numba kernel
  (its default there), and the torch array form (``backend='torch'``, the path on a GPU), the latter timed under
  glibc's default allocator and with freed memory kept in the process (:func:`cddpm_lib.runtime.keep_freed_memory`),
  as the kit's training loop draws it.

Agreement: the kit's :func:`~cddpm_lib.noise.opensimplex2d` with the package's permutation table reproduces the
package's values (max |Δ| reported). Also the cost of drawing the noise as a fraction of one training step
(forward + backward + Adam) of the DDPM at the quick and the paper width.

    .venv/bin/python -m benchmarks.bench_noise [--batch 32] [--repeats 5] [--threads N]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks import write_section
from cddpm_lib import runtime
from cddpm_lib.models import build_model
from cddpm_lib.noise import SimplexNoise, fractal_simplex

RESULTS = Path(__file__).resolve().parent / "results" / "noise.md"
SIZE, OCTAVES, PERSISTENCE, FREQUENCY = 96, 6, 0.8, 1 / 64


def timed(fn, repeats: int) -> tuple[float, object]:
    """Median wall time over ``repeats`` calls (after one warm-up call) and the last result."""
    out = fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def opensimplex_field(gen) -> np.ndarray:
    """One fractal field with an ``opensimplex.OpenSimplex`` generator, octave by octave -> ``[96, 96]``."""
    coords = np.arange(SIZE, dtype=np.float64)
    out, freq, amp = np.zeros((SIZE, SIZE)), FREQUENCY, 1.0
    for _ in range(OCTAVES):
        out += amp * gen.noise2array(coords * freq, coords * freq)
        freq, amp = freq * 2, amp * PERSISTENCE
    return out


def opensimplex_batch(n: int, seed0: int = 0) -> np.ndarray:
    """``n`` fields with the ``opensimplex`` package, one field (own seed) at a time -> ``[n, 96, 96]``."""
    import opensimplex

    return np.stack([opensimplex_field(opensimplex.OpenSimplex(seed=seed0 + i)) for i in range(n)])


def agreement() -> float:
    """max |kit − opensimplex| for one field with the package's own permutation table."""
    import opensimplex

    gen = opensimplex.OpenSimplex(seed=7)
    perm = torch.from_numpy(np.asarray(gen._perm, dtype=np.int64))[None]
    kit = fractal_simplex(SIZE, SIZE, perm, torch.zeros(1, 2), OCTAVES, PERSISTENCE, FREQUENCY, torch.float64)[0]
    return float(np.abs(kit.numpy() - opensimplex_field(gen)).max())


def step_fraction(size: int, batch: int, repeats: int, **hparams) -> tuple[float, float]:
    """(noise seconds, training-step seconds) for the DDPM at ``hparams`` on ``batch`` slices of ``size``²."""
    torch.manual_seed(0)
    model = build_model("ddpm", image_size=(size, size), **hparams)
    opt = model.configure_optimizers(1e-4)
    x = torch.rand(batch, 1, size, size)
    data = {"image": x, "mask": torch.ones_like(x)}
    t_noise, _ = timed(lambda: model.diffusion.noise_like(x), repeats)
    t_step, _ = timed(lambda: model.training_step(data, opt, 0), repeats)
    return t_noise, t_step


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--ref-repeats", type=int, default=None,
                    help="repeats of the reference (default: --repeats with numba, 1 in pure Python)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    ap.add_argument("--skip-paper", action="store_true", help="skip the paper-width training step (slow on CPU)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    shape = (args.batch, 1, SIZE, SIZE)
    try:
        import numba  # noqa: F401
        has_numba = True
    except ImportError:
        has_numba = False
    numba_note = "compiled with numba" if has_numba else "pure Python (numba not installed)"

    def draw(backend: str):
        noise = SimplexNoise(OCTAVES, PERSISTENCE, FREQUENCY, normalize=False, backend=backend)
        return lambda: noise(shape, generator=torch.Generator().manual_seed(0))

    t_array_default, _ = timed(draw("torch"), args.repeats)
    kept = runtime.keep_freed_memory()
    t_array, _ = timed(draw("torch"), args.repeats)
    t_kit, _ = timed(draw("auto"), args.repeats)
    kit_backend = "numba kernel" if has_numba else "torch array form (numba not installed)"
    ref_repeats = args.ref_repeats or (args.repeats if has_numba else 1)
    t_ref, _ = timed(lambda: opensimplex_batch(args.batch), ref_repeats)
    if args.threads:  # numba's parallel threading layer (opensimplex) resets the OpenMP thread count torch uses
        torch.set_num_threads(args.threads)
    delta = agreement()
    print(f"kit {t_kit:.3f} s ({kit_backend}), array form {t_array_default:.3f} / {t_array:.3f} s, opensimplex "
          f"{t_ref:.3f} s, max |Δ| {delta:.1e}", flush=True)
    rows = [("quick (64 px, widths 16·(1,2,2), 1 res block, batch 8)", 64, 8,
             dict(model_channels=16, num_res_blocks=1))]
    if not args.skip_paper:
        rows.append(("paper (96 px, widths 128·(1,2,2), 3 res blocks, batch 4)", 96, 4, {}))
    fractions = []
    for label, size, batch, hp in rows:
        t_n, t_s = step_fraction(size, batch, max(1, args.repeats // 2) if hp == {} else args.repeats, **hp)
        fractions.append((label, t_n, t_s))
        print(f"{label}: noise {t_n:.4f} s of a {t_s:.3f} s step", flush=True)
    def speedup(t: float) -> str:
        return f"{t_ref / t:.0f}×" if t_ref / t >= 10 else f"{t_ref / t:.2f}×"

    lines = [
        "## Simplex noise",
        "",
        f"`python -m benchmarks.bench_noise --batch {args.batch} --repeats {args.repeats}"
        f"{f' --threads {args.threads}' if args.threads else ''}` — {torch.get_num_threads()} torch thread(s), CPU.",
        f"{args.batch} independent fields of {SIZE} × {SIZE} px, {OCTAVES} octaves, persistence {PERSISTENCE}, "
        f"base frequency 1/64 (the authors' settings). Median wall time ({ref_repeats} call(s) of the reference, "
        f"{args.repeats} of the kit, after one untimed call each).",
        "",
        "| implementation | seconds per batch | ms per field | speed-up |",
        "|---|---|---|---|",
        f"| `opensimplex` {opensimplex_version()}, one field at a time ({numba_note}) | {t_ref:.3f} | "
        f"{1e3 * t_ref / args.batch:.2f} | 1.0× |",
        f"| kit `SimplexNoise` on a CPU ({kit_backend}, whole batch) | {t_kit:.3f} | "
        f"{1e3 * t_kit / args.batch:.2f} | {speedup(t_kit)} |",
        f"| kit, torch array form (`backend='torch'`, the GPU path), glibc's default allocator | "
        f"{t_array_default:.3f} | {1e3 * t_array_default / args.batch:.2f} | {speedup(t_array_default)} |",
        f"| kit, torch array form, freed memory kept{'' if kept else ' (not in effect here)'} as in training | "
        f"{t_array:.3f} | {1e3 * t_array / args.batch:.2f} | {speedup(t_array)} |",
        "",
        f"Same values: with the package's permutation table the kit's field differs by at most {delta:.1e} "
        "(float64).",
        "",
        "Noise cost inside one DDPM training step (forward + backward + Adam, simplex noise drawn per sample):",
        "",
        "| configuration | noise s | step s | fraction |",
        "|---|---|---|---|",
    ]
    for label, t_n, t_s in fractions:
        lines.append(f"| {label} | {t_n:.4f} | {t_s:.3f} | {100 * t_n / t_s:.1f} % |")
    lines.append("")
    write_section(RESULTS, lines)
    return 0


def opensimplex_version() -> str:
    from importlib.metadata import version

    return version("opensimplex")


if __name__ == "__main__":
    sys.exit(main())
