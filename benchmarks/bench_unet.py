"""The denoising U-Net (paper §3.2, §4.4) against MONAI's ``DiffusionModelUNet``, and inference time per volume.

1. **Training step** (forward + L1 loss + backward + Adam) of the kit's :class:`cddpm_lib.unet.UNet` and of
   MONAI's ``DiffusionModelUNet`` built with the same widths, residual blocks per level, residual up/down-sampling,
   attention only in the middle block, the same head width, both through PyTorch's ``scaled_dot_product_attention``
   (MONAI's ``use_flash_attention=True``), GroupNorm with 32 groups at the paper width (MONAI: one group count for
   all levels, 16 at the quick width; the kit: up to 32 per level), on the same batch, each network in a
   fresh process of its own, so neither inherits the other's allocator or cache state; the two processes take turns
   step by step, and the ratio is taken over these pairs of steps (:func:`benchmarks.interleaved_processes`;
   both processes hold their memory at the same time, on a GPU too).
   (MONAI adds the time embedding to the features; the kit uses scale-shift norm, as the authors' ADM U-Net.)
2. **Inference**: seconds per 96 × 96 × 50 volume (50 slices through ``model.reconstruct``) for DDPM, cDDPM
   (t_test = 500 and the ensemble [250, 500, 750]) and pDDPM (2 × 2 patches) at the quick-profile width; the
   paper reports cDDPM ≈ 37 % below pDDPM and ≈ 2 % above DDPM.
3. **Profiles**: training-step time of the smoke (32 px) and quick (64 px) model settings of
   ``cddpm_lib/profiles/training.yaml`` (and of the paper's, 96 px and batch 32, on a GPU or with
   ``--paper-profile``), through :func:`cddpm_lib.engine.optimisation_step` as training runs it.

Every step is timed on a ``--device`` (``cpu``, ``cuda``) with ``--amp`` (``none``, ``bf16``, ``fp16`` with loss
scaling) and ``--channels-last``; the default (CPU, float32) writes ``results/unet.md``, any other target a section
of its own (``results/unet_cuda_bf16_cl.md`` ...). Peak memory per process: resident set size on the CPU (the
interpreter and libraries included), ``torch.cuda.max_memory_allocated`` on a GPU.

    .venv/bin/python -m benchmarks.bench_unet [--repeats 5] [--threads N] [--skip-paper] [--paper-pairs 2,3]
    .venv/bin/python -m benchmarks.bench_unet --device cuda --amp bf16 --channels-last      # = make bench-gpu
"""
from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
import yaml
from torch import Tensor

from benchmarks import interleaved_processes, proc_status_bytes, write_section
from cddpm_lib import engine, runtime, stats
from cddpm_lib.models import build_model
from cddpm_lib.unet import UNet

RESULTS = Path(__file__).resolve().parent / "results"
PROFILES = Path(__file__).resolve().parents[1] / "cddpm_lib" / "profiles" / "training.yaml"


