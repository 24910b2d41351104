"""train: the training stage — config, model building, run folder, real models end to end, figures, CLI."""
from __future__ import annotations

import json

import matplotlib
import pytest
import torch

from cddpm_lib import data, paths, train
from cddpm_lib.config import ConfigError, profile_params
from cddpm_lib.models import load_model

matplotlib.use("Agg")

TINY = {"ae": {"channels": [4, 8], "latent_dim": 8},
        "svae": {"channels": [4, 8], "latent_dim": 8, "slab_length": 4, "seq_heads": 2},
        "cddpm": {"model_channels": 8, "num_res_blocks": 1, "encoder_depth": 18, "encoder_width": 8,
                  "cond_dim": 16, "T": 100}}


@pytest.fixture(autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(n if n == 1 else 1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def smoke_root(tmp_path, monkeypatch):
    monkeypatch.setenv("CDDPM_DATA_ROOT", str(tmp_path / "data"))
    monkeypatch.setenv("CDDPM_RUNS_ROOT", str(tmp_path / "runs"))
    data.write_phantom_cohort(paths.source_dir("synthetic", "smoke"), shape=(32, 32, 8), n_subjects=3, n_val=1)
    return tmp_path


def _cfg(model, **kw):
    base = dict(profile="smoke", model=model, batch_size=8, max_steps=2, val_every=2, progress=False,
                model_hparams=TINY)
    return train.TrainConfig(**{**base, **kw})


def test_defaults_are_the_papers():
    cfg = train.TrainConfig()
    assert (cfg.lr, cfg.batch_size, cfg.augment, cfg.max_steps) == (1e-5, 32, True, 1600 * 358 // 32)


def test_config_rejects_bad_values():
    with pytest.raises(ConfigError, match="unknown model 'unet'"):
        train.TrainConfig(model="unet")
    with pytest.raises(ConfigError, match="model_hparams"):
        train.TrainConfig(model_hparams={"vit": {}})
    with pytest.raises(ConfigError, match="model_hparams"):
        train.TrainConfig(model_hparams={"ae": 3})
    with pytest.raises(ConfigError, match="ssl"):
        train.TrainConfig(model="ddpm", ssl=True)
    with pytest.raises(ConfigError, match="unknown parameter"):
        train.TrainConfig.from_params({"epochs": 3})


def test_thresh_is_rejected_with_a_clear_message():
    with pytest.raises(ConfigError, match="thresh.*not trained"):
        train.build_run_model(train.TrainConfig(model="thresh"), (32, 32))


def test_model_picks_its_own_hparams_entry():
    model = train.build_run_model(_cfg("ae"), (32, 32))
    assert model.hparams["latent_dim"] == 8 and model.hparams["image_size"] == (32, 32)


def test_missing_ssl_encoder_names_the_stage(smoke_root):
    with pytest.raises(FileNotFoundError, match="notebook 02"):
        train.build_run_model(_cfg("cddpm", ssl=True), (32, 32))


def test_train_writes_the_run_folder_and_checkpoint_reloads(smoke_root):
    cfg = _cfg("ae", max_steps=4)
    result = train.train(cfg, log=lambda *_: None)
    run_dir = paths.checkpoint_dir("smoke", "ae_t2", 0)
    assert result.run_dir == run_dir
    assert {"best.pt", "last.pt", "config.json", "history.csv"} <= {p.name for p in run_dir.iterdir()}
    info = json.loads((run_dir / "config.json").read_text())
    assert info["sampling"].startswith("axial slices uniformly with replacement") and info["image_size"] == [32, 32]
    assert info["augmentation"] == data.AUGMENT_P and info["hparams"]["latent_dim"] == 8
    model = load_model(run_dir / "best.pt")
    x = torch.rand(2, 1, 32, 32)
    torch.testing.assert_close(model.reconstruct(x), result.model.reconstruct(x))


def test_real_cddpm_trains_and_reloads(smoke_root):
    result = train.train(_cfg("cddpm", ssl=False), log=lambda *_: None)
    model = load_model(paths.checkpoint_dir("smoke", "cddpm_t2", 0) / "best.pt")
    assert model.name == "cddpm" and result.steps == 2
    x = torch.rand(2, 1, 32, 32)
    gen = torch.Generator().manual_seed(0)
    assert model.reconstruct(x, t_test=50, generator=gen).shape == (2, 1, 32, 32)


def test_slab_model_and_figures(smoke_root):
    result = train.train(_cfg("svae", max_steps=2), log=lambda *_: None)
    _, val = train.load_fold(_cfg("svae"))
    assert json.loads((result.run_dir / "config.json").read_text())["slab_length"] == 4
    fig = train.plot_reconstructions(result.model, val, n=2)
    assert len(fig.axes) == 6
    assert train.plot_history(result.history).axes[0].get_xlabel() == "step"


def test_example_slices_contain_brain(smoke_root):
    _, val = train.load_fold(_cfg("ae"))
    for v, z in train.example_slices(val, 5):
        assert val.masks[v][z].any()


def test_command_line_uses_the_profile(smoke_root, capsys):
    assert "model_hparams" in profile_params("training", "smoke")
    train.main(["profile=smoke", "model=ae", "max_steps=2", "val_every=1", "progress=false"])
    assert "best validation loss" in capsys.readouterr().out
    assert (paths.checkpoint_dir("smoke", "ae_t2", 0) / "best.pt").exists()


def test_other_models_hparams_do_not_restart_a_finished_run(smoke_root):
    train.train(_cfg("ae"), log=lambda *_: None)
    last = paths.checkpoint_dir("smoke", "ae_t2", 0) / "last.pt"
    stamp = last.stat().st_mtime_ns
    again = train.train(_cfg("ae", model_hparams={**TINY, "ddpm": {"model_channels": 4}}), log=lambda *_: None)
    assert again.steps == 2 and last.stat().st_mtime_ns == stamp
