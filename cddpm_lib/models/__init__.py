"""Model zoo: a registry of every model of the paper's tables behind one interface (:class:`UADModel`).

``build_model(name, **hparams)`` builds a model; ``load_model(path)`` rebuilds one from a checkpoint
written by :mod:`cddpm_lib.train`. Builders are imported lazily so that importing the registry is cheap.
"""
from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

import torch

from .base import UADModel

#: name -> "module:builder" (builder(**hparams) -> UADModel)
REGISTRY: dict[str, str] = {
    "ddpm": "cddpm_lib.models.ddpm:build_ddpm",
    "cddpm": "cddpm_lib.models.ddpm:build_cddpm",
    "pddpm": "cddpm_lib.models.pddpm:build_pddpm",
    "ae": "cddpm_lib.models.ae:build_ae",
    "vae": "cddpm_lib.models.vae:build_vae",
    "svae": "cddpm_lib.models.svae:build_svae",
    "dae": "cddpm_lib.models.dae:build_dae",
    "fanogan": "cddpm_lib.models.fanogan:build_fanogan",
    "thresh": "cddpm_lib.models.thresh:build_thresh",
}

MODEL_NAMES: tuple[str, ...] = tuple(REGISTRY)

#: hyper-parameters added after checkpoints were first written, with the value those earlier checkpoints were
#: trained under: :func:`load_model` rebuilds a checkpoint without the key as it was trained, not with today's
#: default (diffusion models once ran in the images' own [0, 1] range)
LEGACY_HPARAMS: dict[str, dict[str, Any]] = {name: {"signal_range": (0.0, 1.0)} for name in ("ddpm", "cddpm", "pddpm")}


def _builder(name: str):
    if name not in REGISTRY:
        raise ValueError(f"unknown model {name!r}; known models: {', '.join(MODEL_NAMES)}")
    module, attr = REGISTRY[name].split(":")
    return getattr(importlib.import_module(module), attr)


def build_model(name: str, **hparams: Any) -> UADModel:
    """Build model ``name`` (one of :data:`MODEL_NAMES`) with its hyper-parameters."""
    model = _builder(name)(**hparams)
    if not isinstance(model, UADModel):
        raise TypeError(f"builder of {name!r} returned {type(model).__name__}, not a UADModel")
    return model


def load_model(path: str | Path, map_location: str | torch.device = "cpu") -> UADModel:
    """Rebuild a model from a checkpoint (``{"model_name", "hparams", "model"}``), weights only."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {path} does not exist; train the model first (notebook 03)")
    ckpt = torch.load(path, map_location=map_location, weights_only=True)
    for key in ("model_name", "hparams", "model"):
        if key not in ckpt:
            raise ValueError(f"{path}: not a cddpm-uad checkpoint (missing {key!r})")
    model = build_model(ckpt["model_name"], **{**LEGACY_HPARAMS.get(ckpt["model_name"], {}), **ckpt["hparams"]})
    model.load_state_dict(ckpt["model"])
    model.eval()
    return model


__all__ = ["UADModel", "REGISTRY", "MODEL_NAMES", "LEGACY_HPARAMS", "build_model", "load_model"]
