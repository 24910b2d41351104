"""Stage ``training`` (notebook 03): one model of the paper's tables on the healthy IXI slices of one fold.

Paper §4.4: Adam, lr 1e-5 (the authors' code: 1e-4), batch 32, up to 1600 epochs, augmentation (torchio blur,
bias field, gamma, ghosting), and the checkpoint with the best loss on the healthy validation set. The loop,
checkpoints, resumption, mixed precision and multi-GPU data parallel live in :mod:`cddpm_lib.engine`; this module
selects the data (:mod:`cddpm_lib.data`), builds the model by name (``models.build_model``) with the run's
hyper-parameters, loads the SparK-pretrained encoder into the cDDPM when ``ssl=True`` (paper §3.3), and writes
to ``paths.checkpoint_dir(profile, datasets.model_id(model, weighting, ssl), fold)``.

Command line, also the entry point for several GPUs (see :mod:`cddpm_lib.engine`)::

    python -m cddpm_lib.train profile=quick model=ae weighting=t1 fold=1
    torchrun --standalone --nproc_per_node=4 -m cddpm_lib.train profile=paper model=cddpm ssl=true
"""
from __future__ import annotations

import dataclasses
import sys
from pathlib import Path
from typing import ClassVar

import numpy as np
import pandas as pd
import torch
import torch.distributed as dist

from . import data, paths
from .config import ConfigError, profile_params
from .datasets import model_id
from .engine import FitResult, LoopConfig, fit, init_distributed
from .fingerprint import record_fingerprint, tensors_fingerprint
from .models import MODEL_NAMES, UADModel, build_model
from .runtime import seed_everything

__all__ = ["TrainConfig", "train", "build_run_model", "load_fold", "load_pretrained_encoder", "ssl_encoder_path",
           "run_dir_of", "plot_history", "plot_reconstructions", "example_slices", "fit", "FitResult", "main"]


@dataclasses.dataclass(frozen=True)
class TrainConfig(LoopConfig):
    """Stage ``training`` (notebook 03): one model, weighting and fold; defaults are the paper's (§4.4).

    ``model_hparams``: ``{model name: {builder kwarg: value}}`` for several models at once; the run uses the
    entry of ``model`` (on top of the builder's defaults). ``ssl``: initialise the cDDPM encoder with the
    SparK-pretrained one (notebook 02).
    """

    STAGE: ClassVar[str] = "training"  # profiles/<STAGE>.yaml resolves None parameters

    model: str = "cddpm"  # ddpm | cddpm | pddpm | ae | vae | svae | dae | fanogan (models.MODEL_NAMES)
    ssl: bool = False  # cDDPM only: encoder initialised by SparK (stage ssl), paper §3.3
    model_hparams: dict = dataclasses.field(default_factory=dict)  # {model: {builder argument: value}}

    def validate(self) -> None:
        super().validate()
        if self.model not in MODEL_NAMES:
            raise ConfigError(f"parameter 'model': unknown model {self.model!r}; known: {', '.join(MODEL_NAMES)}")
        unknown = sorted(set(self.model_hparams) - set(MODEL_NAMES))
        bad = sorted(k for k, v in self.model_hparams.items() if not isinstance(v, dict))
        if unknown or bad:
            raise ConfigError(f"parameter 'model_hparams': keys must be model names ({unknown} unknown) mapping "
                              f"to dicts of builder arguments ({bad} are not dicts)")
        if self.ssl and self.model != "cddpm":
            raise ConfigError(f"parameter 'ssl': SparK pre-training applies to the cDDPM encoder only, "
                              f"not to model {self.model!r}")


# --------------------------------------------------------------------------------------------------------------
# The training stage: data of one fold, the model, the SparK encoder


def ssl_encoder_path(profile: str, weighting: str, fold: int) -> Path:
    """Where stage ``ssl`` (notebook 02) leaves the SparK-pretrained encoder of ``weighting``/``fold``."""
    return paths.checkpoint_dir(profile, f"spark_{weighting}", fold) / "encoder.pt"


