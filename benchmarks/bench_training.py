"""Training throughput (slices/s) of every model at the quick size, the kit's engine against a bare PyTorch loop.

For each model of ``profiles/training.yaml`` (quick ``model_hparams``, 64×64 slices) and for SparK
(``profiles/ssl.yaml``) the same number of optimisation steps runs twice in this process:

- **bare loop** (reference): ``model.training_step`` on one fixed, pre-stacked batch of slices — plain PyTorch,
  no data pipeline;
- **kit engine**: :func:`cddpm_lib.engine.fit` — uniform slice sampling, torchio augmentation (quick profile),
  logging, checkpoint bookkeeping — on a phantom cohort of quick-size volumes; throughput from the engine's own
  ``slices_per_s`` (training time only, validation excluded).

Medians over ``--repeats`` runs; the ratio engine / bare is the engine's overhead. Also: the data pipeline alone
(slices/s with and without augmentation) and the estimated wall time of one quick run (``max_steps`` steps).

    .venv/bin/python -m benchmarks.bench_training [--steps 6] [--repeats 3] [--threads N] [--models ae,ddpm]
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
import torch

from benchmarks import write_section
from cddpm_lib import data, engine, spark
from cddpm_lib.config import profile_params
from cddpm_lib.models import build_model
from cddpm_lib.runtime import seed_everything

RESULTS = Path(__file__).resolve().parent / "results" / "training.md"


def bare_loop(model, batch: dict, steps: int) -> tuple[float, float]:
    """``(slices/s, CPU seconds per step)`` of ``steps`` calls of ``model.training_step`` on one batch (after one
    warm-up step). CPU time hardly depends on other processes sharing the machine; wall time does."""
    optimizers = model.configure_optimizers(1e-4)
    model.train()
    model.training_step(batch, optimizers, 0)
    t0, c0 = time.perf_counter(), time.process_time()
    for step in range(1, steps + 1):
        model.training_step(batch, optimizers, step)
    return steps * len(batch["image"]) / (time.perf_counter() - t0), (time.process_time() - c0) / steps


def engine_loop(model, cohorts, run_dir: Path, steps: int, batch_size: int, augment: bool) -> float:
    """Slices/s of :func:`engine.fit` over ``steps`` steps (its history's training-only throughput)."""
    cfg = engine.LoopConfig(lr=1e-4, batch_size=batch_size, max_steps=steps + 1, val_every=steps + 1,
                            log_every=1, augment=augment, progress=False, tensorboard=False)
    try:
        history = engine.fit(model, cfg, run_dir, *cohorts, log=lambda *_: None).history
    except RuntimeError:  # f-AnoGAN still in its GAN phase: no best.pt, but the history is written
        history = pd.read_csv(run_dir / "history.csv")
    rows = history.iloc[1:]  # the first step pays one-off costs (as the bare loop's warm-up)
    return float(rows["slices_per_s"].median())


def pipeline_rate(cohort, augment: bool, n_batches: int = 20, batch_size: int = 32) -> float:
    loader = data.train_loader(cohort, batch_size=batch_size, seed=0, max_steps=n_batches, augment=augment)
    t0 = time.perf_counter()
    n = sum(len(b["image"]) for b in loader)
    return n / (time.perf_counter() - t0)


def make_model(name: str, hparams: dict, batch_size: int):
    """``(model, batch size)`` of the quick profile, initialised from seed 0 (``spark``: the SSL stage's)."""
    seed_everything(0)
    if name == "spark":
        p = profile_params("ssl", "quick")
        cfg = spark.SSLConfig(**{k: v for k, v in p.items() if k in spark.SSLConfig.field_names()})
        return spark.build_spark(cfg, (64, 64)), cfg.batch_size
    return build_model(name, image_size=(64, 64), **hparams.get(name, {})), batch_size


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--models", default="")
    cli_args = list(sys.argv[1:] if argv is None else argv)
    args = ap.parse_args(cli_args)
    torch.set_num_threads(args.threads)
    quick = profile_params("training", "quick")
    hparams, batch_size = quick.get("model_hparams", {}), int(quick.get("batch_size", 32))
    names = [m for m in (args.models.split(",") if args.models else [*hparams, "spark"]) if m]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        manifest = data.write_phantom_cohort(Path(tmp) / "cohort", shape=(64, 64, 32), n_subjects=6, n_val=1)
        cohorts = [data.SliceCohort.from_manifest(manifest, split=s, fold=0, weighting="t2") for s in ("train", "val")]
        x = torch.cat([cohorts[0].slab(v % len(cohorts[0]), 8 + v)[0] for v in range(batch_size)])
        pipe = {aug: statistics.median(pipeline_rate(cohorts[0], aug) for _ in range(args.repeats))
                for aug in (False, True)}
        for name in names:
            model, bs = make_model(name, hparams, batch_size)
            batch = {"image": x[:bs], "mask": (x[:bs] > 0).float()}
            bare, cpu, eng = [], [], []
            for r in range(args.repeats):
                rate, cpu_step = bare_loop(make_model(name, hparams, batch_size)[0], batch, args.steps)
                bare.append(rate)
                cpu.append(cpu_step)
                eng.append(engine_loop(make_model(name, hparams, batch_size)[0], cohorts, Path(tmp) / f"{name}{r}",
                                       args.steps, bs, augment=name != "spark"))
            b, e, c = statistics.median(bare), statistics.median(eng), statistics.median(cpu)
            steps = profile_params("ssl" if name == "spark" else "training", "quick").get("max_steps", 0)
            rows.append((name, sum(p.numel() for p in model.parameters()) / 1e6, bs, b, e, e / b, c,
                         steps * bs / e, steps * c))
            print(f"{name:8s} bare {b:8.1f} engine {e:8.1f} slices/s  ratio {e / b:.2f}  cpu {c:.3f} s/step",
                  flush=True)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    lines = ["## Training throughput (quick size, 64×64 slices)", "",
             "Slices per second of one optimisation step loop, per model with the quick profile's hyper-parameters "
             "(`profiles/training.yaml`, SparK: `profiles/ssl.yaml`). *bare loop* = `model.training_step` on a "
             "fixed batch (plain PyTorch); *kit engine* = `engine.fit` with uniform slice sampling, torchio "
             "augmentation (not for SparK), logging and checkpoint bookkeeping. Median of "
             f"{args.repeats} runs of {args.steps} steps; {args.threads} torch thread(s), {os.cpu_count()} cores, "
             f"load average {load:.1f} at the end (other processes shared the machine, so wall times are "
             "pessimistic and noisy). *CPU s/step*: processor time of one bare step, nearly independent of the "
             "load. *quick run*: the quick profile's `max_steps` at the engine's rate (wall) and in CPU time "
             "(what an otherwise idle core needs), validation excluded.", "",
             "| model | params (M) | batch | bare loop slices/s | kit engine slices/s | engine / bare | CPU s/step "
             "| quick run wall (s) | quick run CPU (s) |",
             "|---|---|---|---|---|---|---|---|---|"]
    lines += [f"| {n} | {p:.2f} | {bs} | {b:.1f} | {e:.1f} | {r:.2f} | {c:.3f} | {t:.0f} | {tc:.0f} |"
              for n, p, bs, b, e, r, c, t, tc in rows]
    lines += ["", f"Data pipeline alone (32-slice batches, one process): {pipe[False]:.0f} slices/s without "
              f"augmentation, {pipe[True]:.0f} slices/s with the paper's four torchio transforms.", "",
              "Command: `" + " ".join([".venv/bin/python -m benchmarks.bench_training", *cli_args]) + "`"]
    write_section(RESULTS, lines)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