@dataclasses.dataclass(frozen=True)
class Target:
    """Where and how a step runs: ``device``, mixed precision ``amp`` and the channels-last memory format."""

    device: str = "cpu"
    amp: str = "none"
    channels_last: bool = False

    def __post_init__(self) -> None:
        if self.amp not in ("none", "bf16", "fp16"):
            raise SystemExit(f"--amp must be none, bf16 or fp16, got {self.amp!r}")
        if torch.device(self.device).type == "cuda" and not torch.cuda.is_available():
            if torch.version.cuda is None:
                raise SystemExit(f"--device {self.device}: torch {torch.__version__} is a build without CUDA; install"
                                 " a CUDA build (make bench-gpu TORCH_SPEC=...)")
            raise SystemExit(f"--device {self.device}: this machine has no CUDA device")

    @property
    def dev(self) -> torch.device:
        return torch.device(self.device)

    @property
    def gpu(self) -> bool:
        return self.dev.type == "cuda"

    @property
    def fmt(self) -> torch.memory_format:
        return torch.channels_last if self.channels_last else torch.contiguous_format

    @property
    def slug(self) -> str:
        """Result file stem: ``unet`` for CPU float32, else ``unet_<device>[_<amp>][_cl]`` (``cuda`` for ``cuda`` and
        ``cuda:0``, ``cuda1`` for ``cuda:1``)."""
        if self == Target():
            return "unet"
        device = self.dev.type + (str(self.dev.index) if self.dev.index else "")  # cuda:0 is cuda
        parts = [device] + ([self.amp] if self.amp != "none" else []) + (["cl"] if self.channels_last else [])
        return "unet_" + "_".join(parts)

    @property
    def label(self) -> str:
        name = (torch.cuda.get_device_name(self.dev) if self.gpu
                else f"CPU, {torch.backends.cpu.get_cpu_capability()} kernels")
        return ", ".join([name, "float32" if self.amp == "none" else f"AMP {self.amp}"]
                         + (["channels-last"] if self.channels_last else []))

    def sync(self) -> None:
        if self.gpu:
            torch.cuda.synchronize(self.dev)

    def reset_peak(self) -> int:
        """Start a peak-memory window; returns the bytes in use now (the baseline the peak is counted from)."""
        if self.gpu:
            torch.cuda.reset_peak_memory_stats(self.dev)
            return 0  # CUDA's peak counts every live tensor: parameters, gradients, optimiser state, activations
        try:  # Linux: "5" resets the resident-set high-water mark (VmHWM) of the process
            Path("/proc/self/clear_refs").write_text("5")
            return proc_status_bytes("VmRSS")
        except OSError:
            return -1

    def peak_memory(self, baseline: int) -> float:
        """Bytes: CUDA's peak allocation in the window, or the growth of the resident set above ``baseline``
        (NaN where /proc cannot tell)."""
        if self.gpu:
            return float(torch.cuda.max_memory_allocated(self.dev))
        if baseline < 0:
            return float("nan")
        return float(proc_status_bytes("VmHWM") - baseline)


def timed(fn, repeats: int, target: Target = Target()) -> float:
    """Median wall time over ``repeats`` calls after one warm-up call (synchronised on a GPU)."""
    fn()
    target.sync()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        target.sync()
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
                              num_head_channels=widths[-1] // heads, use_flash_attention=True)


def build_net(which: str, ch: int, mult: tuple[int, ...], blocks: int) -> torch.nn.Module:
    """``kit`` (scale-shift FiLM, the paper's conditioning), ``kit-add`` (the kit's U-Net adding the embedding to
    the features, MONAI's mode) or ``monai``."""
    torch.manual_seed(0)
    if which in ("kit", "kit-add"):
        return UNet(model_channels=ch, channel_mult=mult, num_res_blocks=blocks, num_heads=4,
                    use_scale_shift_norm=which == "kit")
    return monai_unet(ch, mult, blocks, heads=4)


#: warm-up steps before timing (a GPU also picks its convolution algorithms there)
WARMUP = {False: 1, True: 3}


def training_workload(which: str, config: tuple, threads: int, target: Target, keep: bool):
    """In a worker process: ``(network, step)``, ``step()`` one training step of the network (forward + L1 +
    backward + Adam; float16 with loss scaling) on a fixed batch. ``keep``: freed memory stays in the process
    (:func:`cddpm_lib.runtime.keep_freed_memory`, as the kit's own training runs)."""
    torch.set_num_threads(threads)
    if keep:
        runtime.keep_freed_memory()
    ch, mult, blocks, size, batch = config
    dev = target.dev
    net = build_net(which, ch, mult, blocks).to(dev, memory_format=target.fmt)
    x = torch.rand(batch, 1, size, size, device=dev).contiguous(memory_format=target.fmt)
    t = torch.randint(1, 1001, (batch,), device=dev)
    opt = torch.optim.Adam(net.parameters(), lr=1e-4)
    scaler = torch.amp.GradScaler(dev.type) if target.amp == "fp16" else None

    def step():
        opt.zero_grad(set_to_none=True)
        with runtime.autocast(target.amp, dev):
            loss = (net(x, t).float() - x).abs().mean()
        if scaler is None:
            loss.backward()
            opt.step()
        else:
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()

    return net, step


