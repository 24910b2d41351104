"""Tiny unhealthy evaluation sets and checkpoints of tiny real models, for the segmentation/ablation tests."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import torch

from cddpm_lib import data, paths
from cddpm_lib.datasets import WEIGHTING_OF, model_id
from cddpm_lib.models import build_model
from cddpm_lib.volumes import save_dataframe, save_nifti, save_torch

SHAPE = (16, 16, 8)
TINY: dict[str, dict] = {
    "ae": {"channels": (4, 8), "latent_dim": 8},
    "dae": {"model_channels": 4, "channel_mult": (1, 2)},
    "ddpm": {"model_channels": 8, "channel_mult": (1, 2), "num_res_blocks": 1, "mid_attention": False},
    "pddpm": {"model_channels": 8, "channel_mult": (1, 2), "num_res_blocks": 1, "mid_attention": False},
    "cddpm": {"model_channels": 8, "channel_mult": (1, 2), "num_res_blocks": 1, "mid_attention": False,
              "encoder_depth": 18, "encoder_width": 4, "cond_dim": 8},
}


def lesion_volume(rng: np.random.Generator, weighting: str, shape=SHAPE) -> tuple[np.ndarray, ...]:
    """Phantom head with one spherical lesion (hyperintense on T2, hypointense on T1) -> image, mask, seg."""
    image, mask = data.phantom_volume(shape, rng, weighting)
    grid = np.stack(np.meshgrid(*[np.arange(s) for s in shape], indexing="ij"))
    centre = np.array(shape) / 2 + rng.uniform(-2, 2, 3)
    seg = (((grid - centre[:, None, None, None]) / np.array([3, 3, 2])[:, None, None, None]) ** 2).sum(0) <= 1
    seg &= mask > 0
    image = image.copy()
    image[seg] = 1.0 if weighting == "t2" else 0.05
    return image, mask, seg.astype(np.uint8)


def write_eval_cohort(root: Path, datasets=("BraTS21", "MSLUB", "ATLAS", "WMH"), n_val: int = 2, n_test: int = 3,
                      seed: int = 0, shape=SHAPE) -> Path:
    """Unhealthy val/test volumes + ``preprocessed_manifest.csv`` under ``root`` (the manifest schema)."""
    rng = np.random.default_rng(seed)
    rows = []
    for ds in datasets:
        w = WEIGHTING_OF[ds]
        for split, n in (("val", n_val), ("test", n_test)):
            for i in range(n):
                sid = f"{ds}_{split}{i}"
                image, mask, seg = lesion_volume(rng, w, shape)
                d = root / "preprocessed" / ds / sid
                affine = np.diag([2.0, 2.0, 2.0, 1.0])
                files = {w: save_nifti(image, affine, d / f"{w}.nii.gz"),
                         "brain_mask": save_nifti(mask, affine, d / "brain_mask.nii.gz", dtype=np.uint8),
                         "seg": save_nifti(seg, affine, d / "seg.nii.gz", dtype=np.uint8)}
                rows.append({"dataset": ds, "subject_id": sid, "split": split, "fold": -1,
                             "t1": str(files.get("t1", "")), "t2": str(files.get("t2", "")),
                             "brain_mask": str(files["brain_mask"]), "seg": str(files["seg"]), "site": "phantom",
                             "skull_stripped": 1, "healthy": 0})
    return save_dataframe(pd.DataFrame(rows), root / "preprocessed_manifest.csv")


def write_checkpoint(profile: str, model: str, weighting: str, fold: int, ssl: bool = False, seed: int = 0) -> Path:
    """``best.pt`` of an untrained tiny real model where the training stage would write it."""
    torch.manual_seed(seed + fold)
    m = build_model(model, image_size=SHAPE[:2], **TINY[model])
    path = paths.checkpoint_dir(profile, model_id(model, weighting, ssl), fold) / "best.pt"
    return save_torch({"model_name": model, "hparams": dict(m.hparams), "model": m.state_dict()}, path)
