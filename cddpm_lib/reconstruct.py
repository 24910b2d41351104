"""Volume → pseudo-healthy reconstruction and residual map, and the saved evaluation sets (paper §3.1, §4.2).

The 2D models see a volume ``[X, Y, Z]`` as its axial slices ``[Z, 1, X, Y]`` (``volumes.volume_to_slices``) and
reconstruct all of them (paper §4.4: "iterating over all slices to reconstruct the full volume at test time").
The residual is ``R = |x − x̂|`` (paper §4.3); models that override ``anomaly_map`` (Thresh) supply it directly.

Variants name how a diffusion model is run at test time (paper §3.1, §4.4) and become the ``<variant>`` folder of
``paths.recon_dir``:

- ``"t500"`` (any ``t<int>``): one step from ``x_{t_test}`` -> ``{"t_test": 500}``;
- ``"ens"``: the mean of the reconstructions at ``t_test = [250, 500, 750]`` -> ``{"t_test": [250, 500, 750]}``;
- ``"default"``: non-diffusion models, no test-time arguments -> ``{}``.

An ensemble is saved together with its single-``t`` parts (``t250``, ``t500``, ``t750`` beside ``ens``; for a
suffixed variant such as ``ens_contrast0.5``, ``t250_contrast0.5`` …): the diffusion noise at each ``t`` depends only
on the volume's seed and ``t`` (``GaussianDiffusion.test_noise``), so the ensemble is exactly the mean of those
single-``t`` reconstructions, and every stage reuses whichever of them another stage (or an earlier run) saved —
Table 3's t500, the ENS rows, the Fig. 5 sweep and Table 2 share one set of network passes.

:func:`reconstruct_dataset` writes one compressed ``<subject_id>.npz`` per volume holding ``image, recon, anomaly,
brain_mask, seg, affine`` (float32 volumes ``[X, Y, Z]``, uint8 masks) plus ``seconds`` (model time of that volume).
Existing valid files are kept (the stage resumes after an interruption). Diffusion reconstructions draw their noise
from a CPU ``torch.Generator`` seeded per subject, so a volume's noise does not depend on the order of the volumes
or ``max_batch``, and on the device only through arithmetic: a CPU computes the simplex fields with the numba
kernel in float64, a GPU with torch in float32 (``noise.fractal_simplex``; up to about 1e-4 apart), and the network
differs by about 1e-6 in float32, while bfloat16 (``amp``) moves a reconstruction by up to a few 1e-3
(``BENCHMARKS.md``). A saved file's key holds the precision but not the device, so a file saved on one device is
reused on another.
"""
from __future__ import annotations

import inspect
import time
import warnings
import zlib
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd
import torch

from . import paths
from .fingerprint import module_fingerprint, record_fingerprint
from .models.base import UADModel
from .runtime import autocast, effective_amp, keep_freed_memory
from .volumes import VolumeError, load_nifti, load_npz, save_npz, slices_to_volume, volume_to_slices

#: paper §4.4: the ensemble of test-time noise levels ("ENS")
ENSEMBLE_T_TEST: tuple[int, ...] = (250, 500, 750)
#: arrays every saved reconstruction holds
NPZ_KEYS: tuple[str, ...] = ("image", "recon", "anomaly", "brain_mask", "seg", "affine")


# --------------------------------------------------------------------------------------------------------------
# Variants


def variant_kwargs(variant: str) -> dict[str, Any]:
    """Test-time keyword arguments of a variant: ``"t500"`` -> ``{"t_test": 500}``, ``"ens"`` ->
    ``{"t_test": [250, 500, 750]}``, ``"default"`` -> ``{}`` (non-diffusion models)."""
    if variant == "default":
        return {}
    if variant == "ens":
        return {"t_test": list(ENSEMBLE_T_TEST)}
    if variant.startswith("t") and variant[1:].isdigit() and int(variant[1:]) > 0:
        return {"t_test": int(variant[1:])}
    raise ValueError(f"unknown variant {variant!r}: use 't<t_test>' (e.g. 't500'), 'ens' or 'default'")


