"""Sequential VAE (SVAE) baseline: a VAE whose slice codes are mixed along the axial axis.

Source: Behrendt, Bengs, Bhattacharya, Krüger, Opfer, Schlaefer (2022), *Capturing inter-slice dependencies of
3D brain MRI-scans for unsupervised anomaly detection*, MIDL short paper — slice-wise 2D VAEs whose latent
codes of neighbouring slices are processed by a recurrent network or by transformer self-attention. β = 0.001 as
in the cDDPM paper (Behrendt et al. 2023, §4.4). Encoder, decoder and loss are the VAE's
(:mod:`cddpm_lib.models.vae`); only the latent codes change:

    z_i ~ q(z | x_i)          (per slice, i = 1..L of a stack of consecutive slices)
    h_{1..L} = z_{1..L} + W_out · Seq(z_{1..L} + PE)      x̂_i = Dec(h_i)

Choices where the sources are silent (builder arguments):

- ``sequence_model="transformer"`` (pre-norm transformer encoder, ``seq_layers`` layers, ``seq_heads`` heads,
  feed-forward width 2·d, sinusoidal position encoding of the index within the stack); ``"gru"`` gives a
  bidirectional GRU instead. ``W_out`` starts at zero, so an untrained SVAE equals its VAE.
- ``slab_length = 8`` consecutive slices per training sample (``B = n_slabs · L`` rows, base.py docstring).
- Test time (``needs_whole_volume``): :meth:`reconstruct` receives all ``Z`` slices of a volume in order and
  runs the sequence model on windows of ``test_window`` slices (default ``slab_length``, the length seen in
  training) with stride ``test_stride`` (default half a window); overlapping window outputs are averaged.
  ``Z`` need not be a multiple of anything; ``Z ≤ test_window`` is one window.
"""
from __future__ import annotations

import math
from typing import Any, ClassVar, Sequence

import torch
from torch import Tensor, nn

from .ae import check_slices
from .vae import VAE

SEQUENCE_MODELS = ("transformer", "gru")


def sinusoidal_positions(length: int, dim: int, device: torch.device | None = None) -> Tensor:
    """Transformer position encoding (Vaswani et al. 2017) of indices ``0..length-1``: ``[length, dim]``."""
    pos = torch.arange(length, dtype=torch.float32, device=device)[:, None]
    freq = torch.exp(-math.log(10000.0) * torch.arange(0, dim, 2, dtype=torch.float32, device=device) / dim)
    pe = torch.zeros(length, dim, device=device)
    pe[:, 0::2] = torch.sin(pos * freq)
    pe[:, 1::2] = torch.cos(pos * freq)[:, : dim // 2]
    return pe


class SliceSequenceModel(nn.Module):
    """Residual sequence model over the slice axis: ``z [N, L, d] -> h [N, L, d]`` (zero-initialised output)."""

    def __init__(self, kind: str, dim: int, layers: int = 1, heads: int = 8) -> None:
        super().__init__()
        if kind not in SEQUENCE_MODELS:
            raise ValueError(f"svae: sequence_model must be one of {SEQUENCE_MODELS}, got {kind!r}")
        self.kind = kind
        if kind == "transformer":
            if dim % heads:
                raise ValueError(f"svae: latent_dim {dim} must be divisible by seq_heads {heads}")
            layer = nn.TransformerEncoderLayer(dim, heads, dim_feedforward=2 * dim, dropout=0.0,
                                               batch_first=True, norm_first=True)
            self.net = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
            out_dim = dim
        else:
            self.net = nn.GRU(dim, dim, num_layers=layers, batch_first=True, bidirectional=True)
            out_dim = 2 * dim
        self.out = nn.Linear(out_dim, dim)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, z: Tensor) -> Tensor:
        if self.kind == "transformer":
            y = self.net(z + sinusoidal_positions(z.shape[1], z.shape[2], z.device))
        else:
            y = self.net(z)[0]
        return z + self.out(y)