def load_pretrained_encoder(model: UADModel, path: str | Path) -> None:
    """Copy the encoder weights saved by SparK into the (single) ``ResNetEncoder`` inside ``model``."""
    from .encoder import ResNetEncoder, load_encoder_weights

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no SparK encoder; run stage 'ssl' (notebook 02) for this weighting "
                                "and fold first, or set ssl=False")
    encoders = [m for m in model.modules() if isinstance(m, ResNetEncoder)]
    if len(encoders) != 1:
        raise ValueError(f"model {model.name!r} holds {len(encoders)} ResNetEncoder modules; expected exactly one")
    load_encoder_weights(encoders[0], path)


def encoder_fingerprint(path: str | Path) -> str:
    """Fingerprint of the weights in a SparK encoder file (names and tensors; not the file's other bytes)."""
    state = torch.load(Path(path), map_location="cpu", weights_only=True)["encoder"]
    return record_fingerprint([[k, tensors_fingerprint([v])] for k, v in state.items()])


def load_fold(cfg: LoopConfig) -> tuple[data.SliceCohort, data.SliceCohort]:
    """The healthy IXI ``train`` and ``val`` volumes of ``cfg.fold`` in weighting ``cfg.weighting``."""
    manifest = paths.preprocessed_manifest_path(cfg.source, cfg.profile)
    df = data.read_manifest(manifest)
    return tuple(data.SliceCohort.from_manifest(df, split=s, fold=cfg.fold, weighting=cfg.weighting)
                 for s in ("train", "val"))  # type: ignore[return-value]


def build_run_model(cfg: TrainConfig, image_size: tuple[int, int]) -> UADModel:
    """``build_model(cfg.model, image_size, **cfg.model_hparams[cfg.model])``, plus the SparK encoder if ``ssl``."""
    seed_everything(cfg.seed)
    model = build_model(cfg.model, image_size=tuple(image_size), **cfg.model_hparams.get(cfg.model, {}))
    if not model.trainable:
        raise ConfigError(f"model {cfg.model!r} is not trained (trainable=False): it needs no training stage")
    if cfg.ssl:
        load_pretrained_encoder(model, ssl_encoder_path(cfg.profile, cfg.weighting, cfg.fold))
    return model


def run_dir_of(cfg: TrainConfig) -> Path:
    return paths.checkpoint_dir(cfg.profile, model_id(cfg.model, cfg.weighting, cfg.ssl), cfg.fold)


def train(cfg: TrainConfig, log=print) -> FitResult:
    """Stage ``training``: train ``cfg.model`` on IXI ``cfg.weighting`` fold ``cfg.fold`` (resumes if possible)."""
    train_set, val_set = load_fold(cfg)
    model = build_run_model(cfg, train_set.image_size)
    info = {"model_id": model_id(cfg.model, cfg.weighting, cfg.ssl), "hparams": dict(model.hparams),
            "image_size": list(train_set.image_size), "slab_length": int(model.slab_length),
            "train_subjects": train_set.subject_ids, "val_subjects": val_set.subject_ids,
            "sampling": "axial slices uniformly with replacement" + (", empty slices skipped" if cfg.skip_empty
                                                                      else ", empty slices included"),
            "augmentation": data.AUGMENT_P if cfg.augment else {},
            "ssl_encoder": str(ssl_encoder_path(cfg.profile, cfg.weighting, cfg.fold)) if cfg.ssl else None,
            "manifest": str(paths.preprocessed_manifest_path(cfg.source, cfg.profile))}
    own = cfg.replace(model_hparams={cfg.model: cfg.model_hparams.get(cfg.model, {})})  # others' do not matter
    inputs = {"ssl_encoder": encoder_fingerprint(ssl_encoder_path(cfg.profile, cfg.weighting, cfg.fold))} \
        if cfg.ssl else {}
    return fit(model, own, run_dir_of(cfg), train_set, val_set, info=info, inputs=inputs, log=log)


# --------------------------------------------------------------------------------------------------------------
# Figures


