"""NIfTI and artefact I/O with checks and atomic writes.

Every file the kit writes goes to a temporary sibling first and is renamed into place, so an interrupted
run never leaves a half-written file that a later stage would trust.
"""
from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Iterator

import nibabel as nib
import numpy as np


class VolumeError(ValueError):
    """A volume file is missing, unreadable or not what the kit expects; the message names the file."""


def _read_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_UMASK = _read_umask()  # read once at import: os.umask is process-wide and not thread-safe to probe


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, suffix: str | None = None) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success rename it onto ``path`` (atomic on POSIX).

    ``suffix`` keeps an extension that writers key on (``.nii.gz``, ``.npz``); default: the target's suffixes.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    suffix = suffix if suffix is not None else "".join(path.suffixes)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp" + suffix, dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        if tmp_path.exists():  # mkstemp creates 0600; give the file the usual permissions (umask applied)
            os.chmod(tmp_path, 0o666 & ~_UMASK)
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def load_nifti(path: str | os.PathLike, *, dtype=np.float32) -> tuple[np.ndarray, np.ndarray]:
    """Load a 3D NIfTI as ``(array [X, Y, Z], affine [4, 4])``; clear :class:`VolumeError` otherwise."""
    path = Path(path)
    if not path.exists():
        raise VolumeError(f"{path}: file does not exist")
    try:
        img = nib.load(str(path))
        data = np.asarray(img.dataobj, dtype=dtype)
    except Exception as exc:  # nibabel raises many types for corrupt files
        raise VolumeError(f"{path}: cannot be read as NIfTI ({type(exc).__name__}: {exc})") from exc
    data = squeeze_to_3d(data)
    if data.ndim != 3:
        raise VolumeError(f"{path}: expected a 3D volume, got shape {data.shape}")
    return data, np.asarray(img.affine, dtype=np.float64)


def squeeze_to_3d(data: np.ndarray) -> np.ndarray:
    """Drop trailing singleton axes beyond the third (NIfTI's time and vector dimensions of a 3D image)."""
    while data.ndim > 3 and data.shape[-1] == 1:
        data = data[..., 0]
    return data


def save_nifti(array: np.ndarray, affine: np.ndarray, path: str | os.PathLike, *, dtype=None) -> Path:
    """Write ``array`` ([X, Y, Z]) with ``affine`` to ``path`` atomically. Labels: pass ``dtype=np.uint8``."""
    path = Path(path)
    arr = np.asarray(array)
    if dtype is not None:
        arr = arr.astype(dtype)
    if arr.ndim != 3:
        raise VolumeError(f"{path}: refusing to write a {arr.ndim}D array as a 3D volume (shape {arr.shape})")
    if not np.all(np.isfinite(arr)):
        raise VolumeError(f"{path}: refusing to write non-finite values")
    img = nib.Nifti1Image(arr, np.asarray(affine, dtype=np.float64))
    img.header.set_xyzt_units("mm")
    with atomic_path(path) as tmp:
        nib.save(img, str(tmp))
    return path


def save_npz(path: str | os.PathLike, **arrays: np.ndarray) -> Path:
    """Compressed ``.npz`` written atomically."""
    path = Path(path)
    with atomic_path(path, suffix=".npz") as tmp:
        np.savez_compressed(tmp, **arrays)
    return path


def load_npz(path: str | os.PathLike) -> dict[str, np.ndarray]:
    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    except Exception as exc:
        raise VolumeError(f"{path}: cannot be read as .npz ({type(exc).__name__}: {exc})") from exc


def _json_safe(obj: Any) -> Any:
    """``obj`` with every non-finite float (NaN, ±inf; Python or NumPy) replaced by ``None``, recursively through
    dicts, lists and tuples."""
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    if isinstance(obj, (float, np.floating)) and not np.isfinite(obj):
        return None
    return obj


def save_json(obj: Any, path: str | os.PathLike) -> Path:
    """``obj`` as strict JSON, written atomically: a missing value (NaN, e.g. a QC Dice without a reference mask)
    becomes ``null``, since the bare ``NaN`` Python writes by default is rejected by other JSON parsers; other
    types JSON lacks (paths, NumPy scalars) are written as their ``str``."""
    path = Path(path)
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(_json_safe(obj), indent=2, sort_keys=True, default=str, allow_nan=False))
    return path


def save_text(text: str, path: str | os.PathLike) -> Path:
    path = Path(path)
    with atomic_path(path) as tmp:
        tmp.write_text(text)
    return path


def save_dataframe(df, path: str | os.PathLike) -> Path:
    """Write a pandas DataFrame as CSV atomically (``index=False``)."""
    path = Path(path)
    with atomic_path(path) as tmp:
        df.to_csv(tmp, index=False)
    return path


def save_torch(obj: Any, path: str | os.PathLike) -> Path:
    """``torch.save`` atomically (checkpoints)."""
    import torch

    path = Path(path)
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)
    return path


def save_figure(fig, stem: str | os.PathLike, formats: tuple[str, ...] = ("png", "pdf"), dpi: int = 150) -> list[Path]:
    """Save a matplotlib figure as ``<stem>.png`` and ``<stem>.pdf`` atomically; returns the paths."""
    stem = Path(stem)
    out = []
    for fmt in formats:
        target = stem.with_suffix(f".{fmt}")
        with atomic_path(target, suffix=f".{fmt}") as tmp:
            fig.savefig(tmp, format=fmt, dpi=dpi, bbox_inches="tight")
        out.append(target)
    return out


def volume_to_slices(volume: np.ndarray) -> np.ndarray:
    """``[X, Y, Z]`` volume -> ``[Z, X, Y]`` stack of axial slices (the kit's 2D convention)."""
    return np.ascontiguousarray(np.moveaxis(np.asarray(volume), -1, 0))


def slices_to_volume(slices: np.ndarray) -> np.ndarray:
    """Inverse of :func:`volume_to_slices`: ``[Z, X, Y]`` (or ``[Z, 1, X, Y]``) -> ``[X, Y, Z]``."""
    arr = np.asarray(slices)
    if arr.ndim == 4:
        arr = arr[:, 0]
    return np.ascontiguousarray(np.moveaxis(arr, 0, -1))
