"""perceptual: Med3D ResNet with the published key names, LPIPS distance, missing weights -> labelled substitute."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from cddpm_lib import perceptual as P


def _published_keys_resnet10() -> set[str]:
    """Parameter/buffer names of Med3D's resnet_10 (shortcut B) release, written out from its naming scheme."""
    bn = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")
    keys = {"conv1.weight", *(f"bn1.{b}" for b in bn)}
    for i in range(1, 5):
        block = f"layer{i}.0"
        keys |= {f"{block}.conv1.weight", f"{block}.conv2.weight"}
        keys |= {f"{block}.bn1.{b}" for b in bn} | {f"{block}.bn2.{b}" for b in bn}
        if i > 1:  # 64 -> 128 -> 256 -> 512 channels need a projection
            keys |= {f"{block}.downsample.0.weight"} | {f"{block}.downsample.1.{b}" for b in bn}
    return keys


def _randomised(net: nn.Module) -> nn.Module:
    torch.manual_seed(0)
    with torch.no_grad():
        for name, t in net.state_dict().items():
            if t.dtype.is_floating_point:
                t.copy_(torch.rand_like(t) + 0.5 if "running_var" in name else torch.randn_like(t) * 0.1)
    return net.eval()


def test_resnet10_has_published_key_names():
    assert set(P.MedicalNetResNet(10, "B").state_dict()) == _published_keys_resnet10()


def test_shortcut_a_has_no_projection_parameters():
    keys = P.MedicalNetResNet(18, "A").state_dict()
    assert not any("downsample" in k for k in keys)
    assert "layer1.1.conv2.weight" in keys


@pytest.mark.parametrize("depth,shortcut", [(10, "B"), (18, "A")])
def test_roundtrip_of_a_med3d_style_checkpoint(tmp_path, depth, shortcut):
    net = _randomised(P.MedicalNetResNet(depth, shortcut))
    state = {f"module.{k}": v for k, v in net.state_dict().items()}  # DataParallel, as the release
    state["module.conv_seg.0.weight"] = torch.zeros(512, 32, 2, 2, 2)  # segmentation head: ignored
    path = tmp_path / f"resnet_{depth}.pth"
    torch.save({"state_dict": state}, path)
    loaded = P.load_medicalnet(path)
    assert (loaded.depth, loaded.shortcut) == (depth, shortcut)
    x = torch.rand(1, 1, 8, 16, 16)
    with torch.no_grad():
        for a, b in zip(net.forward_features(x), loaded.forward_features(x)):
            torch.testing.assert_close(a, b)


def test_feature_maps_follow_med3d_strides():
    feats = P.MedicalNetResNet(10, "B").eval().forward_features(torch.rand(1, 1, 16, 32, 32))
    assert [f.shape[1] for f in feats] == [64, 64, 128, 256, 512]
    assert [tuple(f.shape[2:]) for f in feats] == [(8, 16, 16), (4, 8, 8), (2, 4, 4), (2, 4, 4), (2, 4, 4)]


def test_wrong_checkpoint_is_rejected(tmp_path):
    path = tmp_path / "other.pth"
    torch.save({"conv1.weight": torch.zeros(64, 1, 7, 7, 7), "layer1.0.conv1.weight": torch.zeros(1)}, path)
    with pytest.raises(ValueError, match="not a Med3D ResNet"):
        P.load_medicalnet(path)


def _volumes():
    rng = np.random.default_rng(0)
    img = rng.random((16, 16, 8)).astype(np.float32)
    mask = np.zeros_like(img)
    mask[2:14, 2:14, 1:7] = 1
    return img * mask, mask


def test_lpips_zero_for_identical_and_positive_otherwise():
    net = _randomised(P.MedicalNetResNet(10, "B"))
    img, mask = _volumes()
    assert P.lpips_distance(net, img, img.copy(), mask) == pytest.approx(0.0, abs=1e-10)
    noisy = np.clip(img + 0.2 * np.random.default_rng(1).random(img.shape), 0, 1) * mask
    d = P.lpips_distance(net, img, noisy, mask)
    assert d > 0
    assert d == pytest.approx(P.lpips_distance(net, noisy, img, mask), rel=0.5)  # roughly symmetric


def test_feature_distance_matches_direct_formula():
    torch.manual_seed(0)
    a, b = [torch.randn(2, 3, 4, 5)], [torch.randn(2, 3, 4, 5)]
    na = a[0] / a[0].norm(dim=1, keepdim=True)
    nb = b[0] / b[0].norm(dim=1, keepdim=True)
    expected = ((na - nb) ** 2).sum(1).mean(dim=(1, 2))
    torch.testing.assert_close(P.feature_distance(a, b), expected)


def test_missing_weights_message_and_error(tmp_path, monkeypatch):
    monkeypatch.delenv(P.WEIGHTS_ENV, raising=False)
    assert P.medicalnet_weights_path(None) is None
    assert "n/a — MedicalNet weights not found at" in P.missing_weights_message(None)
    with pytest.raises(P.WeightsNotFound, match="not found at"):
        P.load_medicalnet(tmp_path / "absent.pth")
    monkeypatch.setenv(P.WEIGHTS_ENV, str(tmp_path / "w.pth"))
    assert P.medicalnet_weights_path(None) == tmp_path / "w.pth"


def test_missing_weights_without_encoder_gives_nothing(tmp_path, monkeypatch):
    monkeypatch.delenv(P.WEIGHTS_ENV, raising=False)
    metric = P.resolve_perceptual(None, tmp_path / "encoder.pt")
    assert metric.kind == "none" and "n/a" in metric.note and "SSL encoder not found" in metric.note
    img, mask = _volumes()
    assert np.isnan(metric.distance(img, img, mask))


def test_missing_weights_give_labelled_substitute(tmp_path, monkeypatch):
    class TinyEncoder(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Conv2d(1, 4, 3, padding=1), nn.Conv2d(4, 8, 3, stride=2, padding=1)

        def forward_features(self, x):
            h = torch.relu(self.a(x))
            return [h, torch.relu(self.b(h))]

    monkeypatch.delenv(P.WEIGHTS_ENV, raising=False)
    monkeypatch.setattr(P, "load_ssl_encoder", lambda path: TinyEncoder())
    enc_path = tmp_path / "encoder.pt"
    enc_path.write_bytes(b"x")
    metric = P.resolve_perceptual(None, enc_path)
    assert metric.kind == "substitute"
    assert metric.label == P.SUBSTITUTE_LABEL and "not LPIPS" in metric.label
    assert "NOT LPIPS" in metric.note and "n/a — MedicalNet weights not found" in metric.note
    img, mask = _volumes()
    assert metric.distance(img, img, mask) == pytest.approx(0.0, abs=1e-10)
    assert metric.distance(img, np.clip(img + 0.3, 0, 1) * mask, mask) > 0


def test_weights_present_give_lpips(tmp_path, monkeypatch):
    net = _randomised(P.MedicalNetResNet(10, "B"))
    path = tmp_path / "resnet_10.pth"
    torch.save({"state_dict": {f"module.{k}": v for k, v in net.state_dict().items()}}, path)
    monkeypatch.setenv(P.WEIGHTS_ENV, str(path))
    metric = P.resolve_perceptual(None, None)
    assert metric.kind == "lpips" and metric.label == P.LPIPS_LABEL
