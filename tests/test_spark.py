"""spark: masking ratio and grid, masked-only loss, sparse encoding, optimiser, pre-training -> cDDPM encoder."""
from __future__ import annotations

import inspect

import numpy as np
import pytest
import torch

from cddpm_lib import data, fingerprint, spark, train
from cddpm_lib.config import ConfigError
from cddpm_lib.models.ddpm import build_cddpm

TINY_ENCODER = dict(encoder_depth=18, encoder_width=8, cond_dim=16)


pytestmark = pytest.mark.usefixtures("one_thread")


def test_mask_hides_the_stated_ratio_exactly():
    torch.manual_seed(0)
    active = spark.random_patch_mask(200, (10, 10), 0.65)
    assert active.shape == (200, 1, 10, 10)
    assert ((~active).flatten(1).sum(1) == 65).all()
    per_position = (~active).float().mean(0).flatten()  # every patch equally likely to be hidden
    assert per_position.min() > 0.5 and per_position.max() < 0.8


def test_mask_grid_follows_the_encoder_stride():
    assert spark.mask_patch_size((96, 96)) == 32  # 3x3 grid (authors)
    assert spark.mask_patch_size((64, 64)) == 32  # 2x2 grid
    assert spark.mask_patch_size((32, 32)) == 16  # 1x1 would hide everything: halve to 2x2
    torch.manual_seed(0)
    tiny = spark.random_patch_mask(50, (2, 2), 0.65)  # round(4 * 0.35) = 1 visible, 3 hidden
    assert (tiny.flatten(1).sum(1) == 1).all()
    assert (spark.random_patch_mask(50, (1, 2), 0.99).flatten(1).sum(1) == 1).all()  # never all hidden
    with pytest.raises(ValueError, match="divisible by the mask patch"):
        spark.mask_patch_size((64, 48), 32)


def test_loss_counts_masked_patches_only():
    g = torch.Generator().manual_seed(1)
    x = torch.rand(3, 1, 32, 32, generator=g)
    pred = torch.rand(3, 1, 32, 32, generator=g)
    active = spark.random_patch_mask(3, (4, 4), 0.5, generator=g)
    visible = spark.resize_mask(active, (32, 32)).float()
    base = spark.masked_patch_l2(pred, x, active, 8, normalize_target=False)
    changed_visible = pred + 5.0 * visible
    assert spark.masked_patch_l2(changed_visible, x, active, 8, normalize_target=False) == pytest.approx(float(base))
    changed_hidden = pred + 5.0 * (1 - visible)
    assert spark.masked_patch_l2(changed_hidden, x, active, 8, normalize_target=False) > base + 1
    # independent computation with numpy: mean over hidden pixels of the squared error (equal-size patches)
    hidden = (1 - visible).numpy().astype(bool)
    assert float(base) == pytest.approx(((pred.numpy() - x.numpy()) ** 2)[hidden].mean(), rel=1e-5)


def test_normalised_target_is_standardised_per_patch():
    g = torch.Generator().manual_seed(2)
    x = torch.rand(2, 1, 16, 16, generator=g)
    active = torch.zeros(2, 1, 2, 2, dtype=torch.bool)  # all hidden
    patches = spark.patchify(x, 8)
    mean, std = patches.mean(-1, keepdim=True), (patches.var(-1, keepdim=True) + 1e-6).sqrt()
    target = spark.unpatchify((patches - mean) / std, 8, (16, 16))
    assert float(spark.masked_patch_l2(target, x, active, 8)) == pytest.approx(0.0, abs=1e-10)
    np.testing.assert_allclose(spark.unpatchify(patches, 8, (16, 16)).numpy(), x.numpy())


@pytest.mark.parametrize("amp", ["none", "bf16"])
def test_encoder_never_sees_hidden_patches(amp):
    """Also under ``amp=bf16`` (the training stage's autocast): the mask tokens join bfloat16 features, the
    hidden patches stay unseen, and the masked loss agrees with float32 to bfloat16's precision."""
    from cddpm_lib.runtime import autocast

    torch.manual_seed(0)
    model = spark.SparK((32, 32), decoder_width=16, **TINY_ENCODER).eval()
    active = spark.random_patch_mask(2, model.grid, 0.65)
    x = torch.rand(2, 1, 32, 32)
    hidden = 1 - spark.resize_mask(active, (32, 32)).float()
    with torch.no_grad():
        loss32 = spark.masked_patch_l2(model.predict(x, active), x, active, model.patch, model.normalize_target)
        with autocast(amp, torch.device("cpu")):
            a = model.predict(x, active)
            b = model.predict(x + 3.0 * hidden * torch.rand_like(x), active)
            loss = spark.masked_patch_l2(a, x, active, model.patch, model.normalize_target)
    torch.testing.assert_close(a, b)
    assert a.dtype == (torch.bfloat16 if amp == "bf16" else torch.float32)
    if amp == "bf16":
        assert float(loss) == pytest.approx(float(loss32), rel=0.02) and float(loss) != float(loss32)
    else:
        assert float(loss) == float(loss32)


