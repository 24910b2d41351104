"""The optimisation loop shared by every model of the kit (paper §4.4) and by SparK pre-training (§3.3).

:func:`fit` trains any :class:`~cddpm_lib.models.base.UADModel` (``configure_optimizers``, ``training_step``,
``validation_loss``) on a :class:`~cddpm_lib.data.SliceCohort`, validates on the healthy validation fold every
``val_every`` steps and keeps the weights of the lowest validation loss as ``best.pt`` (paper §4.4). Run folder:
``best.pt``, ``last.pt``, ``config.json``, ``history.csv`` (and ``tb/`` when TensorBoard is installed).
Checkpoints hold ``{"model_name", "hparams", "model", "optimizers", "scaler", "rng", "step", "best_val",
"config"}``, tensors and plain types only (``torch.load(weights_only=True)``; ``models.load_model`` reads the
first three). A rerun with the same settings and inputs resumes from ``last.pt`` (a finished run returns at once;
other settings than :data:`RUNTIME_FIELDS`, another model (any hyper-parameter, defaults included), other
training or validation data, or other ``inputs`` such as a re-run SparK encoder start a new run) and ends with
the same weights as an uninterrupted run (bitwise on CPU): the batches of step ``s`` depend on ``(seed, s)`` only
(:class:`~cddpm_lib.data.StepSampler`) and at every checkpoint all RNGs are reseeded from ``(seed, step, rank)``.
Validation runs on a private RNG with a fixed seed (the same diffusion time steps and noise every time, so losses
of different steps compare).

On a CPU, ``fit`` first lets glibc keep freed memory in the process (:func:`cddpm_lib.runtime.keep_freed_memory`).
Mixed precision: ``amp="bf16"`` on CUDA and on CPUs that run bfloat16 (:func:`cddpm_lib.runtime.effective_amp`;
float32 on other CPUs), ``"fp16"`` with loss scaling on CUDA only. Channels-last applies on CUDA only. Data
parallel on the GPUs of one machine::

    torchrun --standalone --nproc_per_node=4 -m cddpm_lib.train profile=paper model=cddpm weighting=t2 fold=0

Each process trains on ``batch_size`` slices of a global batch of ``world · batch_size``. Gradients are averaged
by an all-reduce as soon as each parameter's gradient is accumulated (what DistributedDataParallel does; hooks
here, because ``training_step`` owns backward and the optimiser step and f-AnoGAN runs two of them); buffers
(batch-norm statistics) are broadcast from rank 0 before every step; validation is sharded and summed; rank 0
writes the files. Backend NCCL on GPUs, gloo on CPU.
"""
from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import json
import math
import os
import random
import sys
import time
from pathlib import Path
from typing import Any, Iterator, Literal

import numpy as np
import pandas as pd
import torch
import torch.distributed as dist
from tqdm import tqdm

from . import data, paths
from .config import ConfigError, StageConfig
from .models import UADModel
from .runtime import autocast, default_device, keep_freed_memory, seed_everything, stage_amp
from .volumes import save_dataframe, save_json, save_torch

#: config fields that may change between a run and its resumption (they do not change the weights' trajectory)
RUNTIME_FIELDS = frozenset({"max_steps", "val_every", "log_every", "device", "amp", "channels_last", "num_workers",
                            "tensorboard", "progress"})
_VAL_STREAM, _RNG_STREAM = 0x7A1, 0x5EED


