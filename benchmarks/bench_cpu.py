"""How `make reproduce` should use a small CPU: runs side by side vs threads, and the reconstruction batch size.

1. **Training throughput** at the quick size (cDDPM, ``profiles/training.yaml``, 64×64 slices): the machine's cores
   given to one training process (``torch.set_num_threads(cores)``) against ``cores`` one-thread processes side by
   side, the same steps each, in this run. The ratio is what ``JOBS`` buys in the training stage
   (``pipeline.threads_per_job``).
2. **Reconstruction** of one quick volume (64×64×32) at t_test = 500 for DDPM and pDDPM against ``max_batch``
   (slices × patches × noise levels per forward pass), at one thread and at all cores. Results do not depend on
   ``max_batch`` (tested); only the time does.
3. **Allocator**: glibc's default against freed memory kept in the process
   (:func:`cddpm_lib.runtime.keep_freed_memory`, which ``engine.fit`` and ``reconstruct_volume`` turn on): a
   quick cDDPM training step and the ENS reconstruction of one quick volume, one thread, each set-up in fresh
   processes, alternating. Time, minor page faults and the process's peak resident set.

Parts 1 and 2 run with freed memory kept, as the kit's training and evaluation do.

    .venv/bin/python -m benchmarks.bench_cpu [--steps 20] [--repeats 3]
"""
from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import resource
import statistics
import sys
import time
from pathlib import Path

import torch

from benchmarks import alternating_processes, proc_status_bytes, write_section
from cddpm_lib import runtime
from cddpm_lib.config import profile_params
from cddpm_lib.models import build_model

RESULTS = Path(__file__).resolve().parent / "results" / "cpu.md"
SIZE = 64


def _quick_model(name: str):
    torch.manual_seed(0)
    hp = profile_params("training", "quick")["model_hparams"][name]
    return build_model(name, image_size=(SIZE, SIZE), **hp)


def _train_worker(threads: int, steps: int, batch: int, start, out) -> None:
    """One process: ``steps`` cDDPM training steps on ``threads`` threads after a warm-up; puts slices/s."""
    torch.set_num_threads(threads)
    runtime.keep_freed_memory()  # as engine.fit
    model = _quick_model("cddpm")
    opt = model.configure_optimizers(1e-4)
    x = torch.rand(batch, 1, SIZE, SIZE)
    data = {"image": x, "mask": (x > 0).float()}
    model.train()
    model.training_step(data, opt, 0)
    start.wait()  # side-by-side processes start timing together
    t0 = time.perf_counter()
    for step in range(steps):
        model.training_step(data, opt, step + 1)
    out.put(steps * batch / (time.perf_counter() - t0))


def training_throughput(processes: int, threads: int, steps: int, batch: int) -> float:
    """Total slices/s of ``processes`` processes of ``threads`` threads each, running at the same time."""
    ctx = mp.get_context("spawn")
    start, out = ctx.Barrier(processes), ctx.Queue()
    procs = [ctx.Process(target=_train_worker, args=(threads, steps, batch, start, out)) for _ in range(processes)]
    for p in procs:
        p.start()
    rates = [out.get() for _ in procs]
    for p in procs:
        p.join()
    return sum(rates)


def reconstruction_seconds(name: str, max_batch: int, threads: int, repeats: int) -> float:
    """Median seconds to reconstruct one 64×64×32 volume at t_test = 500."""
    torch.set_num_threads(threads)
    model = _quick_model(name).eval()
    volume = torch.rand(32, 1, SIZE, SIZE)
    model.reconstruct(volume, t_test=500, max_batch=max_batch)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        model.reconstruct(volume, t_test=500, max_batch=max_batch)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _allocator_worker(task: str, keep: bool, repeats: int, out) -> None:
    """One fresh process, one thread: ``repeats`` timed calls of ``task`` (``train``: a quick cDDPM training step;
    ``recon``: the ENS reconstruction of a 64×64×32 volume at ``max_batch`` 16, the quick evaluation setting) after
    a warm-up; puts ``(median seconds, minor page faults per call, peak resident set in MiB)`` (``VmHWM``: this
    process's own peak; ``ru_maxrss`` would carry the parent's over the fork)."""
    torch.set_num_threads(1)
    if keep:
        runtime.keep_freed_memory()
    model = _quick_model("cddpm")
    if task == "train":
        opt = model.configure_optimizers(1e-4)
        x = torch.rand(int(profile_params("training", "quick")["batch_size"]), 1, SIZE, SIZE)
        data = {"image": x, "mask": (x > 0).float()}
        model.train()

        def call():
            model.training_step(data, opt, 0)
    else:
        volume = torch.rand(32, 1, SIZE, SIZE)
        model.eval()

        def call():
            model.reconstruct(volume, t_test=[250, 500, 750], max_batch=16)
    call()
    times, faults = [], resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(repeats):
        t0 = time.perf_counter()
        call()
        times.append(time.perf_counter() - t0)
    faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults) / repeats
    out.put((statistics.median(times), faults, proc_status_bytes("VmHWM") / 2 ** 20))


