"""ADM U-Net with FiLM conditioning (paper §3.2): shapes, embeddings, FiLM identity, input checks."""
from __future__ import annotations

import math

import pytest
import torch

import torch.nn.functional as F

from cddpm_lib.unet import (AttentionBlock, ResBlock, UNet, downsample2x, film, group_norm, norm_film,
                             timestep_embedding, upsample2x)

TINY = dict(model_channels=8, channel_mult=(1, 2, 2), num_res_blocks=1, num_heads=2)


def _perturb(module: torch.nn.Module, seed: int = 0) -> None:
    """Give the zero-initialised output layers random weights so every path carries signal."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            if torch.all(p == 0):
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)


@pytest.mark.parametrize("kwargs", [
    dict(),
    dict(attention_levels=(1, 2), mid_attention=False),
    dict(resblock_updown=False, use_scale_shift_norm=False, dropout=0.1),
    dict(channel_mult=(1, 2), num_res_blocks=2),
    dict(cond_dim=6),
])
def test_output_shape_equals_input_shape(kwargs):
    net = UNet(**{**TINY, **kwargs})
    x = torch.rand(3, 1, 16, 24)
    cond = torch.rand(3, 6) if "cond_dim" in kwargs else None
    assert net(x, torch.tensor([1, 500, 1000]), cond).shape == (3, 1, 16, 24)


def test_plain_unet_without_time_or_conditioning():
    net = UNet(in_channels=2, out_channels=3, use_time=False, mid_attention=False, **TINY)
    assert net.time_mlp is None
    assert net(torch.rand(2, 2, 8, 8)).shape == (2, 3, 8, 8)


def test_paper_width_has_the_adm_layout():
    net = UNet()  # 128·(1, 2, 2), 3 res blocks, attention in the middle block only
    attn = [m for m in net.modules() if isinstance(m, AttentionBlock)]
    res = [m for m in net.modules() if isinstance(m, ResBlock)]
    assert len(attn) == 1 and attn[0].norm.num_channels == 256
    # 3 levels × 3 blocks down + 2 residual down-samplers + 2 middle + 3 × 4 up + 2 residual up-samplers
    assert len(res) == 9 + 2 + 2 + 12 + 2


def test_sinusoidal_embedding_values():
    emb = timestep_embedding(torch.tensor([0, 7]), 8)
    assert torch.allclose(emb[0], torch.tensor([1.0] * 4 + [0.0] * 4))
    freqs = torch.exp(-math.log(10000) * torch.arange(4) / 4)
    assert torch.allclose(emb[1, :4], torch.cos(7 * freqs)) and torch.allclose(emb[1, 4:], torch.sin(7 * freqs))


def test_film_with_zero_gamma_and_beta_is_identity():
    f = torch.randn(2, 5, 4, 4)
    assert torch.equal(film(f, torch.zeros(2, 5), torch.zeros(2, 5)), f)
    out = film(f, torch.ones(2, 5), torch.full((2, 5), 3.0))
    assert torch.allclose(out, 2 * f + 3)


def test_fused_norm_film_equals_groupnorm_then_film():
    """The one-call GroupNorm + FiLM gives the paper's f' = GroupNorm(f) · (γ + 1) + β, values and gradients."""
    g = torch.Generator().manual_seed(0)
    norm = group_norm(12)
    with torch.no_grad():  # non-trivial affine of the norm itself
        norm.weight.copy_(torch.randn(12, generator=g))
        norm.bias.copy_(torch.randn(12, generator=g))
    f = torch.randn(3, 12, 5, 7, generator=g, requires_grad=True)
    gamma = torch.randn(3, 12, generator=g, requires_grad=True)
    beta = torch.randn(3, 12, generator=g, requires_grad=True)
    fused, reference = norm_film(norm, f, gamma, beta), film(norm(f), gamma, beta)
    assert torch.allclose(fused, reference, atol=1e-5)
    w = torch.randn(fused.shape, generator=g)
    grads_fused = torch.autograd.grad((fused * w).sum(), [f, gamma, beta, norm.weight, norm.bias])
    grads_ref = torch.autograd.grad((reference * w).sum(), [f, gamma, beta, norm.weight, norm.bias])
    for a, b in zip(grads_fused, grads_ref):
        assert torch.allclose(a, b, atol=1e-4)


def test_attention_block_matches_an_explicit_softmax_reference():
    block = AttentionBlock(8, num_heads=2)
    _perturb(block)
    x = torch.randn(2, 8, 4, 6)
    b, c, h, w = x.shape
    qkv = torch.nn.functional.conv1d(block.norm(x).reshape(b, c, h * w), block.qkv.weight, block.qkv.bias)
    q, k, v = qkv.reshape(b, 3, 2, c // 2, h * w).unbind(1)  # [b, heads, d, hw]
    attn = torch.softmax(q.transpose(-1, -2) @ k / math.sqrt(c // 2), dim=-1)  # [b, heads, hw, hw]
    out = (v @ attn.transpose(-1, -2)).reshape(b, c, h * w)
    expected = x + torch.nn.functional.conv1d(out, block.proj.weight, block.proj.bias).reshape(b, c, h, w)
    assert torch.allclose(block(x), expected, atol=1e-5)


def test_resblock_with_zero_projection_ignores_the_conditioning():
    block = ResBlock(4, 6, emb_dim=10)
    _perturb(block)
    torch.nn.init.zeros_(block.emb_proj[1].weight)
    torch.nn.init.zeros_(block.emb_proj[1].bias)  # γ = β = 0 for every embedding
    x = torch.randn(2, 4, 8, 8)
    assert torch.allclose(block(x, torch.randn(2, 10)), block(x, torch.randn(2, 10)))


def test_conditioning_vector_changes_the_output():
    net = UNet(cond_dim=4, **TINY)
    _perturb(net)
    x, t = torch.rand(2, 1, 16, 16), torch.tensor([500, 500])
    assert not torch.allclose(net(x, t, torch.zeros(2, 4)), net(x, t, torch.ones(2, 4)))


def test_embedding_is_concat_of_context_and_time():
    net = UNet(cond_dim=4, **TINY)
    c = torch.rand(2, 4)
    emb = net.embedding(2, torch.tensor([3, 9]), c)
    assert emb.shape == (2, 8) and torch.equal(emb[:, :4], c)


def test_missing_or_unexpected_inputs_are_rejected():
    net = UNet(**TINY)
    with pytest.raises(ValueError, match="expected t"):
        net(torch.rand(1, 1, 16, 16))
    with pytest.raises(ValueError, match="cond_dim=None"):
        net(torch.rand(1, 1, 16, 16), torch.tensor([1]), torch.rand(1, 4))
    with pytest.raises(ValueError, match="cond of shape"):
        UNet(cond_dim=4, **TINY)(torch.rand(1, 1, 16, 16), torch.tensor([1]))
    with pytest.raises(ValueError, match="divisible by 4"):
        net(torch.rand(1, 1, 18, 16), torch.tensor([1]))
    with pytest.raises(ValueError, match="attention_levels"):
        UNet(attention_levels=(3,), **TINY)


def test_group_norm_uses_a_divisor_of_the_width():
    assert group_norm(128).num_groups == 32
    assert group_norm(24).num_groups == 24
    assert group_norm(40).num_groups == 20


def test_resampling_equals_torch_interpolate_and_avg_pool():
    """The CPU fast paths give PyTorch's nearest ×2 upsampling exactly and its 2 × 2 average pool to rounding,
    forward and backward (analytic gradients checked numerically, also the second derivative)."""
    x = torch.randn(3, 5, 8, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(0), requires_grad=True)
    up, down = upsample2x(x), downsample2x(x)
    assert torch.equal(up, F.interpolate(x, scale_factor=2, mode="nearest"))
    assert torch.allclose(down, F.avg_pool2d(x, 2), atol=1e-14, rtol=0)
    w_up, w_down = torch.randn_like(up), torch.randn_like(down)
    g_up, = torch.autograd.grad((up * w_up).sum(), x)
    g_down, = torch.autograd.grad((down * w_down).sum(), x)
    assert torch.allclose(g_up, w_up.reshape(3, 5, 8, 2, 6, 2).sum((3, 5)), atol=1e-14)
    assert torch.equal(g_down, F.interpolate(w_down, scale_factor=2, mode="nearest") / 4)
    small = x[:1, :2, :4, :4].detach().clone().requires_grad_()
    for fn in (upsample2x, downsample2x):
        assert torch.autograd.gradcheck(fn, (small,))
        assert torch.autograd.gradgradcheck(fn, (small,))


def test_resampling_in_bfloat16_and_in_the_fallback_layouts():
    """bfloat16 keeps its dtype (the 2 × 2 sum accumulated in float32, one rounding as avg_pool2d); a channels-last
    or non-contiguous input takes PyTorch's kernels and keeps its layout."""
    g = torch.Generator().manual_seed(1)
    xb = torch.randn(2, 4, 8, 8, generator=g).bfloat16()
    assert downsample2x(xb).dtype == torch.bfloat16
    assert torch.equal(downsample2x(xb), F.avg_pool2d(xb, 2))
    assert torch.equal(upsample2x(xb), F.interpolate(xb, scale_factor=2, mode="nearest"))
    cl = torch.randn(2, 4, 8, 8, generator=g).contiguous(memory_format=torch.channels_last)
    for fn, ref in ((upsample2x, F.interpolate(cl, scale_factor=2, mode="nearest")),
                    (downsample2x, F.avg_pool2d(cl, 2))):
        out = fn(cl)
        assert torch.equal(out, ref) and out.is_contiguous(memory_format=torch.channels_last)
    strided = torch.randn(2, 4, 8, 16, generator=g)[..., ::2]
    assert torch.equal(upsample2x(strided), F.interpolate(strided, scale_factor=2, mode="nearest"))
    assert torch.allclose(downsample2x(strided), F.avg_pool2d(strided, 2))


