"""Score one new scan with a trained model: ``cddpm-uad score scan.nii.gz --checkpoint best.pt ...``.

The scan goes through the same preprocessing as the training data (paper §4.2, the profile's settings: registration
to the template, skull stripping unless ``skull_stripped``, N4, crop/pad/downsample, percentile rescaling; a T2
through its session's T1 when ``t1`` is given, as the training data), then the
model reconstructs every axial slice, the residual ``|x − x̂|`` gets the paper's post-processing (§4.3: brain mask
erosion, median filter) and is thresholded; connected components smaller than the segmentation stage's minimum are
removed.

Outputs (``output/``): ``anomaly_map.nii.gz`` (continuous, post-processed) and ``segmentation.nii.gz`` (binary)
**in the scan's own space** (its grid and affine; mapped back through the inverse registration, linear for the map,
nearest neighbour for the mask; the model works at the profile's resolution, so the maps are that coarse),
``overview.png`` (axial slices: input, reconstruction, anomaly map, segmentation), ``summary.json`` (threshold and
where it came from, lesion volume, model, test-time settings, preprocessing QC) and, under
``preprocessed/scored/<scan>/``, everything in the preprocessed (template) space the model saw: the input, brain
mask, reconstruction, anomaly map, segmentation and the registration transform.

The threshold is ``threshold`` when given, else the one the segmentation stage chose on the validation set for the
same model, fold and test-time variant of the data set named by ``threshold_dataset`` (required when the stage chose
one per evaluation set, e.g. BraTS21 and MSLUB for T2). It is read from the run that holds the checkpoint
(``<run>/checkpoints/<model_id>/fold<k>/best.pt`` -> ``<run>/results/segmentation_runs.csv``), so a run folder that
was moved or copied keeps its own thresholds instead of picking up those of whatever run ``$CDDPM_RUNS_ROOT`` holds.
"""
from __future__ import annotations

import dataclasses
import sys
from pathlib import Path
from typing import Any, NamedTuple, Sequence

import numpy as np
import pandas as pd

from . import paths
from .config import AMPS, ConfigError, profile_params

WEIGHTINGS = ("t1", "t2")


class ScoringError(RuntimeError):
    """A scan, checkpoint or setting that cannot be scored; the message says what and how to fix it."""


@dataclasses.dataclass(frozen=True)
class CheckpointInfo:
    """Where a checkpoint sits in the run layout ``runs/<profile>/checkpoints/<model_id>/fold<k>/best.pt``."""

    profile: str | None
    model_id: str | None
    fold: int | None
    run_dir: Path | None = None  # the run folder holding ``checkpoints/`` (``runs/<profile>``), wherever it lies

    @property
    def results_dir(self) -> Path | None:
        """``<run>/results``: where the segmentation stage of this checkpoint's run wrote its thresholds."""
        return self.run_dir / "results" if self.run_dir is not None else None

    @property
    def weighting(self) -> str | None:
        """The weighting the model was trained on, from the model id's suffix (``cddpm-ssl_t2`` -> ``t2``)."""
        suffix = (self.model_id or "").rpartition("_")[2]
        return suffix if suffix in WEIGHTINGS else None


def checkpoint_info(checkpoint: Path) -> CheckpointInfo:
    """Profile, model id, fold and run folder read from the checkpoint's path (``None`` where the path does not
    follow the run layout, e.g. a checkpoint copied elsewhere; the profile also where the run folder is not named
    after one)."""
    path = checkpoint.resolve()
    parts = path.parts
    if len(parts) >= 5 and parts[-4] == "checkpoints" and parts[-2].startswith("fold") and parts[-2][4:].isdigit():
        profile = parts[-5] if parts[-5] in paths.PROFILES else None
        return CheckpointInfo(profile, parts[-3], int(parts[-2][4:]), path.parents[3])
    return CheckpointInfo(None, None, None)


