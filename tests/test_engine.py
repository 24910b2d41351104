"""engine: the optimisation loop — learning, best/last checkpoints, exact resumption, data parallel (gloo)."""
from __future__ import annotations

import json
import math
import os
import socket

import pandas as pd
import pytest
import torch
from torch import nn

from cddpm_lib import data, engine
from cddpm_lib.config import ConfigError
from cddpm_lib.models import load_model
from cddpm_lib.models.base import UADModel
from cddpm_lib.runtime import seed_everything


class TinyDenoiser(UADModel):
    """Two convolutions trained to remove Gaussian noise of std ``sigma`` (``sigma=0``: a deterministic loss)."""

    name = "tiny"
    kill_at: int | None = None  # raise inside training_step at this step (simulates a killed run)

    def __init__(self, image_size=(16, 16), width: int = 4, sigma: float = 0.1) -> None:
        super().__init__(image_size=tuple(image_size), width=width, sigma=sigma)
        self.sigma = sigma
        self.net = nn.Sequential(nn.Conv2d(1, width, 3, padding=1), nn.Tanh(), nn.Conv2d(width, 1, 3, padding=1))

    def forward(self, x):
        return self.net(x)

    def loss(self, batch):
        x = batch["image"]
        return (self(x + self.sigma * torch.randn_like(x)) - x).pow(2).mean()

    def training_step(self, batch, optimizers, step, grad_clip=None):
        if self.kill_at is not None and step == self.kill_at:
            raise KeyboardInterrupt(f"killed at step {step}")
        return super().training_step(batch, optimizers, step, grad_clip)

    def reconstruct(self, x, mask=None, **kw):
        return self(x).clamp(0, 1)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def cohorts(tmp_path_factory):
    manifest = data.write_phantom_cohort(tmp_path_factory.mktemp("cohort"), shape=(16, 16, 8), n_subjects=5,
                                         n_val=1, seed=1)
    return tuple(data.SliceCohort.from_manifest(manifest, split=s, fold=0, weighting="t2") for s in ("train", "val"))


def _cfg(**kw):
    base = dict(lr=3e-3, batch_size=8, max_steps=12, val_every=4, log_every=2, progress=False, augment=True)
    return engine.LoopConfig(**{**base, **kw})


def _fit(run_dir, cohorts, cfg, **model_kw):
    seed_everything(cfg.seed)
    return engine.fit(TinyDenoiser(**model_kw), cfg, run_dir, *cohorts, log=lambda *_: None)


def test_loss_decreases_and_files_written(tmp_path, cohorts):
    result = _fit(tmp_path, cohorts, _cfg(lr=1e-2, max_steps=40, val_every=10, augment=False))
    hist = pd.read_csv(tmp_path / "history.csv")
    assert hist["train_loss"].iloc[-1] < 0.5 * hist["train_loss"].iloc[0]
    val = hist["val_loss"].dropna()
    assert list(hist.loc[val.index, "step"]) == [10, 20, 30, 40] and val.iloc[-1] < val.iloc[0]
    assert {"best.pt", "last.pt", "config.json", "history.csv"} <= {p.name for p in tmp_path.iterdir()}
    assert json.loads((tmp_path / "config.json").read_text())["max_steps"] == 40
    assert result.steps == 40 and result.best_val == pytest.approx(val.min())


def test_checkpoints_load_weights_only_and_best_is_lowest(tmp_path, cohorts):
    _fit(tmp_path, cohorts, _cfg(max_steps=8, val_every=2))
    best = torch.load(tmp_path / "best.pt", weights_only=True)
    last = torch.load(tmp_path / "last.pt", weights_only=True)
    keys = {"model_name", "hparams", "model", "optimizers", "scaler", "rng", "step", "best_val", "config"}
    assert keys <= set(best) and keys <= set(last)
    hist = pd.read_csv(tmp_path / "history.csv").dropna(subset=["val_loss"])
    assert best["best_val"] == pytest.approx(hist["val_loss"].min())
    assert best["step"] == int(hist.loc[hist["val_loss"].idxmin(), "step"]) and last["step"] == 8


def test_resume_after_kill_equals_uninterrupted(tmp_path, cohorts):
    cfg = _cfg()
    full = _fit(tmp_path / "full", cohorts, cfg)
    TinyDenoiser.kill_at = 6  # last.pt was written at step 4
    try:
        with pytest.raises(KeyboardInterrupt):
            _fit(tmp_path / "killed", cohorts, cfg)
    finally:
        TinyDenoiser.kill_at = None
    assert torch.load(tmp_path / "killed" / "last.pt", weights_only=True)["step"] == 4
    seed_everything(123)  # a different initialisation: resuming must overwrite it
    resumed = engine.fit(TinyDenoiser(), cfg, tmp_path / "killed", *cohorts, log=lambda *_: None)
    a = torch.load(tmp_path / "full" / "last.pt", weights_only=True)
    b = torch.load(tmp_path / "killed" / "last.pt", weights_only=True)
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    pd.testing.assert_frame_equal(full.history.drop(columns=["elapsed_s", "slices_per_s"]),
                                  resumed.history.drop(columns=["elapsed_s", "slices_per_s"]))


