"""The denoising U-Net (paper §3.2, §4.4) against MONAI's ``DiffusionModelUNet``, and inference time per volume.

1. **Training step** (forward + L1 loss + backward + Adam) of the kit's :class:`cddpm_lib.unet.UNet` and of
   MONAI's ``DiffusionModelUNet`` built with the same widths, residual blocks per level, residual up/down-sampling,
   attention only in the middle block, same head width and GroupNorm groups, on the same batch, each network in a
   fresh process of its own (alternating), so neither inherits the other's allocator or cache state.
   (MONAI adds the time embedding to the features; the kit uses scale-shift norm, as the authors' ADM U-Net.)
2. **Inference**: seconds per 96 × 96 × 50 volume (50 slices through ``model.reconstruct``) for DDPM, cDDPM
   (t_test = 500 and the ensemble [250, 500, 750]) and pDDPM (2 × 2 patches) at the quick-profile width; the
   paper reports cDDPM ≈ 37 % below pDDPM and ≈ 2 % above DDPM.
3. **Profiles**: training-step time of the smoke (32 px) and quick (64 px) model settings of
   ``cddpm_lib/profiles/training.yaml``.

    .venv/bin/python -m benchmarks.bench_unet [--repeats 5] [--threads N] [--skip-paper]
"""
from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import statistics
import sys
import time
from pathlib import Path
from unittest import mock

import torch
import yaml

from benchmarks import write_section
from cddpm_lib.models import build_model
from cddpm_lib.unet import UNet

RESULTS = Path(__file__).resolve().parent / "results" / "unet.md"
PROFILES = Path(__file__).resolve().parents[1] / "cddpm_lib" / "profiles" / "training.yaml"