def _step_worker(which: str, config: tuple, threads: int, target: Target, keep: bool, conn) -> None:
    """In a fresh process (:func:`benchmarks.interleaved_processes`): build the network
    (:func:`training_workload`), run the warm-up, report ``"ready"``; then one training step per ``"step"``,
    answered with ``(wall seconds, CPU seconds)``; ``"stop"`` is answered with ``(parameter count, peak bytes)``
    (peak over the warm-up and timed steps, see :meth:`Target.peak_memory`)."""
    net, step = training_workload(which, config, threads, target, keep)
    target.sync()
    baseline = target.reset_peak()
    for _ in range(WARMUP[target.gpu]):
        step()
    target.sync()
    conn.send("ready")
    while conn.recv() == "step":
        t0, c0 = time.perf_counter(), time.process_time()
        step()
        target.sync()
        conn.send((time.perf_counter() - t0, time.process_time() - c0))
    conn.send((n_params(net), target.peak_memory(baseline)))


def conv_flops(module: torch.nn.Module, inputs: tuple, output: Tensor) -> float:
    """Floating-point operations of one training step's pass through a ``Conv2d`` (multiply and add counted as
    two): the forward, the weight gradient, and the input gradient where the input needs one (not for the image)."""
    weight = module.weight
    forward = 2.0 * output.numel() * weight.shape[1] * weight.shape[2] * weight.shape[3]
    return forward * (3 if inputs[0].requires_grad else 2)


def _is_convolution(op: str) -> bool:
    """A profiler key of a convolution: ``aten::mkldnn_convolution`` (oneDNN), ``aten::_slow_conv2d_*`` (the im2col
    path PyTorch takes for the 1 × 1 convolutions), ``aten::convolution_backward``, their dispatch wrappers and
    autograd nodes."""
    return "conv" in op.lower()


def _split_worker(which: str, config: tuple, threads: int, target: Target, keep: bool, conn) -> None:
    """In a fresh process (:func:`benchmarks.interleaved_processes`): build the network
    (:func:`training_workload`), run one warm-up step, report ``"ready"``; then one training step under
    ``torch.profiler`` (CPU) per ``"step"``, answered with ``(convolution self seconds, other self seconds,
    convolution FLOPs)`` of that step. The operators' self times add up to the time spent in operators without
    double counting (the Python between them is not included); convolution operators are those that run one (see
    :func:`_is_convolution`)."""
    from torch.profiler import ProfilerActivity, profile

    net, step = training_workload(which, config, threads, target, keep)
    flops = [0.0]

    def count(module, inputs, output):
        flops[0] += conv_flops(module, inputs, output)

    step()
    for module in net.modules():
        if isinstance(module, torch.nn.Conv2d):
            module.register_forward_hook(count)
    conn.send("ready")
    while conn.recv() == "step":
        flops[0] = 0.0
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            step()
        conv = other = 0.0
        for event in prof.key_averages():
            seconds = event.self_cpu_time_total / 1e6
            if _is_convolution(event.key):
                conv += seconds
            else:
                other += seconds
        conn.send((conv, other, flops[0]))
    conn.send(None)


def op_split(config: tuple, threads: int, target: Target, keep: bool, kit: str, rounds: int = 1,
             steps: int = 2) -> dict[str, tuple]:
    """``{"kit"|"monai": (convolution s, other s, convolution FLOPs)}``, means per step over ``rounds`` × ``steps``
    profiled steps of each network, the two networks' processes taking turns step by step as in the timing
    (:func:`_split_worker`, :func:`benchmarks.interleaved_processes`)."""
    res = interleaved_processes(_split_worker, (kit, "monai"), rounds, steps,
                                lambda which: (which, config, threads, target, keep))
    out = {}
    for which, runs in res.items():
        measured = [m for run in runs for m in run["steps"]]
        out["monai" if which == "monai" else "kit"] = tuple(float(np.mean(col)) for col in zip(*measured))
    return out