def _variant(model_name: str, t_test: Sequence[int] | None, default: str) -> tuple[str, dict[str, Any]]:
    """Test-time variant: ``t_test`` when given (several = ensemble), else ``default`` (the segmentation
    stage's: ``ens`` when its ``ens`` is on, else ``t<t_test>``)."""
    from .reconstruct import ENSEMBLE_T_TEST, variant_kwargs

    diffusion = model_name in ("ddpm", "pddpm", "cddpm")
    if not diffusion:
        if t_test:
            raise ScoringError(f"--t-test is only for diffusion models; the checkpoint holds {model_name!r}")
        return "default", {}
    if not t_test:
        return default, variant_kwargs(default)
    ts = [int(t) for t in t_test]
    if sorted(ts) == sorted(ENSEMBLE_T_TEST):
        return "ens", variant_kwargs("ens")
    return (f"t{ts[0]}" if len(ts) == 1 else "custom"), {"t_test": ts[0] if len(ts) == 1 else ts}


def _stage_runs(profile: str, model_id: str | None, fold: int | None,
                results: Path | None = None) -> tuple[pd.DataFrame, Path]:
    """Rows of ``segmentation_runs.csv`` (the segmentation stage's thresholds) for this model and fold, read from
    ``results`` (the checkpoint's run, :attr:`CheckpointInfo.results_dir`), else from ``runs/<profile>/results``."""
    csv = Path(results if results is not None else paths.results_dir(profile)) / "segmentation_runs.csv"
    if model_id is None or fold is None:
        raise ScoringError("no threshold given and the checkpoint is not inside a run folder "
                           "(runs/<profile>/checkpoints/<model_id>/fold<k>/); pass --threshold")
    if not csv.exists():
        raise ScoringError(f"no threshold given and {csv} does not exist; run the segmentation stage "
                           "(notebook 06) or pass --threshold")
    runs = pd.read_csv(csv, dtype={"weights": str})  # hex fingerprints: never numbers
    if "purpose" in runs:  # the Fig. 5 sweep's runs have thresholds of their own t_test
        runs = runs[runs["purpose"] == "table3"]
    return runs[(runs["model_id"] == model_id) & (runs["fold"] == fold)], csv


def stage_variant(profile: str, model_id: str | None, fold: int | None, results: Path | None = None) -> str | None:
    """The test-time variant the segmentation stage evaluated this model with in Table 3 (e.g. ``t500`` for the
    cDDPM without SSL, ``ens`` for cDDPM+SSL+ENS), or ``None`` when the stage has no (single) one.
    ``results``: the run's results folder (default ``runs/<profile>/results``)."""
    try:
        runs, _ = _stage_runs(profile, model_id, fold, results)
    except ScoringError:
        return None
    variants = list(dict.fromkeys(runs["variant"]))
    return variants[0] if len(variants) == 1 else None


def segmentation_amp(profile: str, model_id: str | None, fold: int | None, results: Path | None = None
                     ) -> str | None:
    """The precision the segmentation stage reconstructed this model with (``segmentation_runs.csv``'s ``amp``:
    the one that ran, after any fallback), or ``None`` when the stage recorded none or more than one. A value
    that is no precision (``none``, ``bf16``, ``fp16``) is an error naming the file."""
    try:
        runs, csv = _stage_runs(profile, model_id, fold, results)
    except ScoringError:
        return None
    if "amp" not in runs:
        return None
    amps = list(dict.fromkeys(_recorded_amp(a, csv, model_id, fold) for a in runs["amp"].dropna()))
    return amps[0] if len(amps) == 1 else None


def _recorded_amp(value: Any, csv: Path, model_id: str | None, fold: int | None) -> str:
    """A precision read from ``segmentation_runs.csv``, checked (an error names the file)."""
    if str(value) not in AMPS:
        raise ScoringError(f"{csv}: column 'amp' of {model_id} fold {fold} holds {value!r}, not one of {AMPS}")
    return str(value)


class StageThreshold(NamedTuple):
    """A threshold of the segmentation stage (:func:`validation_threshold`)."""

    value: float
    source: str  # the CSV's full path, the data set and the search method
    amp: str | None  # the precision of the reconstructions it was chosen on (None: not recorded)


