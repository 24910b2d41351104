"""Pre-processing speed (paper §4.2): seconds per subject per step at 1 mm (paper profile) and 3 mm (quick), next
to the reference ways of running the same tools, on synthetic subjects with known brain masks.

References, measured in the same run on the same subjects:

* N4 — ours fits the field on an image shrunk by ``n4_shrink`` and reconstructs it at full resolution;
  reference: SimpleITK's N4 fitted on the full-resolution image (3 mm) or on the image shrunk by 2 (1 mm, where
  a full-resolution fit takes many minutes per image).
* deepbet — ours calls the network on an array with an input size parameter; reference: ``deepbet.run_bet``
  on files (its CLI path, input size 256, file I/O included).
* registration — ours is rigid then affine; reference: one affine stage from the moments (the textbook
  SimpleITK recipe), scored by the Dice of the template brain mask against the subject's warped mask.

Run: ``.venv/bin/python -m benchmarks.bench_preprocessing [--subjects 3] [--cohort]``; ``--cohort`` also times the
whole quick profile on the synthetic quick cohort (``$CDDPM_DATA_ROOT``, generated when absent) with ``n_jobs=2``.
Writes ``benchmarks/results/preprocessing.md``.
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import SimpleITK as sitk

from cddpm_lib import paths, synthetic
from cddpm_lib import preprocessing as pp
from cddpm_lib.config import profile_params
from cddpm_lib.volumes import save_text

RESULT = Path(__file__).resolve().parent / "results" / "preprocessing.md"
SITES = ("Guys", "HH", "IOP")


def make_subjects(root: Path, voxel_mm: float, n: int) -> list[dict]:
    """``n`` synthetic IXI subjects (T1 + T2 with skull, generator brain mask) at ``voxel_mm``; manifest rows."""
    cfg = synthetic.SyntheticConfig(voxel_mm=voxel_mm, n_ixi_pool=max(n, 5), n_val_per_fold=1, n_ixi_test=0,
                                    unhealthy_sizes={})
    rows = []
    for i in range(n):
        info = synthetic.write_subject(cfg, "IXI", i, SITES[i % 3], root)
        files = {k: str(root / v) for k, v in info["files"].items()}
        rows.append({"dataset": "IXI", "subject_id": info["subject_id"], "split": "test", "fold": -1,
                     "t1": files["t1"], "t2": files["t2"], "brain_mask": files["brain_mask"], "seg": "",
                     "site": info["site"], "skull_stripped": 0, "healthy": 1})
    return rows


def profile_config(profile: str) -> pp.PreprocessConfig:
    return pp.PreprocessConfig.from_params({**profile_params("preprocessing", profile), "profile": profile,
                                            "source": "synthetic", "n_jobs": 1})


def time_pipeline(cfg: pp.PreprocessConfig, rows: list[dict], out: Path) -> pd.DataFrame:
    """One subject after the other in this process (template and network loaded once, before timing)."""
    pp.template_grid(cfg.template, cfg.template_mask, cfg.spacing_mm, cfg.registration_mask_dilation_mm)
    pp._deepbet_model()
    return pd.DataFrame([pp.preprocess_subject(r, cfg, out) for r in rows])


def bench_n4(cfg: pp.PreprocessConfig, row: dict, repeats: int) -> dict:
    """Ours (shrunk fit) vs a finer fit on the T1 cropped to its brain; time and coefficient of variation."""
    fixed, _, regmask = pp.template_grid(cfg.template, cfg.template_mask, cfg.spacing_mm,
                                         cfg.registration_mask_dilation_mm)
    raw = pp._load_sitk(row["t1"])
    ref = pp.warp(pp._load_sitk(row["brain_mask"], label=True), fixed, sitk.Transform(), label=True) > 0
    img = pp.warp(raw, fixed, sitk.Transform())
    box = pp.bounding_box(ref)
    img, mask = img[box] * ref[box], ref[box]
    ours, full = [], []
    ref_shrink = 1 if cfg.spacing_mm >= 2 else 2
    for _ in range(repeats):
        t = time.perf_counter()
        a, _ = pp.n4_bias_correct(img, mask, cfg.spacing_mm, shrink=cfg.n4_shrink, iterations=cfg.n4_iterations)
        ours.append(time.perf_counter() - t)
        t = time.perf_counter()
        b, _ = pp.n4_bias_correct(img, mask, cfg.spacing_mm, shrink=ref_shrink, iterations=cfg.n4_iterations)
        full.append(time.perf_counter() - t)

    def cv(x: np.ndarray) -> float:
        return float(x[mask].std() / x[mask].mean())

    return {"ours_s": np.median(ours), "ref_s": np.median(full), "cv_before": cv(img), "cv_ours": cv(a),
            "cv_ref": cv(b), "ref_shrink": ref_shrink}


def bench_deepbet(row: dict, spacing_mm: float, shape: int, repeats: int) -> dict:
    """Ours on the isotropic array vs ``deepbet.run_bet`` on the same image written to disk."""
    from deepbet import run_bet

    iso = pp.resample_isotropic(pp._load_sitk(row["t1"]), spacing_mm)
    ref = pp.from_sitk(sitk.Resample(pp._load_sitk(row["brain_mask"], label=True), iso, sitk.Transform(),
                                     sitk.sitkNearestNeighbor, 0))[0] > 0
    ours, theirs = [], []
    with tempfile.TemporaryDirectory() as tmp:
        src, dst = Path(tmp) / "t1.nii.gz", Path(tmp) / "mask.nii.gz"
        arr, aff = pp.from_sitk(iso)
        pp.save_nifti(arr, aff, src)
        for _ in range(repeats):
            t = time.perf_counter()
            m = pp.from_sitk(pp.native_brain_mask(iso, "deepbet", deepbet_shape=shape))[0] > 0
            ours.append(time.perf_counter() - t)
            t = time.perf_counter()
            run_bet([str(src)], mask_paths=[str(dst)], no_gpu=True, skip_broken=False)
            theirs.append(time.perf_counter() - t)
        m_ref = pp.load_nifti(dst)[0] > 0
    return {"ours_s": np.median(ours), "ref_s": np.median(theirs), "dice_ours": pp.dice(m, ref),
            "dice_ref": pp.dice(m_ref, ref)}


def bench_registration(cfg: pp.PreprocessConfig, rows: list[dict]) -> dict:
    """Rigid→affine (ours) vs one affine stage, both on the deepbet-stripped brain; Dice of the template mask."""
    fixed, tmask, regmask = pp.template_grid(cfg.template, cfg.template_mask, cfg.spacing_mm,
                                             cfg.registration_mask_dilation_mm)
    tm = pp.from_sitk(tmask)[0] > 0
    out = {"ours_s": [], "ref_s": [], "dice_ours": [], "dice_ref": []}
    for row in rows:
        iso = pp.resample_isotropic(pp._load_sitk(row["t1"]), cfg.spacing_mm)
        native = pp.native_brain_mask(iso, "deepbet", deepbet_shape=cfg.deepbet_shape)
        moving = sitk.Cast(iso, sitk.sitkFloat32) * sitk.Cast(native, sitk.sitkFloat32)
        ref = pp._load_sitk(row["brain_mask"], label=True)
        t = time.perf_counter()
        tx, _ = pp.register_affine(fixed, moving, regmask, shrink=cfg.registration_shrink,
                                   sampling=cfg.registration_sampling)
        out["ours_s"].append(time.perf_counter() - t)
        t = time.perf_counter()
        init = sitk.CenteredTransformInitializer(fixed, moving, sitk.AffineTransform(3),
                                                 sitk.CenteredTransformInitializerFilter.MOMENTS)
        tx_ref, _ = pp._mattes_mi(fixed, moving, init, regmask, cfg.registration_shrink, cfg.registration_sampling,
                                  cfg.registration_iterations, 1)
        out["ref_s"].append(time.perf_counter() - t)
        out["dice_ours"].append(pp.dice(tm, pp.warp(ref, fixed, tx, label=True) > 0))
        out["dice_ref"].append(pp.dice(tm, pp.warp(ref, fixed, tx_ref, label=True) > 0))
    return {k: float(np.median(v)) for k, v in out.items()} | {"dice_ref_min": float(np.min(out["dice_ref"])),
                                                               "dice_ours_min": float(np.min(out["dice_ours"]))}


def bench_cohort() -> tuple[float, int, pd.DataFrame]:
    """The quick profile on the synthetic quick cohort, ``n_jobs=2``, from scratch (temporary output folder)."""
    from cddpm_lib import manifests

    raw = paths.raw_manifest_path("synthetic", "quick")
    if not raw.exists():
        manifests.prepare_data(manifests.DataConfig.from_namespace({"profile": "quick", "source": "synthetic"}),
                               progress=False)
    cfg = pp.PreprocessConfig.from_params({**profile_params("preprocessing", "quick"), "profile": "quick",
                                           "source": "synthetic", "n_jobs": 2})
    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()
        _, qc = pp.preprocess_manifest(cfg, raw, Path(tmp) / "preprocessed", progress=False)
        return time.perf_counter() - t, len(qc), qc


def step_table(results: dict[str, pd.DataFrame]) -> str:
    steps = [s for s in pp.STEPS]
    lines = ["| profile | " + " | ".join(steps) + " | total | brain Dice |", "|---" * (len(steps) + 3) + "|"]
    for name, qc in results.items():
        med = [f"{qc[f'time_{s}'].median():.2f}" if f"time_{s}" in qc else "–" for s in steps]
        lines.append(f"| {name} | " + " | ".join(med) + f" | {qc['time_total'].median():.2f} | "
                     f"{qc['dice_vs_reference'].median():.3f} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--subjects", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--cohort", action="store_true", help="also time the whole quick cohort (minutes)")
    args = ap.parse_args()
    sitk.ProcessObject_SetGlobalDefaultNumberOfThreads(1)
    import torch

    torch.set_num_threads(1)
    load = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        subjects = {"paper (1 mm)": make_subjects(tmp / "raw1", 1.0, args.subjects),
                    "quick (3 mm)": make_subjects(tmp / "raw2", 2.0, args.subjects)}
        cfgs = {"paper (1 mm)": profile_config("paper"), "quick (3 mm)": profile_config("quick")}
        results, n4, bet, reg = {}, {}, {}, {}
        for k, cfg in cfgs.items():
            results[k] = time_pipeline(cfg, subjects[k], tmp / k.split()[0])
            print(k, "pipeline", results[k]["time_total"].round(1).tolist(), flush=True)
            n4[k] = bench_n4(cfg, subjects[k][0], args.repeats)
            bet[k] = bench_deepbet(subjects[k][0], cfg.spacing_mm, cfg.deepbet_shape, args.repeats)
            reg[k] = bench_registration(cfg, subjects[k])
            print(k, "references done", flush=True)
    md = ["## Pre-processing (paper §4.2)", "",
          f"Median seconds per subject per step, one process, one thread, {args.subjects} synthetic IXI subjects "
          f"(T1 + T2 with skull, neck and noise; raw 1 mm for the paper profile, 2 mm for quick), "
          f"load average {load:.1f} on {os.cpu_count()} cores (other jobs share the machine). "
          "Brain Dice: pre-processed mask against the generator's exact mask on the working grid.", "",
          step_table(results), "",
          "| tool | profile | ours (s) | reference (s) | ratio | quality ours | quality reference |",
          "|---|---|---|---|---|---|---|"]
    for k in cfgs:
        md.append(f"| N4 (fit shrunk {cfgs[k].n4_shrink}x vs {n4[k]['ref_shrink']}x) | {k} | {n4[k]['ours_s']:.2f} | "
                  f"{n4[k]['ref_s']:.2f} | {n4[k]['ref_s'] / n4[k]['ours_s']:.1f}x | CV {n4[k]['cv_ours']:.3f} | "
                  f"CV {n4[k]['cv_ref']:.3f} (before {n4[k]['cv_before']:.3f}) |")
        md.append(f"| deepbet (array, size {cfgs[k].deepbet_shape} vs run_bet, 256) | {k} | "
                  f"{bet[k]['ours_s']:.2f} | {bet[k]['ref_s']:.2f} | {bet[k]['ref_s'] / bet[k]['ours_s']:.1f}x | "
                  f"Dice {bet[k]['dice_ours']:.3f} | Dice {bet[k]['dice_ref']:.3f} |")
        md.append(f"| registration (rigid→affine vs affine) | {k} | {reg[k]['ours_s']:.2f} | "
                  f"{reg[k]['ref_s']:.2f} | {reg[k]['ref_s'] / reg[k]['ours_s']:.1f}x | "
                  f"Dice {reg[k]['dice_ours']:.3f} (min {reg[k]['dice_ours_min']:.3f}) | "
                  f"Dice {reg[k]['dice_ref']:.3f} (min {reg[k]['dice_ref_min']:.3f}) |")
    if args.cohort:
        wall, n, qc = bench_cohort()
        md += ["", f"Whole quick profile on the synthetic quick cohort: **{wall:.0f} s for {n} subjects** "
               f"({wall / n:.2f} s wall per subject, 2 processes; median {qc['time_total'].median():.2f} s CPU per "
               f"subject; {int((qc['status'] != 'ok').sum())} failed; brain Dice median "
               f"{qc['dice_vs_reference'].median():.3f}, min {qc['dice_vs_reference'].min():.3f}); "
               f"load average {os.getloadavg()[0]:.1f} at the end."]
    text = "\n".join(md) + "\n"
    save_text(text, RESULT)
    print(text)


if __name__ == "__main__":
    main()