def ensemble_part_variants(variant: str) -> dict[int, str]:
    """Single-``t`` variants an ensemble variant is the mean of: ``"ens"`` -> ``{250: "t250", 500: "t500",
    750: "t750"}``, ``"ens_contrast0.5"`` -> ``{250: "t250_contrast0.5", …}``; ``{}`` for any other variant."""
    if variant != "ens" and not variant.startswith("ens_"):
        return {}
    return {t: f"t{t}{variant[3:]}" for t in ENSEMBLE_T_TEST}


def part_dirs(profile: str, model_id: str, fold: int, variant: str, dataset: str) -> dict[int, Path]:
    """``{t: folder}`` of the saved single-``t`` parts of an ensemble variant (empty for other variants)."""
    return {t: paths.recon_dir(profile, model_id, fold, v, dataset) for t, v in ensemble_part_variants(variant).items()}


def variant_name(model: str, ens: bool = False, t_test: int = 500) -> str:
    """Variant of a Table 3 row: ``default`` for non-diffusion models, else ``ens`` or ``t<t_test>``."""
    if model not in ("ddpm", "pddpm", "cddpm"):
        return "default"
    return "ens" if ens else f"t{int(t_test)}"


def _accepts(fn, name: str) -> bool:
    """Whether callable ``fn`` names ``name`` as an explicit parameter."""
    return name in inspect.signature(fn).parameters


def subject_seed(seed: int, subject_id: str) -> int:
    """Deterministic per-volume seed from the run seed and the subject id (CRC32)."""
    return (int(seed) * 1_000_003 + zlib.crc32(str(subject_id).encode())) % 2**63


# --------------------------------------------------------------------------------------------------------------
# One volume


def _model_device(model: torch.nn.Module, device: torch.device | str | None) -> torch.device:
    if device is not None:
        return torch.device(device)
    p = next(iter(model.parameters()), None)
    return p.device if p is not None else torch.device("cpu")


