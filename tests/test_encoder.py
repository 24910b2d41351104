"""F_enc of paper §3.2: ResNet layouts, stage strides, weight hand-over from SparK pre-training."""
from __future__ import annotations

import pytest
import torch

from cddpm_lib.encoder import BasicBlock, Bottleneck, ResNetEncoder, load_encoder_weights, save_encoder_weights


@pytest.mark.parametrize("depth,block,n_blocks", [(18, BasicBlock, 8), (34, BasicBlock, 16), (50, Bottleneck, 16)])
def test_stage_layout_and_strides(depth, block, n_blocks):
    enc = ResNetEncoder(depth, base_width=8, out_dim=16)
    assert sum(type(m) is block for m in enc.modules()) == n_blocks
    feats = enc.forward_features(torch.rand(2, 1, 64, 64))
    expansion = block.expansion
    assert [f.shape[1] for f in feats] == enc.stage_channels == [8 * expansion * 2 ** i for i in range(4)]
    assert [f.shape[-1] for f in feats] == [16, 8, 4, 2]          # strides 4, 8, 16, 32
    assert enc(torch.rand(2, 1, 64, 64)).shape == (2, 16)


@pytest.mark.parametrize("depth,n_params", [(18, 11_689_512), (50, 25_557_032)])
def test_batchnorm_variant_has_the_reference_resnet_parameter_count(depth, n_params):
    # torchvision's resnet18 / resnet50 (RGB input, 1000 classes) have exactly these many parameters
    enc = ResNetEncoder(depth, in_channels=3, out_dim=1000, norm="batch")
    assert sum(p.numel() for p in enc.parameters()) == n_params


def test_group_norm_keeps_at_least_16_channels_per_group():
    enc = ResNetEncoder(18, base_width=8)
    norms = [m for m in enc.modules() if isinstance(m, torch.nn.GroupNorm)]
    assert norms and all(m.num_channels // m.num_groups >= 8 for m in norms)
    assert all(m.num_channels // m.num_groups >= 16 for m in norms if m.num_channels >= 16)
    enc.train()
    assert enc(torch.rand(1, 1, 32, 32)).shape == (1, 128)  # 1×1 last stage, batch of one


def test_save_and_load_round_trip(tmp_path):
    a = ResNetEncoder(18, base_width=8, out_dim=12)
    b = ResNetEncoder(18, base_width=8, out_dim=12)
    path = tmp_path / "spark" / "encoder.pt"
    save_encoder_weights(a, path, epoch=3)
    ckpt = torch.load(path, weights_only=True)
    assert ckpt["epoch"] == 3 and ckpt["hparams"]["depth"] == 18
    load_encoder_weights(b, path)
    x = torch.rand(2, 1, 32, 32)
    assert torch.equal(a(x), b(x))


def test_loading_into_another_architecture_names_the_difference(tmp_path):
    path = tmp_path / "encoder.pt"
    save_encoder_weights(ResNetEncoder(18, base_width=8), path)
    with pytest.raises(ValueError, match="depth=18 vs 34"):
        load_encoder_weights(ResNetEncoder(34, base_width=8), path)
    with pytest.raises(FileNotFoundError, match="SparK"):
        load_encoder_weights(ResNetEncoder(18, base_width=8), tmp_path / "missing.pt")


def test_invalid_arguments_are_rejected():
    with pytest.raises(ValueError, match="depth"):
        ResNetEncoder(101)
    with pytest.raises(ValueError, match="norm"):
        ResNetEncoder(18, norm="layer")
