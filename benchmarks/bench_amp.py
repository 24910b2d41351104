"""bfloat16 on the CPU (``amp="bf16"``, :func:`cddpm_lib.runtime.effective_amp`) against float32, side by side.

1. **Training step** of the kit's cDDPM (:func:`cddpm_lib.engine.optimisation_step`: forward, L1, backward, Adam)
   at the quick profile's size (64 px, batch 8) and at the paper's width (``build_model("cddpm")`` defaults:
   U-Net 128·(1, 2, 2), 3 residual blocks, ResNet-18 encoder, d = 128; 96 px, batch 4 to keep the run short),
   float32 and bfloat16 each in fresh processes of their own, alternating; one thread.
2. **Reconstruction** (:func:`cddpm_lib.reconstruct.reconstruct_volume`, ENS t_test = [250, 500, 750]) of one
   64 × 64 × 32 volume at the quick width and one 96 × 96 × 8 volume at the paper width, same processes.
3. **Results** (``results/amp_results.md``; only when the quick synthetic cohort is preprocessed:
   ``cddpm-uad reproduce --profile quick --only data --only preprocessing``, or ``make reproduce``): the quick
   cDDPM (T2, fold 0, the training profile's settings) trained here in float32 and in bfloat16 from each of
   ``--seeds``. Reconstruction precision: the float32-trained models reconstruct the BraTS21 and MSLUB test
   volumes in float32 and in bfloat16 (largest and mean difference; AUPRC of the raw residual ``|x − x̂|``).
   Training precision: best validation loss and the AUPRC of every model reconstructed in float32, the seeds
   giving the spread between runs of one precision.

On a CPU without native bfloat16 (:func:`cddpm_lib.runtime.cpu_bf16_supported` false) the benchmark says so and
measures nothing: the kit runs float32 there.

    .venv/bin/python -m benchmarks.bench_amp [--repeats 4] [--skip-paper] [--skip-speed] [--skip-results]
                                             [--seeds 0,1]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks import alternating_processes, write_section
from cddpm_lib import engine, paths, runtime, stats
from cddpm_lib.config import profile_params
from cddpm_lib.models import build_model

RESULTS = Path(__file__).resolve().parent / "results" / "amp.md"
ENS = [250, 500, 750]

#: ``name: (builder kwargs or None for the paper defaults, image px, batch, recon volume slices)``
SIZES = {"quick": ("quick", 64, 8, 32), "paper width": (None, 96, 4, 8)}


def _model(size: str):
    hp, px, _, _ = SIZES[size]
    kwargs = profile_params("training", "quick")["model_hparams"]["cddpm"] if hp == "quick" else {}
    torch.manual_seed(0)
    return build_model("cddpm", image_size=(px, px), **kwargs)


def _worker(amp: str, size: str, steps: int, out) -> None:
    """A fresh process, one thread, freed memory kept (as the kit runs): ``steps`` timed training steps and 2 timed
    reconstructions after a warm-up of each; puts ``(step seconds list, reconstruction seconds list)``."""
    from cddpm_lib.reconstruct import reconstruct_volume

    torch.set_num_threads(1)
    runtime.keep_freed_memory()
    cpu = torch.device("cpu")
    _, px, batch, depth = SIZES[size]
    model = _model(size)
    opts = model.configure_optimizers(1e-4)
    x = torch.rand(batch, 1, px, px)
    data = {"image": x, "mask": torch.ones_like(x)}
    model.train()
    step_s = []
    for i in range(steps + 1):
        t0 = time.perf_counter()
        engine.optimisation_step(model, data, opts, i, amp=amp, device=cpu)
        step_s.append(time.perf_counter() - t0)
    model.eval()
    rng = np.random.default_rng(0)
    image, mask = rng.random((px, px, depth)).astype(np.float32), np.ones((px, px, depth), np.uint8)
    recon_s = []
    for _ in range(3):
        t0 = time.perf_counter()
        reconstruct_volume(model, image, mask, max_batch=64, seed=0, amp=amp, t_test=ENS)
        recon_s.append(time.perf_counter() - t0)
    out.put((step_s[1:], recon_s[1:]))


def speed_rows(repeats: int, skip_paper: bool) -> list[str]:
    rows = []
    for size in [s for s in SIZES if not (skip_paper and s != "quick")]:
        _, px, batch, depth = SIZES[size]
        rounds, steps = (repeats, 5) if size == "quick" else (max(2, repeats // 2), 2)
        res = alternating_processes(_worker, ("none", "bf16"), rounds, lambda amp: (amp, size, steps))
        per_proc = {amp: [statistics.median(s) for s, _ in v] for amp, v in res.items()}
        step = {amp: statistics.median([t for s, _ in v for t in s]) for amp, v in res.items()}
        recon = {amp: statistics.median([t for _, r in v for t in r]) for amp, v in res.items()}
        p = stats.permutation_test(per_proc["none"], per_proc["bf16"], alternative="two-sided", method="exact")
        print(f"{size}: step float32 {step['none']:.4f} s, bf16 {step['bf16']:.4f} s (p = {p:.3f}); "
              f"ENS reconstruction float32 {recon['none']:.3f} s, bf16 {recon['bf16']:.3f} s", flush=True)
        rows.append(f"| {size}: {px} px, batch {batch} / {px}×{px}×{depth} | {step['none']:.4f} | {step['bf16']:.4f}"
                    f" | {step['none'] / step['bf16']:.2f} | {p:.2f} | {recon['none']:.3f} | {recon['bf16']:.3f} | "
                    f"{recon['none'] / recon['bf16']:.2f} | {rounds} × {steps} |")
    return rows


def _train(amp: str, seed: int, run_dir: Path):
    """The quick cDDPM of T2 fold 0 trained with the training profile's settings in ``amp`` from ``seed``;
    ``(model, best validation loss, minutes, validation loss of the best weights in float32)``. The first
    validation loss is the run's own (under its precision, the one that chose the best step); the second
    evaluates the chosen weights in float32, so that the two precisions' models are compared alike."""
    from cddpm_lib import data
    from cddpm_lib.engine import validate
    from cddpm_lib.train import TrainConfig, build_run_model, fit, load_fold

    torch.set_num_threads(1)
    cfg = TrainConfig.from_params({**profile_params("training", "quick"), "profile": "quick", "model": "cddpm",
                                   "weighting": "t2", "fold": 0, "amp": amp, "seed": seed, "device": "cpu",
                                   "progress": False, "tensorboard": False})
    train_set, val_set = load_fold(cfg)
    model = build_run_model(cfg, train_set.image_size)
    own = cfg.replace(model_hparams={"cddpm": cfg.model_hparams["cddpm"]})
    t0 = time.perf_counter()
    result = fit(model, own, run_dir, train_set, val_set, log=lambda *_: None)
    minutes = (time.perf_counter() - t0) / 60
    val = data.val_loader(val_set, batch_size=cfg.batch_size, slab_length=int(result.model.slab_length),
                          max_windows=cfg.val_windows)
    val32 = validate(result.model, val, seed=cfg.seed, device=torch.device("cpu"), amp="none")
    return result.model.eval(), result.best_val, minutes, val32