@torch.no_grad()
def reconstruct_volume(model: UADModel, image: np.ndarray, brain_mask: np.ndarray, *,
                       device: torch.device | str | None = None, max_batch: int = 64, seed: int | None = None,
                       amp: str = "none", **recon_kwargs: Any) -> tuple[np.ndarray, np.ndarray]:
    """Reconstruct all axial slices of one volume.

    image, brain_mask: ``[X, Y, Z]`` (intensities in [0, 1]; mask in {0, 1}).
    ``recon_kwargs``: test-time arguments (``variant_kwargs``), e.g. ``t_test``; only models whose ``reconstruct``
    names them may receive them. Diffusion models get ``max_batch`` (their own batching, result unchanged) and a
    CPU generator seeded with ``seed``; other models see chunks of at most ``max_batch`` slices, or the whole
    volume when ``model.needs_whole_volume`` (SVAE, Thresh with equalisation).
    ``amp``: ``bf16`` runs the networks under bfloat16 autocast where the device supports it
    (:func:`cddpm_lib.runtime.effective_amp`; ``fp16`` on CUDA only; elsewhere float32 with a warning); the
    reconstruction then carries bfloat16's ~3 significant digits (measured in ``BENCHMARKS.md``).
    Returns ``(recon, anomaly)``, both float32 ``[X, Y, Z]``; ``anomaly = |x − x̂|`` unless the model overrides
    ``anomaly_map``. On a CPU it first calls :func:`cddpm_lib.runtime.keep_freed_memory`.
    """
    image = np.asarray(image, dtype=np.float32)
    brain_mask = np.asarray(brain_mask)
    if image.ndim != 3 or image.shape != brain_mask.shape:
        raise ValueError(f"reconstruct_volume: image {image.shape} and brain mask {brain_mask.shape} must be "
                         "equal-shaped [X, Y, Z] volumes")
    if max_batch < 1:
        raise ValueError(f"reconstruct_volume: max_batch must be >= 1, got {max_batch}")
    for name in recon_kwargs:
        if not _accepts(model.reconstruct, name):
            raise TypeError(f"reconstruct_volume: model {model.name!r} does not take {name!r} at test time; "
                            f"use variant 'default' for it")
    dev = _model_device(model, device)
    amp, note = effective_amp(amp, dev)
    if note:
        warnings.warn(f"reconstruct_volume: {note}", RuntimeWarning, stacklevel=2)
    if dev.type == "cpu":
        keep_freed_memory()  # every chunk frees and reallocates the same buffers
    x = torch.from_numpy(volume_to_slices(image))[:, None].to(dev)                    # [Z, 1, X, Y]
    m = torch.from_numpy(volume_to_slices((brain_mask > 0).astype(np.float32)))[:, None].to(dev)
    kwargs = dict(recon_kwargs)
    if _accepts(model.reconstruct, "max_batch"):
        kwargs["max_batch"] = int(max_batch)
    if seed is not None and _accepts(model.reconstruct, "generator"):
        kwargs["generator"] = torch.Generator().manual_seed(int(seed))
    chunk = x.shape[0] if (model.needs_whole_volume or "max_batch" in kwargs) else int(max_batch)
    own_map = type(model).anomaly_map is not UADModel.anomaly_map
    recons, anomalies = [], []
    for i in range(0, x.shape[0], chunk):
        xi, mi = x[i:i + chunk], m[i:i + chunk]
        with autocast(amp, dev):
            rec = model.reconstruct(xi, mi, **kwargs).float()
        if rec.shape != xi.shape:
            raise ValueError(f"reconstruct_volume: {model.name}.reconstruct returned {tuple(rec.shape)} for "
                             f"input {tuple(xi.shape)}")
        recons.append(rec.cpu())
        if own_map:
            with autocast(amp, dev):
                anomalies.append(model.anomaly_map(xi, mi, **kwargs).float().cpu())
        else:
            anomalies.append((xi - rec).abs().cpu())
    recon = slices_to_volume(torch.cat(recons).numpy()).astype(np.float32)
    anomaly = slices_to_volume(torch.cat(anomalies).numpy()).astype(np.float32)
    return recon, anomaly


# --------------------------------------------------------------------------------------------------------------
# A whole evaluation set


def is_valid_recon(path: str | Path) -> bool:
    """True when ``path`` is a readable npz with every key of :data:`NPZ_KEYS` and equal-shaped volumes."""
    path = Path(path)
    if not path.exists():
        return False
    try:
        arrays = load_npz(path)
    except VolumeError:
        return False
    if any(k not in arrays for k in NPZ_KEYS):
        return False
    shape = arrays["image"].shape
    return len(shape) == 3 and all(arrays[k].shape == shape for k in ("recon", "anomaly", "brain_mask", "seg"))


def load_recon(path: str | Path) -> dict[str, np.ndarray]:
    """Arrays of one saved reconstruction; a clear error when the file is not one."""
    if not is_valid_recon(path):
        raise VolumeError(f"{path}: not a valid reconstruction file (expected keys {list(NPZ_KEYS)} with "
                          "equal-shaped [X, Y, Z] volumes); delete it and rerun the segmentation stage")
    return load_npz(path)


