"""ADM-style denoising U-Net (Dhariwal & Nichol 2021) with the FiLM conditioning of cDDPM (paper §3.2).

One network serves DDPM, pDDPM and cDDPM (and, without any embedding, the DAE baseline):

- **time** (paper §3.1/§3.2): ``t -> sinusoidal embedding -> MLP I -> c_t ∈ R^d``;
- **context** (paper §3.2): ``c = F_enc(x0) ∈ R^d`` from :class:`cddpm_lib.encoder.ResNetEncoder`;
  ``c' = concat(c, c_t) ∈ R^{2d}``;
- **FiLM** in *every* residual block of level ``i``: ``MLP II: c' -> (γ, β) ∈ R^{2·C_i}`` and
  ``f' = GroupNorm(f) · (γ + 1) + β`` (``use_scale_shift_norm=True``, ADM's scale-shift norm, which is exactly
  the paper's ``f' = f ∗ (γ + 1) + β`` applied to the normalised features of the block).

Choices where the paper is silent (documented, all parameters):

- MLP II is one per residual block (ADM's ``emb_layers``: SiLU -> Linear), so every block of a level has its own
  projection of ``c'``; the paper's "at each feature level i ... in each residual block" admits this reading.
- Without conditioning (plain DDPM) ``d = 4 · model_channels`` as in ADM; with conditioning ``d = cond_dim``
  (paper: 128; the authors' code effectively 512).
- ``use_scale_shift_norm=False`` adds a projection of the embedding to the features instead (ADM's other mode).
- Attention: ``attention_levels`` (0 = full resolution) in the encoder and decoder paths, plus ``mid_attention``
  in the middle block (the authors' configuration: middle block only).
- GroupNorm uses up to 32 groups, fewer when a width is not divisible (tiny test widths).
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def group_norm(channels: int, max_groups: int = 32) -> nn.GroupNorm:
    """GroupNorm with the largest group count ``<= max_groups`` that divides ``channels``."""
    groups = min(max_groups, channels)
    while channels % groups:
        groups -= 1
    return nn.GroupNorm(groups, channels)


def zero_module(module: nn.Module) -> nn.Module:
    """Zero the parameters of ``module`` (ADM: residual branches start as identity)."""
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


def timestep_embedding(t: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
    """Sinusoidal embedding of time steps (Vaswani et al.; Ho et al. 2020), ``t: [B] -> [B, dim]``.

    ``emb[:, k] = cos(t · ω_k)`` for ``k < dim/2`` and ``sin(t · ω_k)`` after, ``ω_k = max_period^(−k/(dim/2))``.
    """
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


def film(f: Tensor, gamma: Tensor, beta: Tensor) -> Tensor:
    """FiLM of paper §3.2: ``f' = f · (γ + 1) + β``; ``f: [B, C, H, W]``, ``γ, β: [B, C]``."""
    return f * (gamma[:, :, None, None] + 1) + beta[:, :, None, None]


def norm_film(norm: nn.GroupNorm, f: Tensor, gamma: Tensor, beta: Tensor) -> Tensor:
    """``film(norm(f), γ, β)`` in one ``group_norm`` call (same values, no extra pass over the feature map).

    GroupNorm's affine and FiLM compose to one per-(sample, channel) affine,
    ``(f̂ · w + b) · (γ + 1) + β = f̂ · w(γ + 1) + (b(γ + 1) + β)``; folding the batch into the channels
    (``[B, C, H, W] -> [1, B·C, H, W]`` with ``B·G`` groups, each group still one sample's channels) lets
    GroupNorm apply it. The fold is a view only of a contiguous (NCHW) ``f``; :class:`ResBlock` applies
    :func:`film` after the norm to channels-last maps instead.
    """
    b, c = f.shape[:2]
    scale = gamma + 1
    weight = scale if norm.weight is None else norm.weight * scale
    bias = beta if norm.bias is None else norm.bias * scale + beta
    out = F.group_norm(f.reshape(1, b * c, *f.shape[2:]), b * norm.num_groups, weight.reshape(-1),
                       bias.reshape(-1), norm.eps)
    return out.reshape(f.shape)