def results_lines(seeds: list[int]) -> list[str]:
    """Part 3 (a section of its own), or why it was not measured."""
    from cddpm_lib import data
    from cddpm_lib.metrics import average_precision
    from cddpm_lib.reconstruct import load_case, reconstruct_volume, subject_seed

    manifest = paths.preprocessed_manifest_path("synthetic", "quick")
    head = ["## bfloat16 on the CPU: effect on the results (`bench_amp`)", ""]
    if not manifest.exists():
        return head + [f"Not measured: {manifest} does not exist (run `cddpm-uad reproduce --profile quick --only "
                       "data --only preprocessing` first)."]
    with tempfile.TemporaryDirectory() as tmp:
        trained = {(amp, s): _train(amp, s, Path(tmp) / f"{amp}{s}") for s in seeds for amp in ("none", "bf16")}
    df = data.read_manifest(manifest)
    cases = {d: [(str(r["subject_id"]), load_case(r, "t2")) for _, r in
                 data.select_rows(df, dataset=d, split="test", fold=None, weighting="t2").iterrows()]
             for d in ("BraTS21", "MSLUB")}

    def evaluate(model, amp: str, dataset: str):
        recons, aps = [], []
        for sid, case in cases[dataset]:
            recon, anomaly = reconstruct_volume(model, case["image"], case["brain_mask"], max_batch=64,
                                                seed=subject_seed(0, sid), amp=amp, t_test=ENS)
            recons.append(recon)
            aps.append(float(average_precision(anomaly[None], case["seg"][None])[0]))
        return recons, 100 * float(np.mean(aps))

    infer, train, scores = [], [], {}
    for (amp_t, seed), (model, val, minutes, val32) in trained.items():
        ap32 = {}
        for dataset in cases:
            r32, ap32[dataset] = evaluate(model, "none", dataset)
            if amp_t == "none":
                r16, ap16 = evaluate(model, "bf16", dataset)
                d = [np.abs(a - b)[c["brain_mask"] > 0] for a, b, (_, c) in zip(r16, r32, cases[dataset])]
                infer.append(f"| {dataset} | {seed} | {len(r32)} | {max(float(x.max()) for x in d):.4f} | "
                             f"{np.mean([x.mean() for x in d]):.5f} | {ap32[dataset]:.2f} | {ap16:.2f} |")
                print(infer[-1], flush=True)
        scores[(amp_t, seed)] = {"val32": val32, **ap32}
        train.append(f"| {'bfloat16' if amp_t == 'bf16' else 'float32'} | {seed} | {minutes:.1f} | {val:.5f} | "
                     f"{val32:.5f} | {ap32['BraTS21']:.2f} | {ap32['MSLUB']:.2f} |")
        print(train[-1], flush=True)
    n = {d: len(c) for d, c in cases.items()}
    return head + [
        f"The quick T2 cDDPM (fold 0, the quick training profile: 400 steps) trained here in each precision from"
        f" seeds {seeds}, one thread; BraTS21 ({n['BraTS21']}) and MSLUB ({n['MSLUB']}) test volumes, ENS"
        " reconstruction, AUPRC (%) of the raw residual |x − x̂| per volume (before post-processing), mean over the"
        " volumes.", "",
        "Reconstruction in bfloat16 by the float32-trained models (difference over brain voxels, intensities in"
        " [0, 1]):", "",
        "| data set | seed | volumes | max \\|x̂_bf16 − x̂_fp32\\| | mean | AUPRC, fp32 reconstruction | "
        "AUPRC, bf16 reconstruction |", "|---|---|---|---|---|---|---|", *infer, "",
        "Training in bfloat16 (every model reconstructed in float32, so only the training precision differs; the"
        " seeds give the spread between runs of one precision):", "",
        "| training precision | seed | minutes | best validation loss (the run's, in its precision) | its "
        "validation loss in float32 | AUPRC BraTS21 | AUPRC MSLUB |",
        "|---|---|---|---|---|---|---|", *train, "", *paired_summary(scores, seeds)]