@dataclasses.dataclass(frozen=True)
class LoopConfig(StageConfig):
    """Settings of the optimisation loop shared by training (``TrainConfig``) and SparK (``SSLConfig``)."""

    weighting: Literal["t2", "t1"] = "t2"  # IXI weighting trained on (T2 -> BraTS21/MSLUB, T1 -> ATLAS/WMH)
    fold: int = 0  # cross-validation fold of the IXI train/val split
    profile: str = "quick"  # smoke | quick | paper: data size and run folder
    source: Literal["synthetic", "real"] = "synthetic"  # which preprocessed cohort
    lr: float = 1e-5  # Adam learning rate, paper §4.4 (authors' code: 1e-4)
    batch_size: int = 32  # slices per step and process, paper §4.4
    max_steps: int = 17900  # 1600 epochs of 358 slices at batch 32 (an epoch = one slice per volume)
    val_every: int = 500  # steps between validations / checkpoints
    val_windows: int = 0  # validation slices (slab windows), evenly spaced over the val set; 0 = all of them
    log_every: int = 10  # steps between rows of history.csv
    augment: bool = True  # torchio blur/bias/gamma/ghosting, paper §4.4
    skip_empty: bool = False  # sample only slices that contain brain (paper: all slices)
    grad_clip: float | None = None  # max gradient norm (None: no clipping, as the paper)
    seed: int = 0  # seeds model initialisation, sampling, augmentation and noise
    device: str = "auto"  # auto | cpu | cuda | cuda:1 ...
    amp: Literal["none", "bf16", "fp16"] = "none"  # mixed precision: bf16 on CUDA or a bf16 CPU, fp16 on CUDA
    channels_last: bool = True  # channels-last memory format on CUDA
    num_workers: int = 0  # data loader processes (augmentation); 0 = in the training process
    tensorboard: bool = True  # also log to run_dir/tb when TensorBoard is installed
    progress: bool = True  # tqdm progress bar

    def validate(self) -> None:
        try:
            paths.check_profile(self.profile)
        except ValueError as exc:
            raise ConfigError(f"parameter 'profile': {exc}") from None
        if self.val_windows < 0:
            raise ConfigError(f"parameter 'val_windows' must be >= 0 (0: every validation slice), "
                              f"got {self.val_windows}")
        for name in ("batch_size", "max_steps", "val_every", "log_every"):
            if getattr(self, name) < 1:
                raise ConfigError(f"parameter {name!r} must be >= 1, got {getattr(self, name)}")
        if self.fold < 0 or self.num_workers < 0:
            raise ConfigError("parameters 'fold' and 'num_workers' must be >= 0")
        if not self.lr > 0 or (self.grad_clip is not None and not self.grad_clip > 0):
            raise ConfigError(f"'lr' must be > 0 and 'grad_clip' None or > 0, got {self.lr}, {self.grad_clip}")


@dataclasses.dataclass
class FitResult:
    """What a finished (or resumed-and-finished) run returns; ``model`` holds the best weights, in eval mode."""

    run_dir: Path
    model: UADModel
    history: pd.DataFrame
    best_val: float
    best_step: int
    steps: int


@dataclasses.dataclass(frozen=True)
class DistContext:
    rank: int = 0
    world: int = 1
    local_rank: int = 0