def _pair_sum(x: Tensor) -> Tensor:
    """Sum of each 2 × 2 pixel block, ``[B, C, H, W] -> [B, C, H/2, W/2]``: rows, then columns, as two additions of
    strided views (float32 accumulation for half precisions, as ``avg_pool2d`` does)."""
    b, c, h, w = x.shape
    rows = x.reshape(b, c, h // 2, 2, w)
    top = rows[:, :, :, 0]
    acc = (top.float() if x.dtype in (torch.float16, torch.bfloat16) else top) + rows[:, :, :, 1]
    cols = acc.reshape(b, c, h // 2, w // 2, 2)
    return (cols[..., 0] + cols[..., 1]).to(x.dtype)


def _repeat2x(x: Tensor) -> Tensor:
    """Nearest-neighbour ×2 upsampling, ``[B, C, H, W] -> [B, C, 2H, 2W]``: each pixel doubled along the width,
    then each row doubled (two broadcast copies)."""
    b, c, h, w = x.shape
    wide = x[..., None].expand(b, c, h, w, 2).reshape(b, c, h, 1, 2 * w)
    return wide.expand(b, c, h, 2, 2 * w).reshape(b, c, 2 * h, 2 * w)


class _Repeat2x(torch.autograd.Function):
    """:func:`_repeat2x`; its adjoint, the gradient, is the 2 × 2 block sum (and the other way round below), so
    second derivatives work too."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        return _repeat2x(x)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        return _PairSum.apply(grad)


class _PairSum(torch.autograd.Function):
    """:func:`_pair_sum`; its gradient is the nearest-neighbour ×2 upsampled gradient."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        return _pair_sum(x)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        return _Repeat2x.apply(grad)


def upsample2x(x: Tensor) -> Tensor:
    """×2 nearest-neighbour upsampling of ``[B, C, H, W]``, equal to ``F.interpolate(x, scale_factor=2,
    mode="nearest")``.

    On a CPU, for a contiguous tensor, it runs as broadcast copies, with the 2 × 2 block sum as gradient: PyTorch's
    CPU kernel converts small maps to channels-last and back, which made it 2–7× slower forward and 2–4× slower
    backward than these (``benchmarks/bench_unet.py``). Elsewhere (GPU, channels-last) PyTorch's kernel runs.
    """
    if x.device.type == "cpu" and x.ndim == 4 and x.is_contiguous():
        return _Repeat2x.apply(x)
    return F.interpolate(x, scale_factor=2, mode="nearest")


def downsample2x(x: Tensor) -> Tensor:
    """×2 average-pool downsampling of ``[B, C, H, W]`` (even H, W), equal to ``F.avg_pool2d(x, 2)`` (to rounding:
    the four pixels are added in another order).

    On a CPU, for a contiguous tensor, it runs as two additions of strided views (4–8× faster forward, 2× backward
    than PyTorch's CPU kernel); elsewhere PyTorch's kernel runs.
    """
    if x.device.type == "cpu" and x.ndim == 4 and x.is_contiguous() and x.shape[-2] % 2 == 0 \
            and x.shape[-1] % 2 == 0:
        return _PairSum.apply(x).mul_(0.25)
    return F.avg_pool2d(x, 2)


class Resample(nn.Module):
    """×2 nearest-neighbour upsampling or ×2 average-pool downsampling (``mode`` = ``up``/``down``/``none``)."""

    def __init__(self, mode: str) -> None:
        super().__init__()
        if mode not in ("up", "down", "none"):
            raise ValueError(f"Resample: mode must be 'up', 'down' or 'none', got {mode!r}")
        self.mode = mode

    def forward(self, x: Tensor) -> Tensor:
        if self.mode == "up":
            return upsample2x(x)
        if self.mode == "down":
            return downsample2x(x)
        return x


class ResBlock(nn.Module):
    """Residual block (paper Fig. 1): Norm, SiLU, conv1, FiLM(γ, β from MLP II), SiLU, dropout, conv2; skip.

    ``resample`` = ``up``/``down`` makes it ADM's residual up-/down-sampling block. ``emb_dim=None``: no embedding.
    """

    def __init__(self, in_ch: int, out_ch: int, emb_dim: int | None, dropout: float = 0.0,
                 use_scale_shift_norm: bool = True, resample: str = "none") -> None:
        super().__init__()
        self.use_scale_shift_norm = use_scale_shift_norm
        self.in_norm = group_norm(in_ch)
        self.resample = Resample(resample)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        #: MLP II of paper §3.2: c' -> (γ, β) ∈ R^{2·C_i}
        self.emb_proj = None
        if emb_dim is not None:
            self.emb_proj = nn.Sequential(nn.SiLU(), nn.Linear(emb_dim, 2 * out_ch if use_scale_shift_norm else out_ch))
        self.out_norm = group_norm(out_ch)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = zero_module(nn.Conv2d(out_ch, out_ch, 3, padding=1))
        self.skip = nn.Identity() if in_ch == out_ch else nn.Conv2d(in_ch, out_ch, 1)

    def forward(self, x: Tensor, emb: Tensor | None = None) -> Tensor:
        h = F.silu(self.in_norm(x))
        h = self.conv1(self.resample(h))
        x = self.resample(x)
        if self.emb_proj is None:
            h = self.out_norm(h)
        else:
            if emb is None:
                raise ValueError("ResBlock: this block is conditioned but no embedding was given")
            e = self.emb_proj(emb)
            if self.use_scale_shift_norm:  # FiLM, f' = GroupNorm(f) · (γ + 1) + β, fused into the norm
                # (channels-last maps cannot fold the batch into the channels without a copy: norm, then FiLM)
                gamma, beta = e.chunk(2, dim=1)
                h = norm_film(self.out_norm, h, gamma, beta) if h.is_contiguous() else \
                    film(self.out_norm(h), gamma, beta)
            else:
                h = self.out_norm(h) + e[:, :, None, None]
        h = self.conv2(self.dropout(F.silu(h)))
        return self.skip(x) + h


class AttentionBlock(nn.Module):
    """Multi-head self-attention over the pixels of a feature map (ADM), residual, zero-initialised output."""

    def __init__(self, channels: int, num_heads: int = 4) -> None:
        super().__init__()
        if channels % num_heads:
            raise ValueError(f"AttentionBlock: {channels} channels are not divisible by num_heads={num_heads}")
        self.num_heads = num_heads
        self.norm = group_norm(channels)
        self.qkv = nn.Conv1d(channels, 3 * channels, 1)
        self.proj = zero_module(nn.Conv1d(channels, channels, 1))

    def forward(self, x: Tensor) -> Tensor:
        # The 1×1 convolutions act on the token layout [B, HW, C] as matrix products (their weights viewed as
        # [C_out, C_in]): on a CPU about a third faster than Conv1d, with the same parameters and checkpoints.
        b, c, h, w = x.shape
        tokens = self.norm(x).reshape(b, c, h * w).transpose(1, 2)
        qkv = F.linear(tokens, self.qkv.weight[..., 0], self.qkv.bias)
        q, k, v = qkv.reshape(b, h * w, 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4).unbind(0)
        out = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, h * w, c)
        out = F.linear(out, self.proj.weight[..., 0], self.proj.bias)
        return x + out.transpose(1, 2).reshape(b, c, h, w)


class Level(nn.Module):
    """Residual block optionally followed by attention (one entry of the encoder/decoder paths)."""

    def __init__(self, res: ResBlock, attn: AttentionBlock | None) -> None:
        super().__init__()
        self.res = res
        self.attn = attn if attn is not None else nn.Identity()

    def forward(self, x: Tensor, emb: Tensor | None) -> Tensor:
        return self.attn(self.res(x, emb))


class UNet(nn.Module):
    """ADM-style U-Net (Dhariwal & Nichol) for 2D slices; one network for DDPM, pDDPM and cDDPM.

    Paper §4.4: ``model_channels=128, channel_mult=(1, 2, 2)`` (widths 128, 256, 256); the authors' code adds
    ``num_res_blocks=3``, attention only in the middle block, scale-shift norm and residual up/down-sampling.
    ``use_time=False, cond_dim=None`` gives a plain U-Net (DAE baseline).
    """

    def __init__(self, in_channels: int = 1, out_channels: int = 1, model_channels: int = 128,
                 channel_mult: Sequence[int] = (1, 2, 2), num_res_blocks: int = 3,
                 attention_levels: Sequence[int] = (), mid_attention: bool = True, num_heads: int = 4,
                 dropout: float = 0.0, use_scale_shift_norm: bool = True, resblock_updown: bool = True,
                 use_time: bool = True, cond_dim: int | None = None) -> None:
        super().__init__()
        if num_res_blocks < 1 or not channel_mult:
            raise ValueError(f"UNet: need num_res_blocks >= 1 and a non-empty channel_mult, "
                             f"got {num_res_blocks}, {tuple(channel_mult)}")
        bad = [lv for lv in attention_levels if not 0 <= lv < len(channel_mult)]
        if bad:
            raise ValueError(f"UNet: attention_levels {bad} outside 0..{len(channel_mult) - 1}")
        self.use_time, self.cond_dim = use_time, cond_dim
        self.model_channels = model_channels
        self.num_levels = len(channel_mult)
        # MLP I of paper §3.2: sinusoidal(t) -> c_t ∈ R^d
        time_dim = cond_dim if cond_dim is not None else 4 * model_channels
        self.time_mlp = None
        if use_time:
            self.time_mlp = nn.Sequential(nn.Linear(model_channels, time_dim), nn.SiLU(), nn.Linear(time_dim, time_dim))
        emb_dim = (time_dim if use_time else 0) + (cond_dim or 0)
        emb = emb_dim or None

        def res(cin: int, cout: int, resample: str = "none") -> ResBlock:
            return ResBlock(cin, cout, emb, dropout, use_scale_shift_norm, resample)

        def attn(ch: int, level: int) -> AttentionBlock | None:
            return AttentionBlock(ch, num_heads) if level in attention_levels else None

        self.input_conv = nn.Conv2d(in_channels, model_channels, 3, padding=1)
        self.down = nn.ModuleList()
        skip_chs, ch = [model_channels], model_channels
        for level, mult in enumerate(channel_mult):
            for _ in range(num_res_blocks):
                self.down.append(Level(res(ch, mult * model_channels), attn(mult * model_channels, level)))
                ch = mult * model_channels
                skip_chs.append(ch)
            if level < self.num_levels - 1:
                self.down.append(res(ch, ch, "down") if resblock_updown else nn.Conv2d(ch, ch, 3, 2, 1))
                skip_chs.append(ch)
        self.mid = nn.ModuleList([res(ch, ch), AttentionBlock(ch, num_heads) if mid_attention else nn.Identity(),
                                  res(ch, ch)])
        self.up = nn.ModuleList()
        for level, mult in reversed(list(enumerate(channel_mult))):
            for i in range(num_res_blocks + 1):
                out_ch = mult * model_channels
                self.up.append(Level(res(ch + skip_chs.pop(), out_ch), attn(out_ch, level)))
                ch = mult * model_channels
                if level > 0 and i == num_res_blocks:
                    self.up.append(res(ch, ch, "up") if resblock_updown else
                                   nn.Sequential(Resample("up"), nn.Conv2d(ch, ch, 3, padding=1)))
        self.out = nn.Sequential(group_norm(ch), nn.SiLU(), zero_module(nn.Conv2d(ch, out_channels, 3, padding=1)))

    def embedding(self, batch: int, t: Tensor | None, cond: Tensor | None) -> Tensor | None:
        """``c' = concat(c, c_t)`` of paper §3.2 (``[B, 2d]``); ``c_t`` alone without encoder; ``None`` without
        either."""
        parts = []
        if self.cond_dim is not None:
            if cond is None or cond.shape != (batch, self.cond_dim):
                raise ValueError(f"UNet: expected cond of shape [{batch}, {self.cond_dim}], "
                                 f"got {None if cond is None else tuple(cond.shape)}")
            parts.append(cond)
        elif cond is not None:
            raise ValueError("UNet: cond given but the network was built with cond_dim=None")
        if self.time_mlp is not None:
            if t is None or t.shape != (batch,):
                raise ValueError(f"UNet: expected t of shape [{batch}], got {None if t is None else tuple(t.shape)}")
            parts.append(self.time_mlp(timestep_embedding(t, self.model_channels)))
        return torch.cat(parts, dim=1) if parts else None

    def forward(self, x: Tensor, t: Tensor | None = None, cond: Tensor | None = None) -> Tensor:
        """x: [B, C_in, H, W]; t: [B] int64 time steps (required iff use_time); cond: [B, cond_dim] conditioning
        vector c from the encoder (required iff cond_dim is not None) -> [B, C_out, H, W]"""
        factor = 2 ** (self.num_levels - 1)
        if x.ndim != 4 or x.shape[-2] % factor or x.shape[-1] % factor:
            raise ValueError(f"UNet: input must be [B, C, H, W] with H and W divisible by {factor}, "
                             f"got {tuple(x.shape)}")
        emb = self.embedding(x.shape[0], t, cond)
        h = self.input_conv(x)
        skips = [h]
        for block in self.down:
            h = block(h, emb) if isinstance(block, (Level, ResBlock)) else block(h)
            skips.append(h)
        h = self.mid[2](self.mid[1](self.mid[0](h, emb)), emb)
        for block in self.up:
            if isinstance(block, Level):
                h = block(torch.cat([h, skips.pop()], dim=1), emb)
            else:
                h = block(h, emb) if isinstance(block, ResBlock) else block(h)
        return self.out(h)