def paired_summary(scores: dict, seeds: list[int]) -> list[str]:
    """bfloat16 − float32 training, paired by seed (mean and range over the seeds), next to the spread of the
    float32 runs over the seeds."""
    def span(values) -> str:
        return f"{np.mean(values):+.2f} (from {min(values):+.2f} to {max(values):+.2f})"

    val = [100 * (scores[("bf16", s)]["val32"] / scores[("none", s)]["val32"] - 1) for s in seeds]
    lines = [f"bfloat16 − float32 training, paired by seed ({len(seeds)} seeds; mean, range): validation loss in "
             f"float32 {span(val)} %, higher in {sum(v > 0 for v in val)} of {len(seeds)}"]
    for dataset in ("BraTS21", "MSLUB"):
        diff = [scores[("bf16", s)][dataset] - scores[("none", s)][dataset] for s in seeds]
        fp32 = [scores[("none", s)][dataset] for s in seeds]
        sd = np.std(fp32, ddof=1) if len(fp32) > 1 else 0.0
        lines.append(f"; AUPRC {dataset} {span(diff)} points, lower in {sum(d < 0 for d in diff)} of {len(seeds)}"
                     f" (float32 runs across seeds: standard deviation {sd:.2f})")
    return ["".join(lines) + "."]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=4, help="fresh processes per precision (quick size)")
    ap.add_argument("--skip-paper", action="store_true", help="skip the paper width (slow on a CPU)")
    ap.add_argument("--skip-speed", action="store_true", help="skip parts 1 and 2 (results/amp.md)")
    ap.add_argument("--skip-results", action="store_true", help="skip part 3 (results/amp_results.md)")
    ap.add_argument("--seeds", default="0,1", help="training seeds of part 3")
    cli_args = list(sys.argv[1:] if argv is None else argv)
    args = ap.parse_args(cli_args)
    command = ("Command: `" + " ".join([".venv/bin/python -m benchmarks.bench_amp", *cli_args]) + "`; one torch "
               f"thread, CPU capability {torch.backends.cpu.get_cpu_capability()}.")
    if not runtime.cpu_bf16_supported():
        print("this CPU has no native bfloat16: the kit trains and reconstructs in float32 here; nothing to measure")
        write_section(RESULTS, ["## bfloat16 on the CPU (`bench_amp`)", "", command, "",
                                "Not measured: this CPU has no native bfloat16 (`runtime.cpu_bf16_supported` is false),"
                                " so `amp=\"bf16\"` runs in float32 on it."])
        return 0
    if not args.skip_speed:
        write_section(RESULTS, [
            "## bfloat16 on the CPU (`bench_amp`)", "", command, "",
            "cDDPM training step (`engine.optimisation_step`) and ENS reconstruction of one volume"
            " (`reconstruct_volume`, t_test = [250, 500, 750]), float32 against bfloat16 autocast, each in fresh"
            " processes of its own, alternating, freed memory kept as the kit runs; medians over all timed steps."
            " *p*: exact two-sided permutation test of the per-process median step times (with 2 processes each it"
            " cannot fall below 0.33).", "",
            "| size: training / reconstruction | step s, float32 | step s, bf16 | speed-up | *p* | ENS s, float32 "
            "| ENS s, bf16 | speed-up | processes × steps each |",
            "|---|---|---|---|---|---|---|---|---|",
            *speed_rows(args.repeats, args.skip_paper)])
    if not args.skip_results:
        lines = results_lines([int(s) for s in args.seeds.split(",") if s])
        write_section(RESULTS.with_name("amp_results.md"), [*lines[:2], command, "", *lines[2:]])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