def validation_threshold(profile: str, model_id: str | None, fold: int | None, variant: str,
                         dataset: str | None = None, results: Path | None = None,
                         weights: str | None = None) -> StageThreshold:
    """Threshold the segmentation stage chose on ``dataset``'s validation set for this model/fold/variant, where
    it came from (the CSV's full path, the data set and the search method) and the precision of the
    reconstructions it was chosen on.

    Thresholds are data-set specific (a tumour threshold is not a lesion threshold), so when the stage chose one
    per evaluation set of the weighting (T2: BraTS21, MSLUB; T1: ATLAS, WMH) ``dataset`` must say which.
    ``results``: the run's results folder (default ``runs/<profile>/results``). ``weights``: the checkpoint's
    :func:`~cddpm_lib.fingerprint.module_fingerprint`; thresholds the stage recorded for other weights are refused.
    """
    from .reconstruct import variant_kwargs

    runs, csv = _stage_runs(profile, model_id, fold, results)
    hit = runs[runs["variant"] == variant]
    if hit.empty:
        have = sorted(set(runs["variant"]))
        options = [" ".join(str(t) for t in np.atleast_1d(variant_kwargs(v).get("t_test", []))) for v in have]
        hint = " or ".join(f"--t-test {o}" for o in options if o)
        raise ScoringError(f"{csv} has no threshold for model {model_id!r}, fold {fold}, variant {variant!r} "
                           f"(it has {have or 'none for this model and fold'}); pass --threshold"
                           + (f" or {hint}" if hint else ""))
    choices = {str(r["dataset"]): float(r["threshold"]) for _, r in hit.iterrows()}
    if dataset is None and len(choices) > 1:
        listed = ", ".join(f"{d} ({t:.4g})" for d, t in choices.items())
        raise ScoringError(f"the segmentation stage chose a threshold per data set for {model_id!r} fold {fold}: "
                           f"{listed}; pass --threshold-dataset with the one whose pathology you look for, "
                           "or --threshold")
    if dataset is not None and dataset not in choices:
        raise ScoringError(f"--threshold-dataset {dataset!r}: {csv} has thresholds for {sorted(choices)} "
                           f"(model {model_id!r}, fold {fold}, variant {variant!r})")
    chosen = dataset or next(iter(choices))
    row = hit[hit["dataset"] == chosen].iloc[0]
    if weights is not None and "weights" in row.index and pd.notna(row["weights"]) and row["weights"] != weights:
        raise ScoringError(f"the thresholds in {csv} were chosen for other weights of {model_id!r} fold {fold} "
                           "than this checkpoint holds (the model was trained again after the segmentation stage "
                           "ran, or this is not the best.pt that stage evaluated); rerun the segmentation stage "
                           "(notebook 06) or pass --threshold")
    amp = row["amp"] if "amp" in row.index and pd.notna(row["amp"]) else None
    return StageThreshold(float(row["threshold"]), f"{csv}: validation on {chosen} ({row['threshold_method']})",
                          None if amp is None else _recorded_amp(amp, csv, model_id, fold))


def _load_checkpoint(checkpoint: Path):
    """:func:`cddpm_lib.models.load_model` with errors that say what the file is. torch's own message for a file
    that is not a checkpoint (a NIfTI scan passed as ``--checkpoint``) is advice to load it with
    ``weights_only=False``, which is wrong here: the kit's checkpoints hold tensors and plain types only."""
    import pickle
    import zipfile

    from .models import load_model

    where = "pass the best.pt the training stage wrote under runs/<profile>/checkpoints/<model_id>/fold<k>/"
    if checkpoint.is_dir():
        raise ScoringError(f"checkpoint {checkpoint} is a folder; {where}")
    try:
        return load_model(checkpoint)
    except FileNotFoundError as exc:
        raise ScoringError(str(exc)) from exc
    except Exception as exc:  # torch.load raises pickle, zip and OS errors for files that are not checkpoints
        if "not a cddpm-uad checkpoint" in str(exc):  # load_model's check of the keys
            raise ScoringError(f"checkpoint {exc}; {where}") from exc
        if not zipfile.is_zipfile(checkpoint) or isinstance(exc, pickle.UnpicklingError):
            why = ("not a file written by torch.save" if not zipfile.is_zipfile(checkpoint) else
                   "it holds Python objects other than tensors and plain containers")
            raise ScoringError(f"checkpoint {checkpoint} cannot be loaded: not a cddpm-uad checkpoint ({why}); "
                               f"{where}") from exc
        lines = str(exc).strip().splitlines()
        raise ScoringError(f"checkpoint {checkpoint} cannot be loaded: {type(exc).__name__}: "
                           f"{lines[0] if lines else ''}") from exc