def load_case(row: pd.Series, weighting: str) -> dict[str, np.ndarray]:
    """Image, brain mask, segmentation (zeros if none) and affine of one manifest row."""
    for col in (weighting, "brain_mask"):
        if not str(row.get(col, "")):
            raise ValueError(f"manifest row {row.get('dataset')}/{row.get('subject_id')}: no {col!r} file")
    image, affine = load_nifti(row[weighting])
    mask, _ = load_nifti(row["brain_mask"], dtype=np.uint8)
    seg_path = str(row.get("seg", "") or "")
    seg = load_nifti(seg_path, dtype=np.float32)[0] if seg_path else np.zeros(image.shape, np.float32)
    if not image.shape == mask.shape == seg.shape:
        raise VolumeError(f"{row[weighting]}: image {image.shape}, mask {mask.shape} and segmentation "
                          f"{seg.shape} differ in shape")
    return {"image": image.astype(np.float32), "brain_mask": (mask > 0).astype(np.uint8),
            "seg": (seg > 0).astype(np.uint8), "affine": affine}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def recon_key(model: UADModel, seed: int, recon_kwargs: dict[str, Any], amp: str = "none") -> str:
    """Fingerprint of what a reconstruction depends on besides its input: the model's weights
    (:func:`cddpm_lib.fingerprint.module_fingerprint`) and hyper-parameters, the noise seed, the test-time
    settings and the mixed precision that ran (``amp``, recorded only when not float32, so that float32 keys
    stay those of earlier versions)."""
    record = {"model": module_fingerprint(model), "hparams": dict(getattr(model, "hparams", {})),
              "seed": int(seed), "kwargs": recon_kwargs}
    if amp != "none":
        record["amp"] = amp
    return record_fingerprint(record)


def _saved(path: Path, image: np.ndarray, key: str) -> dict[str, np.ndarray] | None:
    """The arrays of ``path`` when it is a valid reconstruction of this very ``image`` made with ``key``
    (:func:`recon_key`: same weights, seed and settings), else ``None``."""
    if not is_valid_recon(path):
        return None
    z = load_npz(path)
    if "key" not in z or str(z["key"]) != key:
        return None
    same = z["image"].shape == image.shape and np.allclose(z["image"], image, atol=1e-6)
    return z if same else None


def reconstruct_cached(model: UADModel, vol: dict[str, np.ndarray], path: str | Path, *,
                       device: torch.device | str | None = None, max_batch: int = 64, seed: int = 0,
                       overwrite: bool = False, parts: dict[int, Path] | None = None, amp: str = "none",
                       **recon_kwargs: Any) -> tuple[np.ndarray, np.ndarray, float, bool]:
    """Reconstruction of one volume ``vol`` (``image, brain_mask, seg, affine``), saved to / reused from ``path``.

    A valid file of the same input image made by the same weights, seed and settings (:func:`recon_key`, stored
    in the file as ``key``) is reused unless ``overwrite``; a retrained model or another seed recomputes it.
    ``parts`` (``{t: folder}``, see
    :func:`part_dirs`): for an ensemble ``t_test`` list, each single-``t`` part is reused from or saved to
    ``folder/<file name>`` and the ensemble is their mean — equal to one ensemble call with the same ``seed``.
    ``seed``: the volume's noise seed (:func:`subject_seed`). ``amp``: as :func:`reconstruct_volume`; the
    precision that runs on the device is part of the key.
    Returns ``(recon, anomaly, seconds, reused)``; ``seconds``: the model's wall time for the volume (CUDA
    synchronised; for an ensemble the sum of its parts'; read back from the file when reused).
    """
    path = Path(path)
    amp, note = effective_amp(amp, _model_device(model, device))
    if note:
        warnings.warn(f"reconstruct_cached: {note}", RuntimeWarning, stacklevel=2)
    key = recon_key(model, seed, recon_kwargs, amp)
    if not overwrite and (z := _saved(path, vol["image"], key)) is not None:
        return z["recon"], z["anomaly"], float(z.get("seconds", np.array(np.nan))), True
    ts = recon_kwargs.get("t_test")
    own_map = type(model).anomaly_map is not UADModel.anomaly_map
    if parts and isinstance(ts, (list, tuple)) and sorted(parts) == sorted(int(t) for t in ts) and not own_map:
        recons, seconds = [], 0.0
        for t in ts:
            r, _, sec, _ = reconstruct_cached(model, vol, Path(parts[int(t)]) / path.name, device=device,
                                              max_batch=max_batch, seed=seed, overwrite=overwrite, amp=amp,
                                              **{**recon_kwargs, "t_test": int(t)})
            recons.append(r)
            seconds += sec
        recon = np.mean(recons, axis=0).astype(np.float32)
        anomaly = np.abs(vol["image"] - recon).astype(np.float32)
    else:
        dev = _model_device(model, device)
        _sync(dev)
        t0 = time.perf_counter()
        recon, anomaly = reconstruct_volume(model, vol["image"], vol["brain_mask"], device=dev, max_batch=max_batch,
                                            seed=seed, amp=amp, **recon_kwargs)
        _sync(dev)
        seconds = time.perf_counter() - t0
    save_npz(path, image=vol["image"], recon=recon, anomaly=anomaly, brain_mask=vol["brain_mask"],
             seg=vol["seg"], affine=vol["affine"], seconds=np.array(seconds), key=np.array(key))
    return recon, anomaly, seconds, False