def plot_history(history: pd.DataFrame, title: str = ""):
    """Training loss(es) per logged step and validation loss, best step marked (log scale)."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    for col in [c for c in history.columns if c.startswith("train_")]:
        ax.plot(history["step"], history[col], lw=1, label=col.replace("_", " "))
    val = history[np.isfinite(history["val_loss"])]
    if len(val):
        ax.plot(val["step"], val["val_loss"], "o-", ms=3, label="val loss")
        best = val.loc[val["val_loss"].idxmin()]
        ax.axvline(best["step"], color="grey", ls=":", lw=1, label=f"best (step {int(best['step'])})")
    losses = history.filter(like="loss").to_numpy()
    if (losses[np.isfinite(losses)] > 0).all():
        ax.set_yscale("log")
    ax.set(xlabel="step", ylabel="loss", title=title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def example_slices(cohort: data.SliceCohort, n: int = 4) -> list[tuple[int, int]]:
    """``n`` (volume, slice) pairs: the middle brain slice of volumes taken in turn, shifted for repeats."""
    out = []
    for i in range(n):
        v = i % len(cohort)
        zs = torch.nonzero(cohort.masks[v].flatten(1).any(1)).flatten()
        zs = zs if len(zs) else torch.arange(cohort.masks[v].shape[0])
        shift = (i // len(cohort)) * max(1, len(zs) // 6)
        out.append((v, int(zs[min(len(zs) - 1, len(zs) // 2 + shift)])))
    return out


@torch.no_grad()
def plot_reconstructions(model: UADModel, cohort: data.SliceCohort, n: int = 4, **reconstruct_kw):
    """Input, reconstruction ``model.reconstruct`` and residual ``|x − x̂|`` of ``n`` validation slices."""
    import matplotlib.pyplot as plt

    device = next(model.parameters()).device
    model.eval()
    cols = []
    for v, z in example_slices(cohort, n):
        if model.needs_whole_volume:  # SVAE: the whole volume in order, then pick the slice
            x, m = cohort.slab(v, 0, cohort.images[v].shape[0])
            rec = model.reconstruct(x.to(device), m.to(device), **reconstruct_kw)[z:z + 1].cpu()
            x = x[z:z + 1]
        else:
            x, m = cohort.slab(v, z)
            rec = model.reconstruct(x.to(device), m.to(device), **reconstruct_kw).cpu()
        cols.append((x[0, 0], rec[0, 0], (x - rec).abs()[0, 0]))
    fig, axes = plt.subplots(3, n, figsize=(2 * n, 6), squeeze=False)
    for j, images in enumerate(cols):
        for i, (img, label) in enumerate(zip(images, ("input", "reconstruction", "|x - x̂|"))):
            axes[i, j].imshow(img.numpy().T, cmap="gray" if i < 2 else "inferno", vmin=0, vmax=1 if i < 2 else 0.5,
                              origin="lower")
            axes[i, j].set_axis_off()
            if j == 0:
                axes[i, j].set_title(label, fontsize=8, loc="left")
    fig.tight_layout()
    return fig


# --------------------------------------------------------------------------------------------------------------
# Command line (also the torchrun entry point)


def main(argv: list[str] | None = None) -> int:
    """``python -m cddpm_lib.train KEY=VALUE …``: the profile's parameters (``profiles/training.yaml``) updated
    with the given ones (values parsed as YAML), e.g. ``profile=quick model=ae weighting=t1 fold=1``."""
    import yaml

    pairs = dict(a.split("=", 1) for a in (argv if argv is not None else sys.argv[1:]))
    params = {k: yaml.safe_load(v) for k, v in pairs.items()}
    profile = params.get("profile", "quick")
    fields = set(TrainConfig.field_names())  # the profile also holds notebook-only display parameters
    defaults = {k: v for k, v in profile_params("training", profile).items() if k in fields}
    params = {**defaults, **params, "profile": profile}
    ctx = init_distributed()
    try:
        result = train(TrainConfig.from_params(params), log=print if ctx.rank == 0 else (lambda *_: None))
        if ctx.rank == 0:
            print(f"{result.run_dir}: best validation loss {result.best_val:.5g} at step {result.best_step}")
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