def timed(fn, repeats: int) -> float:
    """Median wall time over ``repeats`` calls after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def n_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def monai_unet(channels: int, mult: tuple[int, ...], blocks: int, heads: int) -> torch.nn.Module:
    from monai.networks.nets import DiffusionModelUNet

    widths = tuple(channels * m for m in mult)
    return DiffusionModelUNet(spatial_dims=2, in_channels=1, out_channels=1, num_res_blocks=blocks,
                              channels=widths, attention_levels=(False,) * len(widths),
                              norm_num_groups=min(32, channels), resblock_updown=True,
                              num_head_channels=widths[-1] // heads)


def build_net(which: str, ch: int, mult: tuple[int, ...], blocks: int) -> torch.nn.Module:
    torch.manual_seed(0)
    if which == "kit":
        return UNet(model_channels=ch, channel_mult=mult, num_res_blocks=blocks, num_heads=4)
    return monai_unet(ch, mult, blocks, heads=4)


def _step_worker(which: str, config: tuple, steps: int, threads: int, out) -> None:
    """In a fresh process: ``steps`` timed training steps (forward + L1 + backward + Adam) after one warm-up;
    puts ``(parameter count, wall seconds list, CPU seconds list)``."""
    torch.set_num_threads(threads)
    ch, mult, blocks, size, batch = config
    net = build_net(which, ch, mult, blocks)
    x = torch.rand(batch, 1, size, size)
    t = torch.randint(1, 1001, (batch,))
    opt = torch.optim.Adam(net.parameters(), lr=1e-4)

    def step():
        opt.zero_grad(set_to_none=True)
        (net(x, t) - x).abs().mean().backward()
        opt.step()

    step()
    wall, cpu = [], []
    for _ in range(steps):
        t0, c0 = time.perf_counter(), time.process_time()
        step()
        wall.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    out.put((n_params(net), wall, cpu))


#: glibc malloc settings that keep freed memory in the process (no mmap per large tensor, no trimming): every step
#: then reuses pages instead of faulting fresh ones in, which takes the allocator out of the comparison
KEEP_MEMORY_ENV = {"MALLOC_MMAP_THRESHOLD_": str(2 ** 32), "MALLOC_TRIM_THRESHOLD_": str(2 ** 32)}


def step_times(config: tuple, rounds: int, steps: int, threads: int,
               env: dict[str, str] | None = None) -> dict[str, tuple[int, float, float, float, float]]:
    """``{"kit"|"monai": (parameters, median wall s, median CPU s, lowest and highest per-process median wall s)}``:
    each network in a process of its own (no shared allocator or cache state), the two alternating for ``rounds``
    rounds of ``steps`` steps."""
    ctx = mp.get_context("spawn")
    samples: dict[str, list] = {"kit": [0, [], [], []], "monai": [0, [], [], []]}
    for r in range(rounds):
        for which in (("kit", "monai") if r % 2 == 0 else ("monai", "kit")):
            out = ctx.Queue()
            proc = ctx.Process(target=_step_worker, args=(which, config, steps, threads, out))
            with mock.patch.dict(os.environ, env or {}):  # read by the child's C library at start-up
                proc.start()
            n, wall, cpu = out.get()
            proc.join()
            samples[which][0] = n
            samples[which][1] += wall
            samples[which][2] += cpu
            samples[which][3].append(statistics.median(wall))
    return {k: (v[0], statistics.median(v[1]), statistics.median(v[2]), min(v[3]), max(v[3]))
            for k, v in samples.items()}


def unet_rows(repeats: int, skip_paper: bool, threads: int) -> list[str]:
    quick, paper = (16, (1, 2, 2), 1, 64, 8), (128, (1, 2, 2), 3, 96, 4)
    configs = [("quick", quick, None), ("quick, freed memory kept (glibc `MALLOC_*` settings)", quick, KEEP_MEMORY_ENV)]
    if not skip_paper:
        configs.append(("paper", paper, None))
    rows = []
    for label, config, env in configs:
        rounds, steps = (repeats, 5) if config is quick else (max(2, repeats // 2), 2)
        res = step_times(config, rounds, steps, threads, env)
        (n_kit, w_kit, c_kit, lo_kit, hi_kit), (n_ref, w_ref, c_ref, lo_ref, hi_ref) = res["kit"], res["monai"]
        ch, mult, blocks, size, batch = config
        print(f"{label}: kit {w_kit:.3f} s ({c_kit:.3f} CPU), MONAI {w_ref:.3f} s ({c_ref:.3f} CPU)", flush=True)
        rows.append(f"| {label}: {ch}·{mult}, {blocks} res block(s), {size} px, batch {batch} | "
                    f"{n_kit / 1e6:.2f} M / {n_ref / 1e6:.2f} M | {w_kit:.3f} | {w_ref:.3f} | "
                    f"{w_ref / w_kit:.2f} | {c_ref / c_kit:.2f} | {rounds} × {steps} | "
                    f"{lo_kit:.3f}–{hi_kit:.3f} / {lo_ref:.3f}–{hi_ref:.3f} |")
    return rows


def inference_rows(repeats: int) -> tuple[list[str], dict[str, float]]:
    quick = yaml.safe_load(PROFILES.read_text())["quick"]["model_hparams"]
    volume = torch.rand(50, 1, 96, 96)
    cases = [("DDPM, t = 500", "ddpm", 500), ("DDPM, ENS", "ddpm", [250, 500, 750]),
             ("cDDPM, t = 500", "cddpm", 500), ("cDDPM, ENS", "cddpm", [250, 500, 750]),
             ("pDDPM, t = 500", "pddpm", 500), ("pDDPM, ENS", "pddpm", [250, 500, 750])]
    rows, seconds = [], {}
    for label, name, t_test in cases:
        torch.manual_seed(0)
        model = build_model(name, image_size=(96, 96), **quick[name]).eval()
        s = timed(lambda: model.reconstruct(volume, t_test=t_test, max_batch=64), repeats)
        seconds[label] = s
        print(f"{label}: {s:.2f} s per volume", flush=True)
        rows.append(f"| {label} | {s:.2f} |")
    return rows, seconds


def profile_rows(repeats: int) -> list[str]:
    profiles = yaml.safe_load(PROFILES.read_text())
    rows = []
    for profile, size in (("smoke", 32), ("quick", 64)):
        cfg = profiles[profile]
        batch = int(cfg["batch_size"])
        for name in ("ddpm", "cddpm", "pddpm"):
            hp = cfg["model_hparams"][name]
            torch.manual_seed(0)
            model = build_model(name, image_size=(size, size), **hp)
            opt = model.configure_optimizers(1e-3)
            x = torch.rand(batch, 1, size, size)
            data = {"image": x, "mask": torch.ones_like(x)}
            s = timed(lambda: model.training_step(data, opt, 0), repeats)
            steps = cfg.get("max_steps")
            print(f"{profile} {name}: {s:.3f} s per step", flush=True)
            rows.append(f"| {profile} | {name} | `{hp}` | {size} px, batch {batch} | {s:.3f} | "
                        f"{steps} steps ≈ {s * steps:.0f} s |")
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    ap.add_argument("--skip-paper", action="store_true", help="skip the paper-width U-Net (slow on CPU)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    unet = unet_rows(args.repeats, args.skip_paper, args.threads or torch.get_num_threads())
    infer, sec = inference_rows(max(1, args.repeats // 2))
    prof = profile_rows(args.repeats)
    ratio_p = 100 * (1 - sec["cDDPM, ENS"] / sec["pDDPM, ENS"])
    ratio_d = 100 * (sec["cDDPM, ENS"] / sec["DDPM, ENS"] - 1)
    cmd = (f"`python -m benchmarks.bench_unet --repeats {args.repeats}"
           f"{f' --threads {args.threads}' if args.threads else ''}{' --skip-paper' if args.skip_paper else ''}`")
    lines = [
        "## Denoising U-Net and inference",
        "",
        f"{cmd} — {torch.get_num_threads()} torch thread(s), CPU. Median wall times (CPU times where stated).",
        "",
        "Training step (forward + L1 + backward + Adam) of the kit's ADM U-Net and MONAI's `DiffusionModelUNet`"
        " at equal widths, residual blocks, residual up/down-sampling, middle-block attention. Each network runs in a"
        " fresh process of its own, kit and MONAI alternating (order swapped every round); medians over all timed"
        " steps. The kit's blocks also apply the scale-shift FiLM, MONAI's add the embedding. At the quick width"
        " part of a step is page faults of freshly mapped tensors, which differ between the two networks' allocation"
        " patterns; the second quick row keeps freed memory in the process (`MALLOC_MMAP_THRESHOLD_`,"
        " `MALLOC_TRIM_THRESHOLD_`) so that only the computation is compared:",
        "",
        "| configuration | parameters kit / MONAI | kit s | MONAI s | MONAI / kit (wall) | MONAI / kit (CPU) "
        "| processes × steps each | per-process medians kit / MONAI |",
        "|---|---|---|---|---|---|---|---|",
        *unet,
        "",
        "Inference: seconds per 96 × 96 × 50 volume (50 slices, `max_batch=64`) at the quick-profile widths:",
        "",
        "| model | s per volume |",
        "|---|---|",
        *infer,
        "",
        f"cDDPM-ENS takes {ratio_p:.0f} % less time than pDDPM-ENS (paper: ≈ 37 % less) and {ratio_d:+.1f} % "
        "relative to DDPM-ENS (paper: ≈ +2 %): pDDPM runs one pass per patch (4 at 2 × 2), cDDPM one encoder pass"
        " per slice on top of the DDPM.",
        "",
        "Training-step time of the profiles' model settings (`cddpm_lib/profiles/training.yaml`):",
        "",
        "| profile | model | hyper-parameters | input | s per step | training run |",
        "|---|---|---|---|---|---|",
        *prof,
        "",
    ]
    write_section(RESULTS, lines)
    return 0


if __name__ == "__main__":
    sys.exit(main())
