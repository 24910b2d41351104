"""DDPM, cDDPM and pDDPM behind the model interface (paper §3.1, §3.2, §4.4)."""
from __future__ import annotations

import pytest
import torch

from cddpm_lib.encoder import ResNetEncoder, load_encoder_weights, save_encoder_weights
from cddpm_lib.models import build_model, load_model
from cddpm_lib.models.pddpm import patch_masks, patch_starts, stitch

SIZE = (16, 16)
UNET = dict(model_channels=8, channel_mult=(1, 2), num_res_blocks=1, num_heads=2)
ENCODER = dict(encoder_depth=18, encoder_width=8, cond_dim=16)


def _build(name: str, **kwargs):
    extra = ENCODER if name == "cddpm" else {}
    torch.manual_seed(0)
    model = build_model(name, image_size=SIZE, **{**UNET, **extra, **kwargs})
    _perturb(model)
    return model.eval()


def _perturb(module: torch.nn.Module) -> None:
    """Random weights for the zero-initialised output layers, so reconstructions depend on every input."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in module.parameters():
            if torch.all(p == 0):
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)


def _slices(n: int = 4, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    image = torch.rand(n, 1, *SIZE, generator=g)
    mask = torch.zeros_like(image)
    mask[..., 2:14, 3:13] = 1
    return {"image": image * mask, "mask": mask}


@pytest.mark.parametrize("name", ["ddpm", "cddpm", "pddpm"])
def test_loss_reconstruction_and_sample_shapes(name):
    model = _build(name)
    batch = _slices()
    loss = model.loss(batch)
    assert loss.ndim == 0 and float(loss.detach()) > 0
    assert model.reconstruct(batch["image"], batch["mask"], t_test=[250, 500, 750]).shape == (4, 1, *SIZE)
    assert model.anomaly_map(batch["image"], batch["mask"]).min() >= 0
    assert model.sample(x_start=batch["image"][:2], t_start=100, steps=3).shape == (2, 1, *SIZE)


@pytest.mark.parametrize("name", ["ddpm", "cddpm", "pddpm"])
def test_max_batch_does_not_change_results(name):
    model = _build(name)
    x = _slices(5)["image"]
    full = model.reconstruct(x, t_test=[250, 750], max_batch=None, generator=torch.Generator().manual_seed(3))
    part = model.reconstruct(x, t_test=[250, 750], max_batch=3, generator=torch.Generator().manual_seed(3))
    assert torch.allclose(full, part, atol=1e-5)


@pytest.mark.parametrize("name", ["ddpm", "cddpm", "pddpm"])
def test_ensemble_is_the_mean_of_single_t_reconstructions(name):
    model = _build(name)
    x = _slices(3)["image"]
    ens = model.reconstruct(x, t_test=[250, 500, 750], generator=torch.Generator().manual_seed(4))
    singles = torch.stack([model.reconstruct(x, t_test=t, generator=torch.Generator().manual_seed(4))
                           for t in (250, 500, 750)])
    assert torch.allclose(ens, singles.mean(0), atol=1e-6)


@pytest.mark.parametrize("name", ["ddpm", "cddpm", "pddpm"])
def test_checkpoint_round_trip_through_load_model(name, tmp_path):
    model = _build(name)
    path = tmp_path / "best.pt"
    torch.save({"model_name": model.name, "hparams": model.hparams, "model": model.state_dict()}, path)
    loaded = load_model(path)
    assert type(loaded) is type(model) and loaded.hparams == model.hparams
    x = _slices(2)["image"]
    a = model.reconstruct(x, t_test=500, generator=torch.Generator().manual_seed(0))
    b = loaded.reconstruct(x, t_test=500, generator=torch.Generator().manual_seed(0))
    assert torch.equal(a, b)


def test_checkpoint_from_before_the_signal_range_loads_as_it_was_trained(tmp_path):
    """Checkpoints without ``signal_range`` were trained on images in [0, 1]: they are rebuilt so, not as today's
    default [−1, 1]."""
    model = _build("cddpm")
    assert model.hparams["signal_range"] == (-1.0, 1.0)
    old = {k: v for k, v in model.hparams.items() if k != "signal_range"}
    torch.save({"model_name": "cddpm", "hparams": old, "model": model.state_dict()}, tmp_path / "old.pt")
    loaded = load_model(tmp_path / "old.pt")
    assert loaded.diffusion.signal_range == (0.0, 1.0) and loaded.hparams["signal_range"] == (0.0, 1.0)
    with pytest.raises(ValueError, match="signal_range"):
        build_model("ddpm", image_size=SIZE, signal_range=(0.0, 0.0), **UNET)


def test_gradients_reach_the_encoder_through_film():
    model = _build("cddpm").train()
    model.loss(_slices()).backward()
    grads = [p.grad for p in model.encoder.parameters()]
    assert all(g is not None for g in grads)
    assert sum(float(g.abs().sum()) for g in grads) > 0


def test_cddpm_encoder_sees_the_clean_input_or_the_conditioning_image():
    model = _build("cddpm")
    batch = _slices(2)
    x = batch["image"]
    same = model.reconstruct(x, t_test=500, conditioning_image=x.clone(), generator=torch.Generator().manual_seed(0))
    default = model.reconstruct(x, t_test=500, generator=torch.Generator().manual_seed(0))
    other = model.reconstruct(x, t_test=500, conditioning_image=x ** 2, generator=torch.Generator().manual_seed(0))
    assert torch.equal(same, default)
    assert not torch.allclose(other, default)
    with pytest.raises(ValueError, match="conditioning_image"):
        model.reconstruct(x, conditioning_image=x[:1])
    with pytest.raises(ValueError, match="only for the conditioned model"):
        _build("ddpm").reconstruct(x, conditioning_image=x)


def test_cddpm_exposes_its_encoder_for_spark_weights(tmp_path):
    model = _build("cddpm")
    assert isinstance(model.encoder, ResNetEncoder)
    donor = ResNetEncoder(18, base_width=8, out_dim=16)
    save_encoder_weights(donor, tmp_path / "encoder.pt")
    load_encoder_weights(model.encoder, tmp_path / "encoder.pt")
    assert torch.equal(model.encoder.fc.weight, donor.fc.weight)


def test_cddpm_sampling_needs_a_conditioning_image():
    model = _build("cddpm")
    with pytest.raises(ValueError, match="conditioning_image"):
        model.sample(n=1)
    x = _slices(2)["image"]
    out = model.sample(conditioning_image=x, method="ddpm", t_start=5, generator=torch.Generator().manual_seed(0))
    assert out.shape == x.shape


def test_tiny_cddpm_overfits_eight_slices():
    torch.manual_seed(0)
    model = build_model("cddpm", image_size=SIZE, model_channels=16, channel_mult=(1, 2), num_res_blocks=1,
                        mid_attention=False, encoder_depth=18, encoder_width=16, cond_dim=32, noise="gaussian")
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, 16), torch.linspace(-1, 1, 16), indexing="ij")
    head = ((xx / 0.85) ** 2 + (yy / 0.95) ** 2 < 1).float()  # zero background, as a brain slice
    blobs = []
    for k in range(8):
        angle = torch.tensor(0.8 * k)
        disc = ((xx - 0.5 * torch.cos(angle)) ** 2 + (yy - 0.5 * torch.sin(angle)) ** 2 < 0.25).float()
        blobs.append((0.3 + 0.4 * disc + 0.05 * k * xx) * head)
    batch = {"image": torch.stack(blobs)[:, None], "mask": torch.ones(8, 1, 16, 16)}

    def fixed_loss() -> float:
        with torch.no_grad():
            return float(model.loss(batch, generator=torch.Generator().manual_seed(0)))

    before = fixed_loss()
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    for step in range(500):
        model.training_step(batch, [opt], step)
    assert fixed_loss() < before / 10  # measured: 17x (2 threads; 11x after 400 steps, 34x after 600)


def test_mask_loss_restricts_the_loss_to_the_brain():
    model = _build("ddpm", mask_loss=True)
    batch = _slices()
    target = model.diffusion.to_signal(batch["image"])  # x0 as the network predicts it (signal range)
    model.denoise = lambda x_t, t, cond=None: target + 5 * (1 - batch["mask"])  # perfect inside the brain
    assert float(model.loss(batch)) == 0.0
    with pytest.raises(KeyError, match="mask"):
        model.loss({"image": batch["image"]})


def test_pddpm_patch_grid_covers_every_pixel_exactly_once():
    for size, fraction in (((96, 96), 0.5), ((64, 64), 0.5), ((16, 16), 0.25)):
        patch = tuple(round(s * fraction) for s in size)
        masks = patch_masks(size, patch, patch)
        assert masks.shape[0] == round(1 / fraction) ** 2
        assert torch.equal(masks.sum(0), torch.ones(1, *size))
    assert patch_starts(96, 48, 48) == [0, 48]
    assert patch_starts(10, 4, 4) == [0, 4, 6]                 # last patch moved inwards


def test_pddpm_stitches_each_patch_from_its_own_pass():
    model = _build("pddpm")
    x = _slices(3)["image"]
    model.denoise = lambda x_in, t, cond=None: x_in      # returns the (partly noised) input
    g = torch.Generator().manual_seed(2)
    out = model.reconstruct(x, t_test=500, generator=g)
    # every pixel must come from the pass in which its own patch was noised: the fully noised x_t (in the signal
    # range, mapped back to the images' scale)
    d = model.diffusion
    noised = d.q_sample(d.to_signal(x), torch.full((3,), 500),
                        d.test_noise(x, [500], torch.Generator().manual_seed(2)))
    assert torch.allclose(out, d.from_signal(noised), atol=1e-6)


def test_pddpm_stitch_averages_overlapping_patches():
    masks = patch_masks((4, 4), (2, 4), (1, 4))                # 3 row bands with stride 1: middle rows twice
    values = torch.arange(1.0, 4.0).reshape(3, 1, 1, 1, 1).expand(3, 1, 1, 4, 4)
    out = stitch(values, masks)[0, 0]
    assert torch.allclose(out[:, 0], torch.tensor([1.0, 1.5, 2.5, 3.0]))


def test_pddpm_loss_is_computed_on_the_noised_patch_only():
    model = _build("pddpm")
    batch = _slices()
    x0 = model.diffusion.to_signal(batch["image"])
    # perfect where the input was noised, wrong (by 5) where it was left clean
    model.denoise = lambda x_in, t, cond=None: x0 + 5 * (x_in == x0).float()
    assert float(model.loss(batch)) == 0.0


def test_invalid_hyper_parameters_and_inputs_are_rejected():
    with pytest.raises(TypeError, match="encoder_depth"):
        build_model("ddpm", image_size=SIZE, encoder_depth=18, **UNET)
    with pytest.raises(TypeError, match="unknown hyper-parameter"):
        build_model("cddpm", image_size=SIZE, patch_fraction=0.5, **UNET)
    with pytest.raises(ValueError, match="divisible by 4"):
        build_model("ddpm", image_size=(18, 16), model_channels=8, num_res_blocks=1)
    with pytest.raises(ValueError, match="patch_fraction"):
        build_model("pddpm", image_size=SIZE, patch_fraction=1.5, **UNET)
    model = _build("ddpm")
    with pytest.raises(ValueError, match=r"expected slices \[B, 1, 16, 16\]"):
        model.reconstruct(torch.rand(2, 1, 32, 32))