def split_row(label: str, split: dict[str, tuple]) -> str:
    """Row of the where-the-time-goes table from :func:`op_split`. The two networks run the same convolutions, so
    the ceiling takes their mean time for both: ``(mean convolution + MONAI's other) / mean convolution``."""
    (k_conv, k_other, flops), (m_conv, m_other, m_flops) = split["kit"], split["monai"]
    conv = (k_conv + m_conv) / 2
    return (f"| {label} | {flops / 1e9:.1f} / {m_flops / 1e9:.1f} | {k_conv:.3f} / {k_other:.3f} | "
            f"{m_conv:.3f} / {m_other:.3f} | {100 * k_conv / (k_conv + k_other):.0f} % / "
            f"{100 * m_conv / (m_conv + m_other):.0f} % | {flops / 1e9 / k_conv:.0f} / {m_flops / 1e9 / m_conv:.0f} | "
            f"{m_conv / k_conv:.2f} | {m_other / k_other:.2f} | {(conv + m_other) / conv:.2f} |")


@dataclasses.dataclass
class StepTimes:
    """One network's timings over its processes; ``wall``/``cpu`` list every timed step in (round, step) order, so
    the i-th entries of the two networks ran back to back."""

    params: int = 0
    wall: list[float] = dataclasses.field(default_factory=list)
    cpu: list[float] = dataclasses.field(default_factory=list)
    process_medians: list[float] = dataclasses.field(default_factory=list)  # one per process
    peaks: list[float] = dataclasses.field(default_factory=list)  # bytes, one per process


def step_times(config: tuple, rounds: int, steps: int, threads: int, keep: bool = False,
               target: Target = Target(), kit: str = "kit") -> dict[str, StepTimes]:
    """``{"kit"|"monai": StepTimes}`` (``kit``: which kit variant, see :func:`build_net`): per round one process per
    network, the two taking turns step by step (:func:`benchmarks.interleaved_processes`), ``steps`` paired steps
    per round."""
    runs = interleaved_processes(_step_worker, (kit, "monai"), rounds, steps,
                                 lambda which: (which, config, threads, target, keep))
    res = {"kit": StepTimes(), "monai": StepTimes()}
    for which, outs in runs.items():
        s = res["monai" if which == "monai" else "kit"]
        for out in outs:
            s.params, peak = out["summary"]
            wall = [w for w, _ in out["steps"]]
            s.wall += wall
            s.cpu += [c for _, c in out["steps"]]
            s.process_medians.append(statistics.median(wall))
            s.peaks.append(peak)
    return res


def paired_ratio(kit: list[float], ref: list[float]) -> float:
    """Median over paired steps of ``ref / kit`` (> 1: the kit is faster)."""
    return statistics.median(r / k for k, r in zip(kit, ref, strict=True))


def speed_test(kit: StepTimes, ref: StepTimes) -> float:
    """Two-sided p-value of the paired sign-flip permutation test (:func:`cddpm_lib.stats.paired_permutation_test`,
    10 000 rounds) that the log step times of the two networks, paired step by step, have equal means."""
    return stats.paired_permutation_test(np.log(ref.wall), np.log(kit.wall), alternative="two-sided", rounds=10_000)


def unet_configs(target: Target, skip_paper: bool) -> list[tuple[str, tuple, bool, str]]:
    """``(label, (channels, mult, blocks, size, batch), keep freed memory, kit variant)`` rows: the quick width and
    the paper width (paper §4.4: batch 32 on a GPU; 4 on a CPU to keep the run short)."""
    quick = (16, (1, 2, 2), 1, 64, 8)
    paper = (128, (1, 2, 2), 3, 96, 32 if target.gpu else 4)
    configs = [("quick", quick, False, "kit")]
    if not target.gpu:
        configs.append(("quick, freed memory kept in both (`runtime.keep_freed_memory`)", quick, True, "kit"))
        configs.append(("quick, kept, kit adding the embedding like MONAI (`use_scale_shift_norm=False`)", quick,
                        True, "kit-add"))
    if not skip_paper:
        configs.append(("paper", paper, False, "kit"))
    return configs


