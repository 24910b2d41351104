"""conditioning: contrast x^cl, width crop, and the Fig. 2 grid with stand-in models (paper §4.5.2)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from cddpm_lib import conditioning as C


class _Recorder(torch.nn.Module):
    """Stand-in diffusion model: 'reconstructs' the mean of its conditioning image (or 0.5 without one)."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def reconstruct(self, x, mask=None, t_test=500, max_batch=32, conditioning_image=None):
        self.calls.append({"t_test": t_test, "cond": None if conditioning_image is None else
                           conditioning_image.clone(), "noise": torch.rand(1).item(),
                           "autocast": torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu")})
        value = 0.5 if conditioning_image is None else float(conditioning_image.mean())
        return torch.full_like(x, value)


def test_contrast_is_power_for_arrays_and_tensors():
    x = np.linspace(0, 1, 11, dtype=np.float32)
    np.testing.assert_allclose(C.apply_contrast(x, 2.0), x**2, rtol=1e-6)
    np.testing.assert_allclose(C.apply_contrast(x, 1.0), x)
    t = torch.linspace(0, 1, 11)
    torch.testing.assert_close(C.apply_contrast(t, 0.3), t**0.3)
    assert C.apply_contrast(x, 0.7)[0] == 0 and C.apply_contrast(x, 0.7)[-1] == pytest.approx(1.0)


def test_contrast_rejects_non_positive_levels():
    with pytest.raises(ValueError, match="> 0"):
        C.apply_contrast(np.ones(3), 0.0)


def test_crop_keeps_left_fraction_of_width():
    x = torch.ones(1, 1, 10, 4)  # [B, 1, X, Y]: width is X
    half = C.crop_width(x, 0.5)
    assert half[..., :5, :].eq(1).all() and half[..., 5:, :].eq(0).all()
    assert x.eq(1).all(), "input must not be modified"
    np.testing.assert_array_equal(C.crop_width(np.ones((8, 3)), 1.0), np.ones((8, 3)))
    last = C.crop_width(np.ones((2, 10)), 0.3, axis=-1)
    assert last[:, :3].all() and not last[:, 3:].any()


def test_crop_is_left_half_in_the_figure_orientation():
    x = np.ones((8, 6))
    shown = np.rot90(C.crop_width(x, 0.5))  # as plot_conditioning displays it
    assert shown[:, :4].all() and not shown[:, 4:].any()
    with pytest.raises(ValueError, match="crop fraction"):
        C.crop_width(x, 0.0)


def test_largest_brain_slice():
    mask = np.zeros((4, 4, 5))
    mask[:2, :2, 1] = 1
    mask[:, :, 3] = 1
    assert C.largest_brain_slice(mask) == 3
    with pytest.raises(ValueError, match="empty"):
        C.largest_brain_slice(np.zeros((2, 2, 2)))


def _slice():
    rng = np.random.default_rng(0)
    img = rng.random((8, 8)).astype(np.float32)
    mask = np.zeros((8, 8), np.float32)
    mask[1:7, 1:7] = 1
    return img * mask, mask


def test_grid_shapes_and_inputs():
    img, mask = _slice()
    cddpm, ddpm = _Recorder(), _Recorder()
    grid = C.conditioning_experiment(cddpm, ddpm, img, mask, contrasts=(0.5, 2.0), crops=(0.5, 1.0))
    assert len(grid.columns) == 3 + 2 + 3
    assert all(p.shape == (2, 8, 8) for p in grid.panels.values())
    np.testing.assert_allclose(grid.panels["input x^cl"][1], (img * mask) ** 2, rtol=1e-6)
    assert np.all(grid.panels["conditioning 50 %"][:, 4:, :] == 0)
    np.testing.assert_allclose(grid.panels["conditioning 100 %"], grid.panels["input x^cl"])


def test_cddpm_sees_cropped_conditioning_and_ddpm_none():
    img, mask = _slice()
    cddpm, ddpm = _Recorder(), _Recorder()
    grid = C.conditioning_experiment(cddpm, ddpm, img, mask, contrasts=(1.0,), crops=(0.5, 1.0),
                                     t_half=500, t_full=1000)
    assert [c["t_test"] for c in cddpm.calls] == [500, 1000, 500, 1000]
    assert all(c["cond"] is not None for c in cddpm.calls)
    assert cddpm.calls[0]["cond"][..., 4:, :].eq(0).all()
    assert [c["cond"] for c in ddpm.calls] == [None] and ddpm.calls[0]["t_test"] == 1000
    # the stand-in reconstructs the conditioning mean: the 50 % crop gives a darker image
    assert grid.panels["cDDPM 50 %, t=500"].mean() < grid.panels["cDDPM 100 %, t=500"].mean()
    # one seed for every reconstruction of a row
    assert len({c["noise"] for c in cddpm.calls + ddpm.calls}) == 1


def test_grid_without_ddpm_and_bad_input():
    img, mask = _slice()
    grid = C.conditioning_experiment(_Recorder(), None, img, mask, contrasts=(1.0,), crops=(1.0,))
    assert not any(c.startswith("DDPM") for c in grid.columns)
    with pytest.raises(ValueError, match="one \\[H, W\\] slice"):
        C.conditioning_experiment(_Recorder(), None, img[None], mask, contrasts=(1.0,))


def test_plot_has_one_axis_per_panel():
    import matplotlib

    matplotlib.use("Agg")
    img, mask = _slice()
    grid = C.conditioning_experiment(_Recorder(), _Recorder(), img, mask, contrasts=(0.3, 1.0, 2.0))
    fig = C.plot_conditioning(grid)
    assert len(fig.axes) == 3 * len(grid.columns)


def test_amp_runs_the_reconstructions_under_autocast(monkeypatch):
    from cddpm_lib import runtime

    img, mask = _slice()
    cddpm = _Recorder()
    C.conditioning_experiment(cddpm, None, img, mask, contrasts=(1.0,), crops=(1.0,))
    assert [c["autocast"] for c in cddpm.calls] == [False, False]
    monkeypatch.setattr(runtime, "cpu_bf16_supported", lambda: True)  # a CPU on which bfloat16 runs
    cddpm = _Recorder()
    grid = C.conditioning_experiment(cddpm, None, img, mask, contrasts=(1.0,), crops=(1.0,), amp="bf16")
    assert [c["autocast"] for c in cddpm.calls] == [torch.bfloat16, torch.bfloat16]
    assert all(p.dtype == np.float32 for p in grid.panels.values())
    monkeypatch.setattr(runtime, "cpu_bf16_supported", lambda: False)  # cannot run here: float32
    cddpm = _Recorder()
    C.conditioning_experiment(cddpm, None, img, mask, contrasts=(1.0,), crops=(1.0,), amp="bf16")
    assert [c["autocast"] for c in cddpm.calls] == [False, False]
    with pytest.raises(ValueError, match="amp must be"):
        C.conditioning_experiment(cddpm, None, img, mask, contrasts=(1.0,), crops=(1.0,), amp="bf61")