def _check_weighting(weighting: str, checkpoint: Path, info: CheckpointInfo) -> None:
    """A scan of the other weighting would be reconstructed by a model that never saw its contrast, and scored
    against a threshold of the other evaluation sets: refuse it when the checkpoint's weighting is known (its
    model id, else the ``config.json`` the training stage writes beside it)."""
    import json

    trained, source = info.weighting, f"model id {info.model_id!r}"
    config = checkpoint.parent / "config.json"
    if trained is None and config.is_file():
        try:
            trained, source = json.loads(config.read_text()).get("weighting"), str(config)
        except (OSError, ValueError, AttributeError):
            trained = None
    if trained in WEIGHTINGS and trained != weighting:
        raise ScoringError(f"--weighting {weighting} but the checkpoint was trained on {trained.upper()} scans "
                           f"({source}); score a {trained.upper()} scan with it (--weighting {trained}), or pass "
                           f"a checkpoint of a {weighting.upper()} model (model id ending in _{weighting})")


def _load_scan(scan: Path) -> None:
    from .volumes import load_nifti

    if not scan.exists():
        raise ScoringError(f"scan {scan} does not exist")
    try:
        arr, _ = load_nifti(scan)
    except Exception as exc:  # nibabel raises several types for broken files
        raise ScoringError(f"scan {scan} is not a readable NIfTI file: {exc}") from exc
    if arr.ndim != 3 or min(arr.shape) < 8:
        raise ScoringError(f"scan {scan} must be a 3-D volume of at least 8 voxels per axis, got shape {arr.shape}")
    if not np.isfinite(arr).all() or float(arr.max()) <= float(arr.min()):
        raise ScoringError(f"scan {scan} is constant or holds NaN/inf values")


def _check_output(output: Path, overwrite: bool) -> None:
    """The output folder must be new or empty (or ``overwrite``): scoring another scan into it would replace the
    earlier scan's maps and summary without a word."""
    if output.exists() and not output.is_dir():
        raise ScoringError(f"output {output} is a file; pass a folder (-o)")
    if output.is_dir() and any(output.iterdir()) and not overwrite:
        raise ScoringError(f"output folder {output} is not empty (an earlier score?); pass a new folder per scan "
                           "(e.g. -o out/<scan name>) or --overwrite to replace what it holds")


def _check_settings(model, t_test: Sequence[int] | None, threshold: float | None, device: str):
    """Test-time settings checked before the minutes of preprocessing: ``t_test`` within the model's ``1..T``, a
    finite ``threshold``, a device torch knows and has. Returns the device."""
    import torch

    from .runtime import default_device

    if threshold is not None and not np.isfinite(threshold):
        raise ScoringError(f"--threshold must be a finite number, got {threshold}")
    if t_test and hasattr(model, "diffusion"):
        T = model.diffusion.T
        bad = [t for t in t_test if not 1 <= int(t) <= T]
        if bad:
            raise ScoringError(f"--t-test {bad}: noise levels must lie in 1..{T} (the model's T)")
    try:
        dev = default_device(device)
    except ValueError:
        raise ScoringError(f"--device {device!r}: not a device (auto, cpu, cuda, cuda:N)") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ScoringError(f"--device {device!r}: this torch build or machine has no CUDA device; use --device cpu")
    return dev