def window_starts(n_slices: int, window: int, stride: int) -> list[int]:
    """Start indices of windows of ``window`` slices covering ``0..n_slices-1``; the last ends at the end."""
    if n_slices <= window:
        return [0]
    starts = list(range(0, n_slices - window + 1, stride))
    if starts[-1] != n_slices - window:
        starts.append(n_slices - window)
    return starts


class SVAE(VAE):
    """VAE + sequence model over the latent codes of consecutive slices (Behrendt et al. 2022)."""

    name = "svae"
    slab_length: ClassVar[int] = 8
    needs_whole_volume: ClassVar[bool] = True

    def __init__(self, image_size: Sequence[int], channels: Sequence[int] = (32, 64, 128, 128),
                 latent_dim: int = 512, beta: float = 0.001, loss: str = "l1", lr: float | None = None,
                 slab_length: int = 8, sequence_model: str = "transformer", seq_layers: int = 1,
                 seq_heads: int = 8, test_window: int | None = None, test_stride: int | None = None) -> None:
        if slab_length < 2:
            raise ValueError(f"svae: slab_length must be >= 2 (a stack of slices), got {slab_length}")
        window = slab_length if test_window is None else test_window
        stride = max(1, window // 2) if test_stride is None else test_stride
        if window < 1 or not 1 <= stride <= window:
            raise ValueError(f"svae: need test_window >= 1 and 1 <= test_stride <= test_window, "
                             f"got {test_window}, {test_stride}")
        super().__init__(image_size, channels=channels, latent_dim=latent_dim, beta=beta, loss=loss, lr=lr,
                         slab_length=slab_length, sequence_model=sequence_model, seq_layers=seq_layers,
                         seq_heads=seq_heads, test_window=test_window, test_stride=test_stride)
        self.slab_length = slab_length  # instance value shadows the class default
        self.window, self.stride = window, stride
        self.sequence = SliceSequenceModel(sequence_model, latent_dim, seq_layers, seq_heads)

    def transform_latents(self, z: Tensor) -> Tensor:
        """Training: ``z [n_slabs · L, d]`` -> stacks ``[n_slabs, L, d]`` -> sequence model -> ``[n_slabs · L, d]``."""
        if z.shape[0] % self.slab_length:
            raise ValueError(
                f"svae: a training batch must hold whole stacks of slab_length={self.slab_length} consecutive "
                f"slices, got {z.shape[0]} slices; sample slabs (UADModel.slab_length) in the training stage"
            )
        return self.sequence(z.view(-1, self.slab_length, z.shape[1])).reshape(z.shape)

    @torch.no_grad()
    def reconstruct(self, x: Tensor, mask: Tensor | None = None, **kwargs: Any) -> Tensor:
        """``x: [Z, 1, H, W]`` = all slices of one volume in axial order -> ``x̂ [Z, 1, H, W]`` in ``[0, 1]``."""
        check_slices(x, self.image_size, "svae.reconstruct")
        mu, _ = self.encode(x)  # z = μ at test time
        out = torch.zeros_like(x)
        count = torch.zeros(x.shape[0], 1, 1, 1, dtype=x.dtype, device=x.device)
        for s in window_starts(x.shape[0], self.window, self.stride):
            e = min(s + self.window, x.shape[0])
            h = self.sequence(mu[None, s:e])[0]
            out[s:e] += self.decoder(h)
            count[s:e] += 1
        return (out / count).clamp(0.0, 1.0)


def build_svae(image_size: Sequence[int], channels: Sequence[int] = (32, 64, 128, 128), latent_dim: int = 512,
               beta: float = 0.001, loss: str = "l1", lr: float | None = None, slab_length: int = 8,
               sequence_model: str = "transformer", seq_layers: int = 1, seq_heads: int = 8,
               test_window: int | None = None, test_stride: int | None = None) -> SVAE:
    """SVAE of Behrendt et al. (2022) with β = 0.001; see the module docstring for every choice."""
    return SVAE(image_size, channels=channels, latent_dim=latent_dim, beta=beta, loss=loss, lr=lr,
                slab_length=slab_length, sequence_model=sequence_model, seq_layers=seq_layers,
                seq_heads=seq_heads, test_window=test_window, test_stride=test_stride)