def init_distributed() -> DistContext:
    """Join the process group torchrun describes (``WORLD_SIZE``/``RANK``/``LOCAL_RANK``); no-op otherwise."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return dist_context()


def dist_context() -> DistContext:
    if dist.is_available() and dist.is_initialized():
        return DistContext(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", dist.get_rank())))
    return DistContext()


def _average_gradients(model: torch.nn.Module, world: int) -> list:
    def hook(p: torch.Tensor) -> None:
        dist.all_reduce(p.grad)
        p.grad.div_(world)

    return [p.register_post_accumulate_grad_hook(hook) for p in model.parameters() if p.requires_grad]


def _broadcast(tensors) -> None:
    for t in tensors:
        dist.broadcast(t.data, 0)


def rng_state() -> dict[str, Any]:
    """Torch (CPU, CUDA), NumPy and Python RNG states as tensors and plain types (``weights_only`` loadable)."""
    np_state = np.random.get_state()
    py_state = random.getstate()
    return {"torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                      "has_gauss": int(np_state[3]), "gauss": float(np_state[4])},
            "python": {"version": py_state[0], "state": list(py_state[1]), "gauss": py_state[2]}}


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    p = state["python"]
    random.setstate((p["version"], tuple(p["state"]), p["gauss"]))


def _reseed(seed: int, step: int, rank: int) -> None:
    seed_everything(data.derive_seed(seed, _RNG_STREAM, step, rank) % 2**32)


@contextlib.contextmanager
def isolated_rng(seed: int) -> Iterator[None]:
    """Run a block with every RNG seeded by ``seed`` and restore the previous states afterwards."""
    saved = rng_state()
    seed_everything(seed % 2**32)
    try:
        yield
    finally:
        set_rng_state(saved)


def _checkpoint(model, optimizers, scaler, step: int, best_val: float, config: dict) -> dict[str, Any]:
    return {"model_name": model.name, "hparams": dict(model.hparams), "model": model.state_dict(),
            "optimizers": [o.state_dict() for o in optimizers], "scaler": scaler.state_dict() if scaler else {},
            "rng": rng_state(), "step": int(step), "best_val": float(best_val), "config": config}


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    return torch.load(Path(path), map_location=map_location, weights_only=True)


def _resumable(run_dir: Path, record: dict, log) -> dict[str, Any] | None:
    """``last.pt`` if it exists and was written under the same (non-runtime) configuration."""
    path = run_dir / "last.pt"
    if not path.exists():
        return None
    ckpt = load_checkpoint(path)
    old = {k: v for k, v in ckpt.get("config", {}).items() if k not in RUNTIME_FIELDS}
    new = {k: v for k, v in record.items() if k not in RUNTIME_FIELDS}
    if old != new:
        diff = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
        why = ("written by an earlier version of the kit, which did not record the run's inputs (data, encoder)"
               if "inputs" not in old else f"written with different settings ({', '.join(diff)})")
        log(f"{path}: {why}; starting a new run (the earlier run's files move to {run_dir / SUPERSEDED})")
        return None
    return ckpt


def optimisation_step(model: UADModel, batch: dict, optimizers, step: int, *, amp: str = "none",
                      device: torch.device = torch.device("cpu"), grad_clip: float | None = None,
                      scaler: torch.amp.GradScaler | None = None) -> dict[str, float]:
    """One training step as :func:`fit` runs it: ``model.training_step`` under :func:`autocast`, or, with a
    ``scaler`` (``amp="fp16"``), the default step on ``model.loss`` with float16 loss scaling."""
    if scaler is not None:
        return _scaled_step(model, batch, optimizers, grad_clip, scaler, autocast(amp, device))
    with autocast(amp, device):
        return model.training_step(batch, optimizers, step, grad_clip)


def _scaled_step(model: UADModel, batch, optimizers, grad_clip, scaler, context) -> dict[str, float]:
    """The default ``training_step`` (one Adam step on ``loss``) with float16 loss scaling."""
    (opt,) = optimizers
    opt.zero_grad(set_to_none=True)
    with context:
        loss = model.loss(batch)
    scaler.scale(loss).backward()
    if grad_clip:
        scaler.unscale_(opt)
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    scaler.step(opt)
    scaler.update()
    return {"loss": float(loss.detach())}


def _to_device(batch: dict, device: torch.device, channels_last: bool) -> dict:
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    return {k: v.to(device, non_blocking=True).contiguous(memory_format=fmt) for k, v in batch.items()}


@torch.no_grad()
def validate(model: UADModel, loader, *, seed: int, device: torch.device, amp: str = "none",
             channels_last: bool = False, ctx: DistContext = DistContext()) -> float:
    """Mean ``validation_loss`` over all validation slices (batch-size weighted), on a fixed-seed private RNG."""
    model.eval()
    total = torch.zeros(2, dtype=torch.float64)
    with isolated_rng(data.derive_seed(seed, _VAL_STREAM)):
        for i, batch in enumerate(loader):
            if i % ctx.world != ctx.rank:
                continue
            batch = _to_device(batch, device, channels_last)
            with autocast(amp, device):
                loss = model.validation_loss(batch)
            total += torch.tensor([loss * len(batch["image"]), len(batch["image"])], dtype=torch.float64)
    if ctx.world > 1:
        total = total.to(device)
        dist.all_reduce(total)
    model.train()
    return float(total[0] / total[1])


RUN_FILES = ("best.pt", "last.pt", "history.csv", "config.json", "encoder.pt", "tb")  # encoder.pt: SparK's; tb/
SUPERSEDED = "superseded"


def supersede(run_dir: Path) -> Path | None:
    """Move an earlier run's files (:data:`RUN_FILES`) into ``run_dir/superseded/<time>/`` before a new run starts
    over it (other settings or inputs). Every replaced run is kept, one folder each, named by the time it was
    replaced (UTC, ``YYYYmmdd-HHMMSS``): nothing trained is deleted; remove old folders by hand to free the disk.
    Returns the folder, or None when there was no run."""
    present = [run_dir / n for n in RUN_FILES if (run_dir / n).exists()]
    if not any(p.name in ("best.pt", "last.pt") for p in present):
        return None
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    dest, n = run_dir / SUPERSEDED / stamp, 1
    while dest.exists():
        n += 1
        dest = run_dir / SUPERSEDED / f"{stamp}-{n}"
    dest.mkdir(parents=True)
    for p in present:
        os.replace(p, dest / p.name)
    return dest


def _restore(ckpt, model, optimizers, scaler, run_dir: Path, seed: int, ctx: DistContext):
    """Load ``ckpt`` (``last.pt``) into the run, or clear a new run's folder; set the RNGs for the start step.
    Returns ``(start step, best validation loss, its step, history rows, elapsed training seconds)``."""
    if ckpt is None:
        if ctx.rank == 0:  # a new run: the earlier run's outputs move aside, where nothing reads them as this run's
            supersede(run_dir)
        _reseed(seed, 0, ctx.rank)
        return 0, math.inf, 0, [], 0.0
    model.load_state_dict(ckpt["model"])
    for opt, state in zip(optimizers, ckpt["optimizers"]):
        opt.load_state_dict(state)
    if scaler is not None and ckpt["scaler"]:
        scaler.load_state_dict(ckpt["scaler"])
    start, rows, best_step, elapsed = int(ckpt["step"]), [], 0, 0.0
    if (run_dir / "history.csv").exists():
        old = pd.read_csv(run_dir / "history.csv")
        old = old[old["step"] <= start]
        rows = old.to_dict("records")
        best_step = int(old.loc[old["val_loss"].idxmin(), "step"]) if old["val_loss"].notna().any() else 0
        elapsed = float(old["elapsed_s"].max()) if len(old) else 0.0
    if ctx.rank == 0:
        set_rng_state(ckpt["rng"])
    else:  # other ranks' states are not stored: at a checkpoint every RNG equals this reseed
        _reseed(seed, start, ctx.rank)
    return start, float(ckpt["best_val"]), best_step, rows, elapsed


def fit(model: UADModel, cfg: LoopConfig, run_dir: str | Path, train_cohort: data.SliceCohort,
        val_cohort: data.SliceCohort, *, info: dict | None = None, inputs: dict[str, str] | None = None,
        log=print) -> FitResult:
    """Train ``model`` with ``cfg`` on ``train_cohort``, validating on ``val_cohort``; files under ``run_dir``.

    ``info``: extra facts recorded in ``config.json`` (data selection, hyper-parameters). ``inputs``: fingerprints
    of what else the run starts from (e.g. the SparK encoder file, :mod:`cddpm_lib.fingerprint`); like the two
    cohorts' fingerprints they are part of the settings a run resumes under: ``last.pt`` written over other data
    or other inputs is not resumed, a new run starts over it.
    """
    if not model.trainable:
        raise ConfigError(f"model {model.name!r} has nothing to train (trainable=False); it needs no training stage")
    ctx = dist_context()
    run_dir = Path(run_dir)
    device = default_device(cfg.device)
    if device.type == "cuda" and ctx.world > 1:
        device = torch.device("cuda", ctx.local_rank)
    amp = stage_amp(cfg.amp, device, log)
    cl = cfg.channels_last and device.type == "cuda"
    if device.type == "cpu":
        keep_freed_memory()  # no page faults for the buffers every step frees and allocates again
    slab = int(model.slab_length)
    # what the run is computed from besides its settings: a run over other data or other inputs is not resumed
    # the model as built (every hyper-parameter, defaults included): a default changed by the kit is a new run
    inputs = {"train_data": train_cohort.fingerprint(), "val_data": val_cohort.fingerprint(),
              "model": {"name": model.name, "hparams": json.loads(json.dumps(model.hparams, default=str))},
              **(inputs or {})}
    record = {**cfg.to_dict(), "world_size": ctx.world, "inputs": inputs}
    model.to(device)
    if cl:
        model.to(memory_format=torch.channels_last)
    optimizers = model.configure_optimizers(cfg.lr)
    if amp == "fp16" and type(model).training_step is not UADModel.training_step:
        raise ConfigError(f"amp='fp16' needs loss scaling inside training_step, which {model.name!r} overrides; "
                          "use amp='bf16'")
    scaler = torch.amp.GradScaler(device.type) if amp == "fp16" else None
    ckpt = _resumable(run_dir, record, log)
    start, best_val, best_step, rows, elapsed = _restore(ckpt, model, optimizers, scaler, run_dir, cfg.seed, ctx)
    if 0 < start < cfg.max_steps:
        log(f"resuming {run_dir} at step {start}")
    hooks = []
    if ctx.world > 1:
        _broadcast(model.state_dict().values())
        hooks = _average_gradients(model, ctx.world)
    if ctx.rank == 0:
        save_json({**record, **(info or {}), "amp_effective": amp, "device_effective": str(device),
                   "global_batch_slices": max(1, cfg.batch_size // slab) * slab * ctx.world}, run_dir / "config.json")
    loader = data.train_loader(train_cohort, batch_size=cfg.batch_size, seed=cfg.seed, max_steps=cfg.max_steps,
                               start_step=start, slab_length=slab, skip_empty=cfg.skip_empty, augment=cfg.augment,
                               num_workers=cfg.num_workers, rank=ctx.rank, world=ctx.world,
                               pin_memory=device.type == "cuda")
    val = data.val_loader(val_cohort, batch_size=cfg.batch_size, slab_length=slab, max_windows=cfg.val_windows)
    writer = _tensorboard(run_dir, cfg) if ctx.rank == 0 else None
    bar = tqdm(total=cfg.max_steps, initial=start, desc=model.name, disable=not cfg.progress or ctx.rank != 0,
               mininterval=1.0, file=sys.stdout)
    acc: dict[str, list[float]] = {}
    step, t0, seen = start, time.time(), 0
    model.train()
    try:
        for batch in loader:
            batch = _to_device(batch, device, cl)
            if ctx.world > 1:
                _broadcast(model.buffers())
            logs = optimisation_step(model, batch, optimizers, step, amp=amp, device=device, grad_clip=cfg.grad_clip,
                                     scaler=scaler)
            step += 1
            seen += len(batch["image"]) * ctx.world
            for k, v in logs.items():
                acc.setdefault(k, []).append(float(v))
            bar.update(1)
            at_val = step % cfg.val_every == 0 or step == cfg.max_steps
            if not (step % cfg.log_every == 0 or at_val):
                continue
            now = time.time()
            row = {"step": step, **{f"train_{k}": float(np.mean(v)) for k, v in acc.items()},
                   "val_loss": float("nan"), "lr": optimizers[0].param_groups[0]["lr"],
                   "elapsed_s": elapsed + now - t0, "slices_per_s": seen / max(now - t0, 1e-9)}
            acc, seen = {}, 0
            elapsed, t0 = row["elapsed_s"], now
            bar.set_postfix(loss=f"{row.get('train_loss', next(iter(logs.values()))):.4g}")
            if at_val:
                row["val_loss"] = validate(model, val, seed=cfg.seed, device=device, amp=amp, channels_last=cl,
                                           ctx=ctx)
                _reseed(cfg.seed, step, ctx.rank)
                improved = row["val_loss"] < best_val
                best_val, best_step = (row["val_loss"], step) if improved else (best_val, best_step)
                if ctx.rank == 0:
                    ck = _checkpoint(model, optimizers, scaler, step, best_val, record)
                    if improved:  # best.pt first: a run stopped between the two writes keeps its best weights
                        save_torch(ck, run_dir / "best.pt")
                    save_torch(ck, run_dir / "last.pt")
                t0 = time.time()  # validation and writing do not count as training time
            rows.append(row)
            for k, v in row.items() if writer is not None else ():
                if k != "step" and math.isfinite(v):
                    writer.add_scalar(k, v, step)
            if ctx.rank == 0 and at_val:
                save_dataframe(pd.DataFrame(rows), run_dir / "history.csv")
    finally:
        bar.close()
        for h in hooks:
            h.remove()
        if writer is not None:
            writer.close()
    if ctx.world > 1:
        dist.barrier()
    if not (run_dir / "best.pt").exists():
        raise RuntimeError(f"{run_dir}: no finite validation loss in {step} steps, so no best.pt; for f-AnoGAN "
                           "gan_steps must be smaller than max_steps")
    best = load_checkpoint(run_dir / "best.pt", map_location=device)
    model.load_state_dict(best["model"])
    model.eval()
    return FitResult(run_dir, model, pd.DataFrame(rows), float(best["best_val"]), best_step, step)


def _tensorboard(run_dir: Path, cfg: LoopConfig):
    """A TensorBoard writer on ``run_dir/tb`` if asked for and TensorBoard is installed (optional), else None."""
    if cfg.tensorboard and importlib.util.find_spec("tensorboard") is not None:
        from torch.utils.tensorboard import SummaryWriter
        return SummaryWriter(str(run_dir / "tb"))
    return None