def reconstruct_dataset(model: UADModel, rows: pd.DataFrame, weighting: str, out_dir: str | Path, *,
                        device: torch.device | str | None = None, max_batch: int = 64, overwrite: bool = False,
                        seed: int = 0, parts: dict[int, Path] | None = None, log=None, amp: str = "none",
                        **recon_kwargs: Any) -> pd.DataFrame:
    """Reconstruct every volume of ``rows`` (manifest rows, absolute paths) into ``out_dir/<subject_id>.npz``
    (:func:`reconstruct_cached`; ``parts``: folders of an ensemble's single-``t`` parts).

    Returns one row per volume: ``subject_id, dataset, npz, seconds, reused`` where ``seconds`` is the model's
    wall time for that volume (CUDA synchronised; read back from the file when it is ``reused``).
    """
    if weighting not in rows.columns:
        raise ValueError(f"reconstruct_dataset: the manifest rows have no {weighting!r} column")
    out_dir = Path(out_dir)
    dev = _model_device(model, device)
    amp, note = effective_amp(amp, dev)  # said once here, not once per volume
    if note:
        warnings.warn(f"reconstruct_dataset: {note}", RuntimeWarning, stacklevel=2)
        if log is not None:
            log(f"[reconstruct] warning: {note}")
    model.to(dev).eval()
    records = []
    for _, row in rows.iterrows():
        sid = str(row["subject_id"])
        path = out_dir / f"{sid}.npz"
        _, _, seconds, reused = reconstruct_cached(model, load_case(row, weighting), path, device=dev,
                                                   max_batch=max_batch, seed=subject_seed(seed, sid),
                                                   overwrite=overwrite, parts=parts, amp=amp, **recon_kwargs)
        records.append({"subject_id": sid, "dataset": row["dataset"], "npz": str(path), "seconds": seconds,
                        "reused": reused})
        if log is not None and not reused:
            log(f"[reconstruct] {row['dataset']}/{sid}: {seconds:.2f}s -> {path}")
    return pd.DataFrame(records, columns=["subject_id", "dataset", "npz", "seconds", "reused"])


def time_volumes(model: UADModel, images: Sequence[np.ndarray], masks: Sequence[np.ndarray], *,
                 device: torch.device | str | None = None, max_batch: int = 64, warmup: int = 1,
                 amp: str = "none", **recon_kwargs: Any) -> list[float]:
    """Wall seconds of :func:`reconstruct_volume` per volume after ``warmup`` untimed runs (inference time, §5.4)."""
    dev = _model_device(model, device)
    model.to(dev).eval()
    for i in range(min(warmup, len(images))):
        reconstruct_volume(model, images[i], masks[i], device=dev, max_batch=max_batch, seed=i, amp=amp, **recon_kwargs)
    out = []
    for i, (img, msk) in enumerate(zip(images, masks)):
        _sync(dev)
        t0 = time.perf_counter()
        reconstruct_volume(model, img, msk, device=dev, max_batch=max_batch, seed=i, amp=amp, **recon_kwargs)
        _sync(dev)
        out.append(time.perf_counter() - t0)
    return out
