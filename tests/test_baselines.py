"""Non-diffusion baselines (AE, VAE, SVAE, DAE, f-AnoGAN, Thresh): shapes, training, checkpoints, method details."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.stats import rankdata

from cddpm_lib.models import MODEL_NAMES, UADModel, build_model, load_model
from cddpm_lib.models.dae import random_cyclic_shift
from cddpm_lib.models.fanogan import gradient_penalty
from cddpm_lib.models.svae import window_starts

SIZE = (32, 32)
#: tiny networks so that every test runs in well under a second or two on a loaded CPU
TINY = {
    "ae": dict(channels=(8, 16), latent_dim=16),
    "vae": dict(channels=(8, 16), latent_dim=16),
    "svae": dict(channels=(8, 16), latent_dim=16, slab_length=4, seq_heads=4),
    "dae": dict(model_channels=8, channel_mult=(1, 2), num_res_blocks=1),
    "fanogan": dict(channels=(8, 16), latent_dim=16, gan_steps=3, n_critic=2),
    "thresh": dict(),
}
TRAINED = ("ae", "vae", "svae", "dae", "fanogan")


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny networks gain nothing from intra-op threads; one thread keeps the file fast on a shared CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def phantom_slices(n: int = 8, size: tuple[int, int] = SIZE, seed: int = 0) -> dict[str, torch.Tensor]:
    """Consecutive axial slices of a smooth synthetic 'brain': an ellipse whose radius varies with the slice
    index, a darker 'ventricle' inside, mild smooth texture. ``image, mask: [n, 1, H, W]``."""
    rng = np.random.default_rng(seed)
    yy, xx = np.meshgrid(np.linspace(-1, 1, size[0]), np.linspace(-1, 1, size[1]), indexing="ij")
    images, masks = [], []
    for k in range(n):
        r = 0.55 + 0.3 * math.sin(math.pi * (k + 1) / (n + 1))
        brain = (xx / r) ** 2 + (yy / (0.85 * r)) ** 2 < 1
        ventricle = (xx / (0.3 * r)) ** 2 + ((yy - 0.1) / (0.2 * r)) ** 2 < 1
        img = 0.6 + 0.1 * np.sin(3 * xx + rng.uniform(0, 1)) * np.cos(2 * yy)
        img = np.where(ventricle, 0.25, img) * brain
        images.append(img)
        masks.append(brain)
    to_t = lambda a: torch.tensor(np.stack(a)[:, None], dtype=torch.float32)  # noqa: E731
    return {"image": to_t(images), "mask": to_t(masks)}


def tiny(name: str, **over) -> UADModel:
    torch.manual_seed(0)
    return build_model(name, image_size=SIZE, **{**TINY[name], **over})


def train(model: UADModel, batch, steps: int, lr: float = 3e-3, start: int = 0) -> list[dict[str, float]]:
    model.train()
    opts = model.configure_optimizers(lr)
    return [model.training_step(batch, opts, start + s) for s in range(steps)]


def test_registry_covers_every_baseline():
    assert set(TRAINED) | {"thresh"} <= set(MODEL_NAMES)
    for name in TINY:
        model = tiny(name)
        assert isinstance(model, UADModel) and model.name == name
        rebuilt = build_model(name, **model.hparams)  # hparams alone rebuild the same architecture
        assert rebuilt.state_dict().keys() == model.state_dict().keys()


@pytest.mark.parametrize("name", list(TINY))
def test_maps_and_reconstructions_have_the_input_shape(name):
    batch = phantom_slices(8)
    model = tiny(name).eval()
    x_hat = model.reconstruct(batch["image"], batch["mask"])
    amap = model.anomaly_map(batch["image"], batch["mask"])
    assert x_hat.shape == amap.shape == batch["image"].shape
    assert torch.isfinite(amap).all() and (amap >= 0).all()
    if name != "thresh":
        assert 0.0 <= float(x_hat.min()) and float(x_hat.max()) <= 1.0


@pytest.mark.parametrize("name", ["ae", "vae", "svae", "dae"])
def test_training_lowers_the_loss(name):
    batch = phantom_slices(8)
    model = tiny(name)
    torch.manual_seed(1)
    logs = train(model, batch, 40)
    first, last = np.mean([d["loss"] for d in logs[:3]]), np.mean([d["loss"] for d in logs[-3:]])
    assert last < 0.7 * first, (first, last)


@pytest.mark.parametrize("name", list(TINY))
def test_checkpoint_round_trip_through_load_model(name, tmp_path):
    batch = phantom_slices(8)
    model = tiny(name)
    if model.trainable:
        train(model, batch, 4)  # moves weights, batch-norm statistics and (f-AnoGAN) the phase counter
    model.eval()
    path = tmp_path / "best.pt"
    torch.save({"model_name": name, "hparams": model.hparams, "model": model.state_dict()}, path)
    loaded = load_model(path)
    assert type(loaded) is type(model) and loaded.hparams == model.hparams
    torch.testing.assert_close(loaded.anomaly_map(batch["image"], batch["mask"]),
                               model.anomaly_map(batch["image"], batch["mask"]))
    if model.trainable:
        assert loaded.validation_loss(batch) == pytest.approx(model.validation_loss(batch))


def test_wrong_slice_size_is_a_clear_error():
    with pytest.raises(ValueError, match=r"expected slices of shape \[B, 1, 32, 32\]"):
        tiny("ae").loss({"image": torch.zeros(2, 1, 16, 16), "mask": torch.zeros(2, 1, 16, 16)})
    with pytest.raises(ValueError, match="divisible by 2\\*\\*2"):
        build_model("ae", image_size=(30, 32), channels=(8, 16))


def test_model_learning_rate_overrides_the_stage_rate():
    assert tiny("ae", lr=1e-3).configure_optimizers(1e-5)[0].param_groups[0]["lr"] == 1e-3
    assert tiny("ae").configure_optimizers(1e-5)[0].param_groups[0]["lr"] == 1e-5
    assert all(o.param_groups[0]["lr"] == 1e-4 for o in tiny("fanogan").configure_optimizers(1e-5))


# --- SVAE ---------------------------------------------------------------------------------------------
def test_svae_training_batches_must_be_whole_slabs():
    batch = phantom_slices(6)  # 6 slices, slab_length 4
    with pytest.raises(ValueError, match="slab_length=4"):
        tiny("svae").loss(batch)


@pytest.mark.parametrize("n_slices", [3, 4, 11])
def test_svae_reconstructs_whole_volumes_of_any_length(n_slices):
    vol = phantom_slices(n_slices)
    model = tiny("svae").eval()
    assert model.needs_whole_volume and model.slab_length == 4
    assert model.reconstruct(vol["image"]).shape == (n_slices, 1, *SIZE)


def _mid_grey_output(model):
    """Shift the decoder's output layer so that untrained reconstructions are not clipped away at 0."""
    torch.nn.init.constant_(model.decoder.deconvs[-1].bias, 0.5)
    return model