def test_unet_gradients_match_a_unet_on_torch_resampling(monkeypatch):
    """Swapping the fast resampling for PyTorch's kernels changes neither the output nor any parameter gradient of
    a U-Net with residual up/down-sampling (beyond float32 rounding)."""
    import cddpm_lib.unet as unet_module
    torch.manual_seed(0)
    net = UNet(cond_dim=6, **TINY)
    _perturb(net)
    x, t, c = torch.randn(2, 1, 16, 16), torch.tensor([3, 700]), torch.randn(2, 6)

    def run():
        net.zero_grad(set_to_none=True)
        out = net(x, t, c)
        (out ** 2).sum().backward()
        return out.detach(), [p.grad.clone() for p in net.parameters()]

    fast_out, fast_grads = run()
    calls = []
    monkeypatch.setattr(unet_module, "upsample2x",
                        lambda v: calls.append("up") or F.interpolate(v, scale_factor=2, mode="nearest"))
    monkeypatch.setattr(unet_module, "downsample2x", lambda v: calls.append("down") or F.avg_pool2d(v, 2))
    ref_out, ref_grads = run()
    assert calls.count("up") == calls.count("down") == 4  # two resampling blocks each way, features and skip
    assert torch.allclose(fast_out, ref_out, atol=1e-5)
    for a, b in zip(fast_grads, ref_grads):
        assert torch.allclose(a, b, atol=1e-4, rtol=1e-4)


def test_channels_last_unet_gives_the_nchw_result_without_folding_copies(monkeypatch):
    """A channels-last network and batch (the GPU benchmark's layout) compute what the NCHW one does; their FiLM
    runs after the norm, since folding the batch into the channels of a channels-last map would copy it."""
    import cddpm_lib.unet as unet_module
    torch.manual_seed(0)
    net = UNet(cond_dim=6, **TINY)
    _perturb(net)
    x, t, c = torch.randn(2, 1, 16, 16), torch.tensor([3, 700]), torch.randn(2, 6)
    with torch.no_grad():
        ref = net(x, t, c)
    folded = []
    real = unet_module.norm_film
    monkeypatch.setattr(unet_module, "norm_film", lambda *a: folded.append(1) or real(*a))
    net = net.to(memory_format=torch.channels_last)
    with torch.no_grad():
        out = net(x.contiguous(memory_format=torch.channels_last), t, c)
    assert torch.allclose(out, ref, atol=1e-5)
    assert not folded
    with torch.no_grad():
        net.to(memory_format=torch.contiguous_format)(x, t, c)  # NCHW again: every block folds
    assert len(folded) == sum(isinstance(m, unet_module.ResBlock) for m in net.modules())