def test_finished_run_is_skipped_and_changed_settings_restart(tmp_path, cohorts):
    _fit(tmp_path, cohorts, _cfg(max_steps=4))
    stamp = (tmp_path / "last.pt").stat().st_mtime_ns
    again = _fit(tmp_path, cohorts, _cfg(max_steps=4))
    assert again.steps == 4 and (tmp_path / "last.pt").stat().st_mtime_ns == stamp
    longer = _fit(tmp_path, cohorts, _cfg(max_steps=6))  # more steps: continues
    assert len(longer.history) == 3
    changed = _fit(tmp_path, cohorts, _cfg(max_steps=4, lr=1e-3))  # other lr: a new run
    assert changed.steps == 4 and torch.load(tmp_path / "last.pt", weights_only=True)["config"]["lr"] == 1e-3
    # every replaced run is kept aside, one folder each, never deleted
    (first,) = (tmp_path / engine.SUPERSEDED).iterdir()
    assert {"best.pt", "last.pt", "history.csv", "config.json"} <= {p.name for p in first.iterdir()}
    assert torch.load(first / "last.pt", weights_only=True)["config"]["lr"] == 3e-3
    _fit(tmp_path, cohorts, _cfg(max_steps=4, lr=2e-3))
    kept = sorted((tmp_path / engine.SUPERSEDED).iterdir())
    assert [torch.load(d / "last.pt", weights_only=True)["config"]["lr"] for d in kept] == [3e-3, 1e-3]
    assert not (tmp_path / engine.SUPERSEDED / "best.pt").exists()


def test_other_data_or_inputs_start_a_new_run(tmp_path, cohorts):
    train, val = cohorts
    _fit(tmp_path, cohorts, _cfg(max_steps=4))
    stamp = (tmp_path / "last.pt").stat().st_mtime_ns
    changed = data.SliceCohort([im.flip(-1) for im in train.images], train.masks, train.subject_ids)
    assert changed.fingerprint() != train.fingerprint()
    assert data.SliceCohort(train.images, train.masks, train.subject_ids).fingerprint() == train.fingerprint()
    logs = []
    seed_everything(0)
    rerun = engine.fit(TinyDenoiser(), _cfg(max_steps=4), tmp_path, changed, val, log=logs.append)
    assert rerun.steps == 4 and (tmp_path / "last.pt").stat().st_mtime_ns != stamp
    assert any("different settings (inputs)" in line for line in logs)
    stamp = (tmp_path / "last.pt").stat().st_mtime_ns
    seed_everything(0)
    engine.fit(TinyDenoiser(), _cfg(max_steps=4), tmp_path, changed, val, log=logs.append)  # same again: reused
    assert (tmp_path / "last.pt").stat().st_mtime_ns == stamp
    seed_everything(0)  # another starting point handed in by the caller (e.g. a re-run SparK encoder)
    engine.fit(TinyDenoiser(), _cfg(max_steps=4), tmp_path, changed, val, inputs={"ssl_encoder": "new"},
               log=logs.append)
    saved = torch.load(tmp_path / "last.pt", weights_only=True)["config"]["inputs"]
    assert saved["ssl_encoder"] == "new" and saved["train_data"] == changed.fingerprint()
    # another model (a hyper-parameter, even one left at the kit's default): a new run
    seed_everything(0)
    logs.clear()
    engine.fit(TinyDenoiser(width=6), _cfg(max_steps=4), tmp_path, changed, val, inputs={"ssl_encoder": "new"},
               log=logs.append)
    saved = torch.load(tmp_path / "last.pt", weights_only=True)["config"]["inputs"]
    assert saved["model"] == {"name": "tiny", "hparams": {"image_size": [16, 16], "width": 6, "sigma": 0.1}}
    assert any("different settings (inputs)" in line for line in logs)


def test_untrainable_model_rejected(tmp_path, cohorts):
    class Fixed(TinyDenoiser):
        trainable = False

    with pytest.raises(ConfigError, match="trainable=False"):
        engine.fit(Fixed(), _cfg(), tmp_path, *cohorts)


def test_checkpoint_rebuilds_through_the_registry(tmp_path, cohorts):
    _fit(tmp_path, cohorts, _cfg(max_steps=2, val_every=2))
    ckpt = torch.load(tmp_path / "best.pt", weights_only=True)
    assert ckpt["model_name"] == "tiny" and ckpt["hparams"]["width"] == 4
    with pytest.raises(ValueError, match="unknown model 'tiny'"):
        load_model(tmp_path / "best.pt")  # the test model is not registered; real ones are (test_train)


def test_config_validation():
    with pytest.raises(ConfigError, match="batch_size"):
        engine.LoopConfig(batch_size=0)
    with pytest.raises(ConfigError, match="profile"):
        engine.LoopConfig(profile="huge")
    with pytest.raises(ConfigError, match="amp"):
        engine.LoopConfig(amp="fp8")
    with pytest.raises(ConfigError, match="val_windows"):
        engine.LoopConfig(val_windows=-1)