def test_untrained_svae_equals_its_vae():
    """The sequence model's output layer starts at zero, so SVAE starts as the slice-wise VAE."""
    vol = phantom_slices(8)["image"]
    vae, svae = _mid_grey_output(tiny("vae").eval()), _mid_grey_output(tiny("svae").eval())
    x_hat = svae.reconstruct(vol)
    assert 0.0 < float(x_hat.min()) and float(x_hat.max()) < 1.0
    torch.testing.assert_close(x_hat, vae.reconstruct(vol))


@pytest.mark.parametrize("kind", ["transformer", "gru"])
def test_svae_couples_neighbouring_slices(kind):
    model = _mid_grey_output(tiny("svae", sequence_model=kind).eval())
    torch.nn.init.normal_(model.sequence.out.weight, std=0.5)
    vol = phantom_slices(4)["image"]
    changed = vol.clone()
    changed[0] = changed[0].flip(-1).roll(5, -2)
    diff = (model.reconstruct(changed) - model.reconstruct(vol)).abs().flatten(1).amax(1)
    assert diff[1:].min() > 1e-4  # slices 1..3 are unchanged, their reconstructions are not


def test_test_windows_cover_every_slice_and_end_at_the_last():
    for n, w, s in [(11, 4, 2), (50, 8, 4), (9, 8, 8), (3, 8, 4), (8, 8, 4)]:
        starts = window_starts(n, w, s)
        covered = set().union(*(range(a, min(a + w, n)) for a in starts))
        assert covered == set(range(n)) and min(starts[-1] + w, n) == n


# --- DAE ----------------------------------------------------------------------------------------------
def test_dae_noise_is_coarse_with_the_given_std():
    model = tiny("dae", noise_res=4, noise_std=0.2)
    x, mask = torch.zeros(64, 1, *SIZE), torch.ones(64, 1, *SIZE)
    noise = model.corrupt(x, mask, torch.Generator().manual_seed(0))
    # bilinear interpolation lowers the marginal std below sigma but keeps its order
    assert 0.1 < float(noise.std()) <= 0.2
    a, b = noise[..., :, :-1].flatten(), noise[..., :, 1:].flatten()
    assert float(torch.corrcoef(torch.stack([a, b]))[0, 1]) > 0.9  # white noise would give ~0