def score_scan(scan: Path, checkpoint: Path, output: Path, *, weighting: str, threshold: float | None = None,
               threshold_dataset: str | None = None, t_test: Sequence[int] | None = None, device: str = "auto",
               skull_stripped: bool = False, profile: str | None = None, seed: int = 0,
               t1: Path | None = None, overwrite: bool = False, amp: str | None = None) -> dict[str, Path]:
    """Preprocess, reconstruct, post-process and segment one scan; returns ``{output name: path}``.

    Test-time variant: ``t_test`` when given, else the one the segmentation stage used for this model in Table 3
    (:func:`stage_variant`). Threshold: ``threshold``, else the stage's validation threshold of that variant on
    ``threshold_dataset`` (:func:`validation_threshold`). Diffusion noise: seeded from ``(seed, scan name)`` as
    the evaluation stages seed each volume (:func:`cddpm_lib.reconstruct.subject_seed`).

    ``profile``: preprocessing and post-processing settings (default: the checkpoint's run profile, else
    ``quick``); the preprocessed size must equal the size the model was trained on.

    ``t1``: the T1 scan of the same session as a T2 ``scan``. The training data's T2 scans were registered (and
    skull-stripped) through their session's T1, to which each T2 was first aligned rigidly
    (``registration_weighting``, ``align_weightings``); with ``t1`` the scan gets exactly that. Without it a T2 is
    registered and skull-stripped on its own, which places and masks it differently (``summary.json`` says so).
    ``overwrite``: allow an ``output`` folder that already holds files. ``amp``: mixed precision of the
    reconstruction (:func:`cddpm_lib.reconstruct.reconstruct_volume`); default the precision the stage's
    threshold was chosen on (``segmentation_runs.csv``'s ``amp`` of its row), else the one the segmentation stage
    reconstructed this model with (:func:`segmentation_amp`), else the segmentation profile's. ``summary.json`` records
    the one that ran (``amp``) and, for a threshold of the stage, the one the threshold was chosen on
    (``threshold_amp``); an ``amp`` that differs from it is warned of (bfloat16 moves a reconstruction by up to a
    few 1e-3, ``BENCHMARKS.md``).
    """
    import matplotlib.pyplot as plt
    import SimpleITK as sitk

    from .postprocessing import binarize
    from .preprocessing import PreprocessConfig, _load_sitk, preprocess_subject, to_native, transform_file
    from .reconstruct import reconstruct_volume, subject_seed
    from .runtime import effective_amp
    from .segmentation import SegmentationConfig, continuous_map_fn
    from .volumes import load_nifti, save_figure, save_json, save_nifti

    scan, checkpoint, output = Path(scan), Path(checkpoint), Path(output)
    if weighting not in WEIGHTINGS:
        raise ScoringError(f"weighting must be one of {WEIGHTINGS}, got {weighting!r}")
    _check_output(output, overwrite)
    _load_scan(scan)
    if t1 is not None:
        if weighting == "t1":
            raise ScoringError("--t1 is the T1 scan of the session of a T2 scan; the scan scored is a T1 already")
        t1 = Path(t1)
        _load_scan(t1)
    model = _load_checkpoint(checkpoint)
    info = checkpoint_info(checkpoint)
    _check_weighting(weighting, checkpoint, info)
    dev = _check_settings(model, t_test, threshold, device)
    profile = profile or info.profile or "quick"
    try:
        paths.check_profile(profile)
        session = ("t1", weighting) if t1 is not None else (weighting,)
        pre_cfg = PreprocessConfig.from_namespace({"profile": profile, "source": "real", "n_jobs": 1,
                                                   "weightings": session, "registration_weighting": session[0]})
        trained_reg = PreprocessConfig.from_namespace({"profile": profile, "source": "real"}).registration_weighting
        seg_cfg = SegmentationConfig.from_params({**profile_params("segmentation", profile), "profile": profile,
                                                  "device": device, **({"amp": amp} if amp else {})})
    except (ConfigError, ValueError) as exc:
        raise ScoringError(f"profile {profile!r}: {exc}") from exc
    out_hw = pre_cfg.output_shape[:2]
    if tuple(model.image_size) != tuple(out_hw):
        raise ScoringError(f"the checkpoint was trained on {tuple(model.image_size)} slices but profile "
                           f"{profile!r} preprocesses to {pre_cfg.output_shape}; pass the training run's --profile")
    default = stage_variant(profile, info.model_id, info.fold, info.results_dir) or (
        "ens" if seg_cfg.ens else f"t{seg_cfg.t_test}")
    variant, recon_kwargs = _variant(model.name, t_test, default)
    if threshold is None:
        from .fingerprint import module_fingerprint

        threshold, threshold_source, threshold_amp = validation_threshold(
            profile, info.model_id, info.fold, variant, threshold_dataset, info.results_dir,
            weights=module_fingerprint(model))
    else:
        threshold_source, threshold_amp = "given (--threshold)", None
    # precision: as asked, else the one the threshold (or the stage's other runs of this model) was chosen on;
    # said before the preprocessing, which can take minutes
    amp_run, amp_note = effective_amp(amp or threshold_amp or segmentation_amp(profile, info.model_id, info.fold,
                                                                               info.results_dir) or seg_cfg.amp, dev)
    if amp_note:
        print(f"warning: {amp_note}", file=sys.stderr)
    if threshold_amp is not None and amp_run != threshold_amp:
        print(f"warning: the threshold was chosen on reconstructions in amp={threshold_amp!r}; this scan is "
              f"reconstructed in amp={amp_run!r}", file=sys.stderr)
    registration = (f"through the session's {pre_cfg.registration_weighting.upper()} (--t1), as the training data"
                    if t1 is not None or weighting == trained_reg else
                    f"on the {weighting.upper()} itself: the training data were registered and skull-stripped "
                    f"through their session's {trained_reg.upper()}, so placement and brain mask can differ; pass "
                    f"--t1 with the session's {trained_reg.upper()} for the same preprocessing")
    if t1 is None and weighting != trained_reg:
        print(f"warning: registering {scan.name} {registration}", file=sys.stderr)

    subject = {"dataset": "scored", "subject_id": scan.name.split(".")[0], weighting: str(scan.resolve()),
               "skull_stripped": int(skull_stripped), **({"t1": str(t1.resolve())} if t1 is not None else {})}
    qc = preprocess_subject(subject, pre_cfg, output / "preprocessed")
    if qc["status"] != "ok":
        raise ScoringError(f"preprocessing {scan} failed at step {qc['failure_step']!r}: {qc['failure_reason']}")
    sub_dir = output / "preprocessed" / "scored" / subject["subject_id"]
    image, affine = load_nifti(sub_dir / f"{weighting}.nii.gz")
    mask = load_nifti(sub_dir / "brain_mask.nii.gz")[0] > 0

    model.to(dev)
    recon, residual = reconstruct_volume(model, image, mask, device=dev, seed=subject_seed(seed, subject["subject_id"]),
                                         amp=amp_run, **recon_kwargs)
    anomaly = continuous_map_fn(seg_cfg)(residual, mask).astype(np.float32)
    segmentation = binarize(anomaly, threshold, seg_cfg.spec())

    out = {"anomaly_map": output / "anomaly_map.nii.gz", "segmentation": output / "segmentation.nii.gz",
           "overview": output / "overview.png", "summary": output / "summary.json",
           "preprocessed_image": sub_dir / f"{weighting}.nii.gz",
           "preprocessed_reconstruction": sub_dir / "reconstruction.nii.gz",
           "preprocessed_anomaly_map": sub_dir / "anomaly_map.nii.gz",
           "preprocessed_segmentation": sub_dir / "segmentation.nii.gz"}
    save_nifti(recon, affine, out["preprocessed_reconstruction"], dtype=np.float32)
    save_nifti(anomaly, affine, out["preprocessed_anomaly_map"], dtype=np.float32)
    save_nifti(segmentation.astype(np.uint8), affine, out["preprocessed_segmentation"], dtype=np.uint8)

    native = _load_sitk(str(scan))
    transform = sitk.ReadTransform(str(sub_dir / transform_file(weighting, pre_cfg.registration_weighting)))
    native_affine = load_nifti(scan)[1]
    native_map = to_native(anomaly, affine, native, transform)
    native_seg = to_native(segmentation.astype(np.float32), affine, native, transform, label=True) > 0.5
    if skull_stripped:  # the scan's own brain (image > 0) is finer than the model's grid
        native_brain = load_nifti(scan)[0] > 0
        native_map, native_seg = native_map * native_brain, native_seg & native_brain
    save_nifti(native_map, native_affine, out["anomaly_map"], dtype=np.float32)
    save_nifti(native_seg.astype(np.uint8), native_affine, out["segmentation"], dtype=np.uint8)
    fig = plot_overview(image, recon, anomaly, segmentation, title=f"{scan.name} — {model.name} ({variant}), "
                                                                     f"threshold {threshold:.3g}")
    save_figure(fig, output / "overview", formats=("png",))
    plt.close(fig)

    def ml(seg: np.ndarray, aff: np.ndarray) -> float:
        return float(seg.sum() * abs(np.linalg.det(aff[:3, :3])) / 1000)

    save_json({"scan": str(scan), "checkpoint": str(checkpoint), "model": model.name, "model_id": info.model_id,
               "fold": info.fold, "profile": profile, "variant": variant, "test_time": recon_kwargs,
               "amp": amp_run, "threshold_amp": threshold_amp,
               "threshold": float(threshold), "threshold_source": threshold_source, "registration": registration,
               "t1": str(t1) if t1 is not None else None,
               "anomalous_voxels": int(native_seg.sum()), "anomalous_ml": ml(native_seg, native_affine),
               "preprocessed_anomalous_voxels": int(segmentation.sum()),
               "preprocessed_anomalous_ml": ml(segmentation, affine),
               "outputs": {k: str(v) for k, v in out.items()},
               "preprocessing_qc": {k: v for k, v in qc.items() if k != "traceback"}}, out["summary"])
    return out