def _step_pair(amp: str, scaler: bool):
    """The same deterministic step twice: directly and through ``optimisation_step``."""
    batch = {"image": torch.rand(4, 1, 16, 16, generator=torch.Generator().manual_seed(0))}
    out = []
    for via_engine in (False, True):
        torch.manual_seed(0)
        model = TinyDenoiser(sigma=0.0)
        opts = model.configure_optimizers(1e-2)
        if via_engine:
            logs = engine.optimisation_step(model, batch, opts, 0, amp=amp, device=torch.device("cpu"),
                                            scaler=torch.amp.GradScaler("cpu", init_scale=1024.0) if scaler else None)
        else:
            logs = model.training_step(batch, opts, 0)
        out.append((logs["loss"], [p.detach().clone() for p in model.parameters()]))
    return out


def test_optimisation_step_float32_is_the_models_own_step():
    (loss_a, params_a), (loss_b, params_b) = _step_pair("none", scaler=False)
    assert loss_a == loss_b
    assert all(torch.equal(a, b) for a, b in zip(params_a, params_b))


@pytest.mark.parametrize("amp, scaler", [("bf16", False), ("fp16", True)])
def test_optimisation_step_mixed_precision_follows_float32(amp, scaler):
    """Under autocast (with loss scaling for fp16) the step computes the same loss and update up to the reduced
    precision: the loss within 2 %, every parameter's change within 5 % of the float32 change. (The scale starts
    at 2^10, not GradScaler's 2^16, whose first step overflows in float16 and is skipped, as it should be.)"""
    torch.manual_seed(0)
    start = [p.detach().clone() for p in TinyDenoiser(sigma=0.0).parameters()]
    (loss32, params32), (loss_mp, params_mp) = _step_pair("none", False)[0], _step_pair(amp, scaler)[1]
    assert loss_mp == pytest.approx(loss32, rel=0.02)
    for p0, p32, pmp in zip(start, params32, params_mp):
        step32, step_mp = p32 - p0, pmp - p0
        assert step32.abs().max() > 0
        assert (step_mp - step32).norm() <= 0.05 * step32.norm()


@pytest.mark.parametrize("supported", [True, False])
def test_fit_in_bfloat16_on_a_cpu_only_where_it_is_native(tmp_path, cohorts, monkeypatch, supported):
    """``amp="bf16"`` trains on a CPU under bfloat16 autocast where oneDNN runs bfloat16 on the CPU (recorded as
    ``amp_effective``; the loss still falls) and in float32, with a note in the log, where it has not."""
    from cddpm_lib import runtime

    monkeypatch.setattr(runtime, "cpu_bf16_supported", lambda: supported)
    logs: list[str] = []
    seed_everything(0)
    engine.fit(TinyDenoiser(), _cfg(lr=1e-2, max_steps=40, val_every=10, augment=False, amp="bf16", device="cpu"),
               tmp_path, *cohorts, log=logs.append)
    record = json.loads((tmp_path / "config.json").read_text())
    assert record["amp"] == "bf16" and record["amp_effective"] == ("bf16" if supported else "none")
    assert any("oneDNN runs bfloat16" in m for m in logs) != supported
    hist = pd.read_csv(tmp_path / "history.csv")
    assert hist["train_loss"].iloc[-1] < 0.5 * hist["train_loss"].iloc[0]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank: int, world: int, port: int, manifest: str, run_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    try:
        sets = [data.SliceCohort.from_manifest(manifest, split=s, fold=0, weighting="t2") for s in ("train", "val")]
        _fit(run_dir, sets, _cfg(batch_size=4), sigma=0.0)
    finally:
        torch.distributed.destroy_process_group()


def test_ddp_two_processes_equal_one_process_doubled_batch(tmp_path):
    manifest = data.write_phantom_cohort(tmp_path / "cohort", shape=(16, 16, 8), n_subjects=5, n_val=1, seed=1)
    sets = [data.SliceCohort.from_manifest(manifest, split=s, fold=0, weighting="t2") for s in ("train", "val")]
    _fit(tmp_path / "single", sets, _cfg(batch_size=8), sigma=0.0)
    torch.multiprocessing.spawn(_ddp_worker, args=(2, _free_port(), str(manifest), str(tmp_path / "ddp")),
                                nprocs=2, join=True)
    one = torch.load(tmp_path / "single" / "last.pt", weights_only=True)
    two = torch.load(tmp_path / "ddp" / "last.pt", weights_only=True)
    assert two["config"]["world_size"] == 2 and two["step"] == one["step"] == 12
    for k in one["model"]:
        torch.testing.assert_close(two["model"][k], one["model"][k], atol=1e-5, rtol=1e-4)
    assert math.isclose(two["best_val"], one["best_val"], rel_tol=1e-4)