def test_cyclic_shift_translates_the_whole_batch_alike():
    noise = torch.randn(3, 1, 8, 8)
    shifted = random_cyclic_shift(noise, torch.Generator().manual_seed(3))
    matches = [(dy, dx) for dy in range(8) for dx in range(8)
               if torch.equal(torch.roll(noise, (dy, dx), (-2, -1)), shifted)]
    assert len(matches) == 1


def test_dae_corrupts_only_inside_the_brain_mask():
    batch = phantom_slices(4)
    noisy = tiny("dae").corrupt(batch["image"], batch["mask"])
    outside = batch["mask"] == 0
    assert torch.equal(noisy[outside], batch["image"][outside])
    assert (noisy - batch["image"])[~outside].abs().mean() > 0.01


# --- f-AnoGAN -----------------------------------------------------------------------------------------
def test_gradient_penalty_of_a_linear_critic():
    w = torch.randn(1, 1, 4, 4)
    critic = lambda x: (x * w).flatten(1).sum(1)  # noqa: E731  gradient = w everywhere
    real, fake = torch.rand(5, 1, 4, 4), torch.rand(5, 1, 4, 4)
    assert float(gradient_penalty(critic, real, fake)) == pytest.approx((float(w.norm()) - 1) ** 2, rel=1e-5)


def _params(module):
    return torch.cat([p.detach().flatten().clone() for p in module.parameters()])


def test_fanogan_runs_both_phases_and_the_encoder_lowers_izif():
    model, batch = tiny("fanogan", gan_steps=60, lr=None), phantom_slices(8)
    enc, gen0, crit0 = _params(model.encoder), _params(model.generator), _params(model.critic)
    gan_logs = train(model, batch, 60, lr=1e-3)  # phase 1: WGAN-GP, the encoder untouched
    assert all(d["phase"] == 0.0 and math.isfinite(d["wasserstein"]) for d in gan_logs)
    gen, crit = _params(model.generator), _params(model.critic)
    assert torch.equal(_params(model.encoder), enc) and not torch.equal(gen, gen0) and not torch.equal(crit, crit0)
    assert model.eval().validation_loss(batch) == math.inf  # no best.pt from the GAN phase
    enc_logs = train(model, batch, 30, lr=3e-3, start=60)  # phase 2: izif, G and D frozen
    assert all(d["phase"] == 1.0 for d in enc_logs)
    assert torch.equal(_params(model.generator), gen) and torch.equal(_params(model.critic), crit)
    assert not torch.equal(_params(model.encoder), enc)
    first, last = np.mean([d["loss"] for d in enc_logs[:3]]), np.mean([d["loss"] for d in enc_logs[-3:]])
    assert last < 0.9 * first, (first, last)
    assert math.isfinite(model.eval().validation_loss(batch))


# --- Thresh -------------------------------------------------------------------------------------------
def test_thresh_is_the_masked_intensity_deterministic_and_bounded():
    batch = phantom_slices(6)
    x = batch["image"] + 0.05 * torch.randn_like(batch["image"])  # values slightly outside [0, 1] too
    for polarity in (1, -1):
        model = tiny("thresh", polarity=polarity)
        assert not model.trainable
        amap = model.anomaly_map(x, batch["mask"])
        assert torch.equal(amap, model.anomaly_map(x, batch["mask"]))
        assert float(amap.min()) >= 0.0 and float(amap.max()) <= 1.0
        assert torch.all(amap[batch["mask"] == 0] == 0)
        inside = batch["mask"] > 0
        expected = x.clamp(0, 1) if polarity == 1 else 1 - x.clamp(0, 1)
        torch.testing.assert_close(amap[inside], expected[inside])
        torch.testing.assert_close((x - model.reconstruct(x, batch["mask"])).abs(), amap)


def test_thresh_equalisation_is_the_empirical_cdf_of_brain_voxels():
    batch = phantom_slices(6)
    x = (batch["image"] + 0.05 * torch.rand_like(batch["image"])) * batch["mask"]
    model = tiny("thresh", equalize=True)
    assert model.needs_whole_volume
    inside = batch["mask"] > 0
    values = x[inside].numpy()
    expected = rankdata(values, method="max") / values.size
    np.testing.assert_allclose(model.anomaly_map(x, batch["mask"])[inside].numpy(), expected, rtol=1e-6)


def test_thresh_cannot_be_trained_and_rejects_bad_polarity():
    with pytest.raises(RuntimeError, match="nothing to train"):
        tiny("thresh").loss(phantom_slices(2))
    with pytest.raises(ValueError, match="polarity"):
        tiny("thresh", polarity=0)