def plot_overview(image: np.ndarray, recon: np.ndarray, anomaly: np.ndarray, segmentation: np.ndarray, *,
                  n_slices: int = 3, title: str = ""):
    """Axial slices (the ``n_slices`` with the most segmented voxels; central ones when none) as rows; columns:
    input, reconstruction, anomaly map, input with the segmentation outlined."""
    import matplotlib.pyplot as plt

    z = image.shape[2]
    counts = segmentation.reshape(-1, z).sum(0)
    picks = np.argsort(-counts, kind="stable")[:n_slices] if counts.any() else \
        np.linspace(z // 4, 3 * z // 4, n_slices).round().astype(int)
    picks = sorted(int(p) for p in picks)
    vmax = float(np.percentile(anomaly[anomaly > 0], 99.5)) if (anomaly > 0).any() else 1.0
    fig, axes = plt.subplots(len(picks), 4, figsize=(10, 2.6 * len(picks)), squeeze=False)
    for row, k in zip(axes, picks):
        panels = [(image, "gray", (0, 1), "input"), (recon, "gray", (0, 1), "reconstruction"),
                  (anomaly, "inferno", (0, vmax), "anomaly map"), (image, "gray", (0, 1), "segmentation")]
        for ax, (vol, cmap, (lo, hi), name) in zip(row, panels):
            ax.imshow(np.rot90(vol[:, :, k]), cmap=cmap, vmin=lo, vmax=hi)
            ax.set_title(f"{name}, z={k}", fontsize=8)
            ax.axis("off")
        if segmentation[:, :, k].any():
            row[3].contour(np.rot90(segmentation[:, :, k].astype(float)), levels=[0.5], colors="red", linewidths=1)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return fig


__all__ = ["plot_overview", "ScoringError", "CheckpointInfo", "checkpoint_info", "stage_variant",
           "validation_threshold", "score_scan"]
