"""The denoising U-Net (paper §3.2, §4.4) against MONAI's ``DiffusionModelUNet``, and inference time per volume.

1. **Training step** (forward + L1 loss + backward + Adam) of the kit's :class:`cddpm_lib.unet.UNet` and of
   MONAI's ``DiffusionModelUNet`` built with the same widths, residual blocks per level, residual up/down-sampling,
   attention only in the middle block, same head width and GroupNorm groups, on the same batch, in this process.
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
import statistics
import sys
import time
from pathlib import Path

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


def train_step(net: torch.nn.Module, size: int, batch: int):
    """One forward + L1 + backward + Adam step of ``net`` on ``batch`` fixed slices of ``size``²."""
    torch.manual_seed(0)
    x = torch.rand(batch, 1, size, size)
    t = torch.randint(1, 1001, (batch,))
    opt = torch.optim.Adam(net.parameters(), lr=1e-4)

    def step():
        opt.zero_grad(set_to_none=True)
        (net(x, t) - x).abs().mean().backward()
        opt.step()

    return step


def interleaved_times(steps: dict, repeats: int) -> dict[str, tuple[float, float]]:
    """``{name: (median wall s, median CPU s)}``; one warm-up each, then the steps alternate so that a change of
    load on the machine hits every contender alike."""
    for step in steps.values():
        step()
    wall: dict[str, list[float]] = {k: [] for k in steps}
    cpu: dict[str, list[float]] = {k: [] for k in steps}
    for _ in range(repeats):
        for name, step in steps.items():
            t0, c0 = time.perf_counter(), time.process_time()
            step()
            wall[name].append(time.perf_counter() - t0)
            cpu[name].append(time.process_time() - c0)
    return {k: (statistics.median(wall[k]), statistics.median(cpu[k])) for k in steps}


def unet_rows(repeats: int, skip_paper: bool) -> list[str]:
    configs = [("quick", 16, (1, 2, 2), 1, 64, 8)]
    if not skip_paper:
        configs.append(("paper", 128, (1, 2, 2), 3, 96, 4))
    rows = []
    for label, ch, mult, blocks, size, batch in configs:
        kit = UNet(model_channels=ch, channel_mult=mult, num_res_blocks=blocks, num_heads=4)
        ref = monai_unet(ch, mult, blocks, heads=4)
        n = repeats if label == "quick" else max(1, repeats // 2)
        res = interleaved_times({"kit": train_step(kit, size, batch), "monai": train_step(ref, size, batch)}, n)
        (w_kit, c_kit), (w_ref, c_ref) = res["kit"], res["monai"]
        print(f"{label}: kit {w_kit:.3f} s ({c_kit:.3f} CPU), MONAI {w_ref:.3f} s ({c_ref:.3f} CPU)", flush=True)
        rows.append(f"| {label}: {ch}·{mult}, {blocks} res block(s), {size} px, batch {batch} | "
                    f"{n_params(kit) / 1e6:.2f} M / {n_params(ref) / 1e6:.2f} M | {w_kit:.3f} | {w_ref:.3f} | "
                    f"{w_ref / w_kit:.2f} | {c_ref / c_kit:.2f} |")
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
    unet = unet_rows(args.repeats, args.skip_paper)
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
        " at equal widths, residual blocks, residual up/down-sampling, middle-block attention; kit and MONAI steps"
        " alternate in one process (the kit's blocks also apply the scale-shift FiLM, MONAI's add the embedding):",
        "",
        "| configuration | parameters kit / MONAI | kit s | MONAI s | MONAI / kit (wall) | MONAI / kit (CPU) |",
        "|---|---|---|---|---|---|",
        *unet,
        "",
        "Inference: seconds per 96 × 96 × 50 volume (50 slices, `max_batch=64`) at the quick-profile widths:",
        "",
        "| model | s per volume |",
        "|---|---|",
        *infer,
        "",
        f"cDDPM-ENS takes {ratio_p:.0f} % less time than pDDPM-ENS (paper: ≈ 37 % less) and {ratio_d:+.0f} % "
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