def unet_rows(repeats: int, skip_paper: bool, threads: int, target: Target = Target(),
              paper_pairs: tuple[int, int] = (2, 3)) -> tuple[list[str], list[str]]:
    """Rows of the paired-step table and (on a CPU) of the where-the-time-goes table (:func:`op_split`);
    ``paper_pairs``: (rounds, paired steps per round) of the paper-width row on a CPU (20–40 s a step)."""
    rows, splits = [], []
    for label, config, keep, variant in unet_configs(target, skip_paper):
        small = config[0] < 64
        rounds, steps = (repeats, 10) if small or target.gpu else paper_pairs
        if target.gpu:
            steps = 20
        res = step_times(config, rounds, steps, threads, keep, target, variant)
        kit, ref = res["kit"], res["monai"]
        w_kit, w_ref = statistics.median(kit.wall), statistics.median(ref.wall)
        r_wall, r_cpu = paired_ratio(kit.wall, ref.wall), paired_ratio(kit.cpu, ref.cpu)
        p = speed_test(kit, ref)
        ch, mult, blocks, size, batch = config
        print(f"{label}: kit {w_kit:.4f} s, MONAI {w_ref:.4f} s, paired MONAI/kit {r_wall:.3f} (CPU {r_cpu:.3f}),"
              f" p = {p:.4f}", flush=True)
        rows.append(f"| {label}: {ch}·{mult}, {blocks} res block(s), {size} px, batch {batch} | "
                    f"{kit.params / 1e6:.2f} M / {ref.params / 1e6:.2f} M | {w_kit:.4f} | {w_ref:.4f} | "
                    f"{r_wall:.2f} | {'–' if target.gpu else f'{r_cpu:.2f}'} | {rounds} × {steps} | "
                    f"{min(kit.process_medians):.4f}–{max(kit.process_medians):.4f} / "
                    f"{min(ref.process_medians):.4f}–{max(ref.process_medians):.4f} | {p:.4f} | "
                    f"{max(kit.peaks) / 2 ** 20:.0f} / {max(ref.peaks) / 2 ** 20:.0f} |")
        if not target.gpu:  # on a GPU the profiler's CPU self times are kernel launches, not the work
            split = op_split(config, threads, target, keep, variant, *((2, 3) if small else (1, 2)))
            print(f"{label}: convolutions kit {split['kit'][0]:.3f} s, MONAI {split['monai'][0]:.3f} s; other kit "
                  f"{split['kit'][1]:.3f} s, MONAI {split['monai'][1]:.3f} s", flush=True)
            splits.append(split_row(label, split))
    return rows, splits


def inference_rows(repeats: int, target: Target = Target()) -> tuple[list[str], dict[str, float]]:
    if not target.gpu:
        runtime.keep_freed_memory()  # as reconstruct_volume and engine.fit (so also for profile_rows after this)
    quick = yaml.safe_load(PROFILES.read_text())["quick"]["model_hparams"]
    volume = torch.rand(50, 1, 96, 96, device=target.dev).contiguous(memory_format=target.fmt)
    cases = [("DDPM, t = 500", "ddpm", 500), ("DDPM, ENS", "ddpm", [250, 500, 750]),
             ("cDDPM, t = 500", "cddpm", 500), ("cDDPM, ENS", "cddpm", [250, 500, 750]),
             ("pDDPM, t = 500", "pddpm", 500), ("pDDPM, ENS", "pddpm", [250, 500, 750])]
    rows, seconds = [], {}
    for label, name, t_test in cases:
        torch.manual_seed(0)
        model = build_model(name, image_size=(96, 96), **quick[name]).eval()
        model.to(target.dev, memory_format=target.fmt)

        def run():
            with runtime.autocast(target.amp, target.dev):
                model.reconstruct(volume, t_test=t_test, max_batch=64)

        s = timed(run, repeats, target)
        seconds[label] = s
        print(f"{label}: {s:.3f} s per volume", flush=True)
        rows.append(f"| {label} | {s:.3f} |")
    return rows, seconds