def test_adamw_as_the_authors():
    model = spark.SparK((32, 32), decoder_width=16, **TINY_ENCODER)
    (opt,) = model.configure_optimizers(spark.SSLConfig().lr)
    assert isinstance(opt, torch.optim.AdamW) and opt.defaults["lr"] == 1e-4
    decayed, plain = opt.param_groups
    assert decayed["weight_decay"] == 0.05 and plain["weight_decay"] == 0.0
    assert all(p.ndim > 1 for p in decayed["params"])
    assert {id(t) for t in model.mask_tokens} <= {id(p) for p in plain["params"]}


def test_config_defaults_match_the_cddpm_builder():
    cfg = spark.SSLConfig()
    defaults = {k: v.default for k, v in inspect.signature(build_cddpm).parameters.items()}
    for field in ("encoder_depth", "encoder_width", "encoder_norm", "cond_dim"):
        assert getattr(cfg, field) == defaults[field], field
    assert cfg.mask_ratio == 0.65 and cfg.augment is False
    with pytest.raises(ConfigError, match="mask_ratio"):
        spark.SSLConfig(mask_ratio=1.0)


def test_pretrained_encoder_loads_into_the_cddpm(tmp_path, monkeypatch):
    monkeypatch.setenv("CDDPM_DATA_ROOT", str(tmp_path / "data"))
    monkeypatch.setenv("CDDPM_RUNS_ROOT", str(tmp_path / "runs"))
    from cddpm_lib import paths

    data.write_phantom_cohort(paths.source_dir("synthetic", "smoke"), shape=(32, 32, 8), n_subjects=3, n_val=1)
    cfg = spark.SSLConfig(profile="smoke", batch_size=4, max_steps=4, val_every=2, progress=False, decoder_width=16,
                          **TINY_ENCODER)
    result = spark.pretrain(cfg, log=lambda *_: None)
    path = train.ssl_encoder_path("smoke", "t2", 0)
    assert path.exists() and result.steps == 4
    hist = result.history.dropna(subset=["val_loss"])
    assert len(hist) == 2 and np.isfinite(hist["val_loss"]).all()
    saved = torch.load(path, weights_only=True)["encoder"]
    tcfg = train.TrainConfig(profile="smoke", model="cddpm", ssl=True, model_hparams={"cddpm": dict(
        model_channels=8, num_res_blocks=1, **TINY_ENCODER)})
    model = train.build_run_model(tcfg, (32, 32))
    for k, v in model.encoder.state_dict().items():
        assert torch.equal(v, saved[k]), k
    # the fine-tuning run records which encoder it started from: a re-run SparK stage means a new run
    run = train.train(tcfg.replace(batch_size=4, max_steps=2, val_every=2, progress=False), log=lambda *_: None)
    started = torch.load(run.run_dir / "last.pt", weights_only=True)["config"]["inputs"]["ssl_encoder"]
    assert started == train.encoder_fingerprint(path)
    resaved = path.with_name("copy.pt")  # the same weights saved again with other metadata: the same input
    torch.save({**torch.load(path, weights_only=True), "step": 99}, resaved)
    assert fingerprint.file_fingerprint(resaved) != fingerprint.file_fingerprint(path)
    assert train.encoder_fingerprint(resaved) == started
    wrong = tcfg.replace(model_hparams={"cddpm": dict(model_channels=8, num_res_blocks=1, encoder_depth=18,
                                                      encoder_width=16, cond_dim=16)})
    with pytest.raises(ValueError, match="architecture mismatch"):
        train.build_run_model(wrong, (32, 32))


@pytest.mark.parametrize("profile", ["smoke", "quick", "paper"])
def test_profiles_pretrain_the_encoder_the_cddpm_uses(profile):
    from cddpm_lib.config import profile_params

    ssl = spark.SSLConfig(**{k: v for k, v in profile_params("ssl", profile).items()
                             if k in spark.SSLConfig.field_names()})
    cddpm = {**{k: v.default for k, v in inspect.signature(build_cddpm).parameters.items()},
             **profile_params("training", profile).get("model_hparams", {}).get("cddpm", {})}
    for field in ("encoder_depth", "encoder_width", "encoder_norm", "cond_dim"):
        assert getattr(ssl, field) == cddpm[field], (profile, field)