def allocator_rows(rounds: int, repeats: int) -> list[str]:
    """Rows of part 3: per task, the default and the kept set-up, ``rounds`` fresh processes each (alternating)."""
    rows = []
    for task, label in (("train", "cDDPM training step (batch 8)"), ("recon", "cDDPM ENS reconstruction, 1 volume")):
        res = alternating_processes(_allocator_worker, (False, True), rounds, lambda keep: (task, keep, repeats))
        med = {k: [statistics.median(col) for col in zip(*v)] for k, v in res.items()}
        (t0, f0, m0), (t1, f1, m1) = med[False], med[True]
        print(f"allocator {task}: default {t0:.3f} s, {f0:.0f} faults, {m0:.0f} MiB; kept {t1:.3f} s, {f1:.0f} "
              f"faults, {m1:.0f} MiB", flush=True)
        rows.append(f"| {label} | {t0:.3f} | {t1:.3f} | {t0 / t1:.2f} | {f0:.0f} / {f1:.0f} | {m0:.0f} / {m1:.0f} |")
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=20, help="training steps per process and repeat")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--batches", default="4,8,16,32,64", help="max_batch values to time")
    cli_args = list(sys.argv[1:] if argv is None else argv)
    args = ap.parse_args(cli_args)
    cores = os.cpu_count() or 1
    batch = int(profile_params("training", "quick")["batch_size"])
    one, side = [], []
    for _ in range(args.repeats):  # alternate the two set-ups so load changes hit both
        one.append(training_throughput(1, cores, args.steps, batch))
        side.append(training_throughput(cores, 1, args.steps, batch))
        print(f"training: 1 process x {cores} threads {one[-1]:.1f} slices/s, {cores} processes x 1 thread "
              f"{side[-1]:.1f} slices/s", flush=True)
    r_one, r_side = statistics.median(one), statistics.median(side)

    batches = [int(b) for b in args.batches.split(",") if b]
    runtime.keep_freed_memory()  # as reconstruct_volume
    recon = {}
    for name in ("ddpm", "pddpm"):
        for threads in sorted({1, cores}):
            for mb in batches:
                recon[name, threads, mb] = reconstruction_seconds(name, mb, threads, args.repeats)
                print(f"{name} {threads} thread(s) max_batch {mb}: {recon[name, threads, mb]:.2f} s", flush=True)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    lines = ["## CPU scheduling of the quick profile (`bench_cpu`)", "",
             f"{cores} CPU cores; load average {load:.1f} at the end. Command: `"
             + " ".join([".venv/bin/python -m benchmarks.bench_cpu", *cli_args]) + "`.", "",
             f"Training throughput, cDDPM at the quick size (batch {batch}, 64×64), {args.steps} steps per process, "
             f"median of {args.repeats} (the two set-ups alternate):", "",
             "| set-up | slices/s (all processes) | ratio |", "|---|---|---|",
             f"| 1 process × {cores} threads (reference) | {r_one:.1f} | 1.00 |",
             f"| {cores} processes × 1 thread, side by side (`make reproduce`, JOBS={cores}) | {r_side:.1f} | "
             f"{r_side / r_one:.2f} |", "",
             "Reconstruction of one 64×64×32 volume at t_test = 500 (seconds, median of "
             f"{args.repeats}) against `max_batch`:", "",
             "| model | threads | " + " | ".join(f"max_batch {b}" for b in batches) + " |",
             "|---|---|" + "---|" * len(batches)]
    for name in ("ddpm", "pddpm"):
        for threads in sorted({1, cores}):
            lines.append(f"| {name} | {threads} | " + " | ".join(f"{recon[name, threads, b]:.2f}" for b in batches)
                         + " |")
    lines += ["", "Allocator: glibc's default against freed memory kept in the process"
              " (`runtime.keep_freed_memory`, on in `engine.fit` and `reconstruct_volume`), one thread, quick size;"
              f" medians over {args.repeats} fresh processes per set-up (alternating), {args.repeats} timed calls"
              " each:", "",
              "| task | default s | kept s | speed-up | minor page faults per call, default / kept "
              "| peak resident MiB, default / kept |", "|---|---|---|---|---|---|",
              *allocator_rows(args.repeats, args.repeats)]
    write_section(RESULTS, lines)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