def profile_rows(repeats: int, target: Target = Target(), paper: bool = False) -> list[str]:
    """Training-step time of each profile's diffusion models through :func:`engine.optimisation_step`."""
    profiles = yaml.safe_load(PROFILES.read_text())
    sizes = [("smoke", 32), ("quick", 64)] + ([("paper", 96)] if paper else [])
    rows = []
    for profile, size in sizes:
        cfg = {**dataclasses.asdict(engine.LoopConfig()), **profiles[profile]}
        batch, steps = int(cfg["batch_size"]), int(cfg["max_steps"])
        for name in ("ddpm", "cddpm", "pddpm"):
            hp = (cfg.get("model_hparams") or {}).get(name, {})
            torch.manual_seed(0)
            model = build_model(name, image_size=(size, size), **hp).to(target.dev, memory_format=target.fmt)
            opts = model.configure_optimizers(1e-4)
            scaler = torch.amp.GradScaler(target.dev.type) if target.amp == "fp16" else None
            x = torch.rand(batch, 1, size, size, device=target.dev).contiguous(memory_format=target.fmt)
            data = {"image": x, "mask": torch.ones_like(x)}
            s = timed(lambda: engine.optimisation_step(model, data, opts, 0, amp=target.amp, device=target.dev,
                                                       scaler=scaler), repeats, target)
            print(f"{profile} {name}: {s:.4f} s per step", flush=True)
            run = s * steps
            rows.append(f"| {profile} | {name} | `{hp}` | {size} px, batch {batch} | {s:.4f} | {steps} steps ≈ "
                        + (f"{run:.1f} s |" if run < 60 else f"{run / 60:.1f} min |"))
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    ap.add_argument("--skip-paper", action="store_true", help="skip the paper-width U-Net (slow on CPU)")
    ap.add_argument("--paper-pairs", default="2,3", metavar="ROUNDS,STEPS",
                    help="paper-width row on a CPU: rounds × paired steps per round (default 2,3)")
    ap.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1 ...")
    ap.add_argument("--amp", default="none", help="mixed precision: none, bf16, fp16 (with loss scaling)")
    ap.add_argument("--channels-last", action="store_true", help="channels-last memory format")
    ap.add_argument("--paper-profile", action="store_true",
                    help="also time the paper profile's models (96 px, batch 32; on by default on a GPU)")
    args = ap.parse_args(argv)
    target = Target(args.device, args.amp, args.channels_last)
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        paper_pairs = tuple(int(v) for v in args.paper_pairs.split(","))
        if len(paper_pairs) != 2 or min(paper_pairs) < 1:
            raise ValueError
    except ValueError:
        raise SystemExit(f"--paper-pairs must be two positive integers ROUNDS,STEPS, got {args.paper_pairs!r}")
    unet, splits = unet_rows(args.repeats, args.skip_paper, args.threads or torch.get_num_threads(), target,
                             paper_pairs)
    infer, sec = inference_rows(args.repeats if target.gpu else max(1, args.repeats // 2), target)
    prof = profile_rows(args.repeats, target, paper=args.paper_profile or target.gpu)
    ratio_p = 100 * (1 - sec["cDDPM, ENS"] / sec["pDDPM, ENS"])
    ratio_d = 100 * (sec["cDDPM, ENS"] / sec["DDPM, ENS"] - 1)
    flags = (f"{f' --threads {args.threads}' if args.threads else ''}{' --skip-paper' if args.skip_paper else ''}"
             f"{f' --paper-pairs {args.paper_pairs}' if args.paper_pairs != '2,3' else ''}"
             f"{f' --device {args.device}' if args.device != 'cpu' else ''}"
             f"{f' --amp {args.amp}' if args.amp != 'none' else ''}{' --channels-last' if args.channels_last else ''}"
             f"{' --paper-profile' if args.paper_profile else ''}")
    cmd = f"`python -m benchmarks.bench_unet --repeats {args.repeats}{flags}`"
    threads = "" if target.gpu else f"{torch.get_num_threads()} torch thread(s), "
    memory = ("peak CUDA memory allocated over the warm-up and timed steps (parameters, gradients, Adam state,"
              " activations)" if target.gpu else "growth of the process's peak resident set over the warm-up and"
              " timed steps above what it held with the network and batch built (gradients, Adam state,"
              " activations, workspace; Linux `/proc`)")
    lines = [
        "## Denoising U-Net and inference" + ("" if target == Target() else f" ({target.label})"),
        "",
        f"{cmd} — {threads}{target.label}. Median wall times (CPU times where stated).",
        "",
        "Training step (forward + L1 + backward + Adam) of the kit's ADM U-Net and MONAI's `DiffusionModelUNet`"
        " at equal widths, residual blocks, residual up/down-sampling, middle-block attention. Each network runs in a"
        " fresh process of its own per round; the two processes take turns step by step (order swapped every turn),"
        " so each kit step is paired with a MONAI step run just before or after it under the same machine load."
        " kit s / MONAI s: medians over all timed steps; MONAI / kit: median over the pairs of the per-pair ratio."
        " The kit's blocks also apply the scale-shift FiLM, MONAI's add the embedding; the kit's ×2 resampling runs"
        " on a CPU as broadcast copies and strided additions (`unet.upsample2x`, `unet.downsample2x`), MONAI's"
        " through PyTorch's `interpolate` and `avg_pool2d` kernels; both networks' attention runs through PyTorch's"
        " `scaled_dot_product_attention` (MONAI's `use_flash_attention=True`). *p*: two-sided paired"
        " sign-flip permutation test of the log step times (equal speed; 10 000 rounds, so not below 1e-4)."
        f" Memory: {memory}."
        + (" The CPU-time ratio is left out on a GPU, where a process's CPU time is mostly waiting for the device;"
           " the two processes share the GPU, which therefore must not be in exclusive-process compute mode."
           if target.gpu else ""),
        *([] if target.gpu else [
            "Under glibc's default allocator part of a step at the quick width is page faults of freed and reallocated"
            " buffers, which differ between the two networks' allocation patterns; in the second quick row both"
            " processes keep freed memory (`runtime.keep_freed_memory`, as the kit's own training and reconstruction"
            " run) so that only the computation is compared. The third quick row builds the kit's U-Net with MONAI's"
            " additive embedding instead of the FiLM, so that the two networks do the same work."
            " The same benchmark on a GPU (AMP bf16, channels-last, and the paper profile's models at batch 32):"
            " `make bench-gpu`, which writes a section of its own."]),
        "",
        "| configuration | parameters kit / MONAI | kit s | MONAI s | MONAI / kit (wall, paired) "
        "| MONAI / kit (CPU, paired) | rounds × paired steps | per-process medians kit / MONAI | *p* "
        "| peak MiB kit / MONAI |",
        "|---|---|---|---|---|---|---|---|---|---|",
        *unet,
        "",
        *([] if not splits else [
            "Where a step's time goes: further steps of the two networks, paired as above (2 rounds × 3 steps at"
            " the quick width, 1 × 2 at the paper width, after one warm-up step each), each under `torch.profiler`,"
            " its operators' self CPU times summed into the convolutions"
            " (oneDNN, the im2col fallback of the 1 × 1 convolutions, and their backward) and everything else"
            " (normalisation, activations, attention, resampling, the loss, Adam, copies). Convolution GFLOP: the"
            " forward, the weight gradient and (but for the image's) the input gradient of every `Conv2d`, from its"
            " shapes; the two networks run the same convolutions (shapes, operations, oneDNN kernels), so the ratio"
            " of their convolution times shows how far apart two measurements of the same work fall on this"
            " machine. Ceiling: MONAI's step over its convolutions alone, both networks' convolutions taken at their"
            " mean time (the same work), the ratio the kit would reach if everything but its convolutions took no"
            " time. Means per step; the times are the operators' (the Python between them is not included), carry"
            " the profiler's own cost per operator, which weighs most on small maps, and the machine's noise of"
            " the moment.",
            "",
            "| configuration | convolution GFLOP per step kit / MONAI | kit s: convolutions / other | MONAI s:"
            " convolutions / other | convolution share kit / MONAI | convolution GFLOP/s kit / MONAI | MONAI / kit,"
            " convolutions | MONAI / kit, other | ceiling |",
            "|---|---|---|---|---|---|---|---|---|",
            *splits,
            "",
        ]),
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
    write_section(RESULTS / f"{target.slug}.md", lines)
    return 0


if __name__ == "__main__":
    sys.exit(main())
