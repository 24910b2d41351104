"""Image encoder ``F_enc`` of cDDPM (paper §3.2): a ResNet backbone plus a fully connected layer -> ``c ∈ R^d``.

``c = F_enc(x0)`` embeds the noise-free input slice; the denoising U-Net is conditioned on it by FiLM
(:mod:`cddpm_lib.unet`). The encoder is trained end to end with the U-Net, optionally starting from SparK
masked-modelling pre-training (paper §3.3), whose weights are handed over with :func:`save_encoder_weights` /
:func:`load_encoder_weights`.

Choices (parameters):

- ``depth`` 18/34 (basic blocks) or 50 (bottlenecks), He et al. 2016. The paper says "ResNet-backbone"; the
  authors' code uses ResNet-50.
- ``out_dim = d``: the paper states ``d = 128``; in the authors' code the conditioning size is effectively 512.
  The kit defaults to the paper's 128.
- ``norm="group"`` (default) or ``"batch"``. GroupNorm is the kit's choice: it has no running statistics, so
  training with small slice batches, evaluation one volume at a time and SparK pre-training (which re-masks the
  features after every stage, so batch statistics would mix masked zeros of the whole batch into the running
  estimates) all see the same normalisation. BatchNorm reproduces torchvision's ResNet exactly.
- ``base_width`` (64 in ResNet) shrinks the encoder for the CPU profiles.
- One input channel (MRI slice); global average pooling before the FC layer.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

#: depth -> (block type, blocks per stage)
RESNET_LAYOUTS: dict[int, tuple[str, tuple[int, int, int, int]]] = {
    18: ("basic", (2, 2, 2, 2)),
    34: ("basic", (3, 4, 6, 3)),
    50: ("bottleneck", (3, 4, 6, 3)),
}


def make_norm(kind: str, channels: int) -> nn.Module:
    """``group``: GroupNorm with up to 32 groups of at least 16 channels (so that the 1×1 maps of the last stage of
    small inputs still have statistics over 16 values); ``batch``: BatchNorm2d."""
    if kind == "batch":
        return nn.BatchNorm2d(channels)
    if kind == "group":
        groups = max(1, min(32, channels // 16))
        while channels % groups:
            groups -= 1
        return nn.GroupNorm(groups, channels)
    raise ValueError(f"ResNetEncoder: norm must be 'group' or 'batch', got {kind!r}")


class BasicBlock(nn.Module):
    """Two 3×3 convolutions with a residual connection (ResNet-18/34)."""

    expansion = 1

    def __init__(self, in_ch: int, width: int, stride: int, norm: str) -> None:
        super().__init__()
        out_ch = width * self.expansion
        self.body = nn.Sequential(
            nn.Conv2d(in_ch, width, 3, stride, 1, bias=False), make_norm(norm, width), nn.ReLU(inplace=True),
            nn.Conv2d(width, out_ch, 3, 1, 1, bias=False), make_norm(norm, out_ch))
        self.shortcut = nn.Identity()
        if stride != 1 or in_ch != out_ch:
            self.shortcut = nn.Sequential(nn.Conv2d(in_ch, out_ch, 1, stride, bias=False), make_norm(norm, out_ch))

    def forward(self, x: Tensor) -> Tensor:
        return torch.relu(self.body(x) + self.shortcut(x))


class Bottleneck(BasicBlock):
    """1×1 -> 3×3 (strided) -> 1×1 with 4× expansion (ResNet-50)."""

    expansion = 4

    def __init__(self, in_ch: int, width: int, stride: int, norm: str) -> None:
        nn.Module.__init__(self)
        out_ch = width * self.expansion
        self.body = nn.Sequential(
            nn.Conv2d(in_ch, width, 1, bias=False), make_norm(norm, width), nn.ReLU(inplace=True),
            nn.Conv2d(width, width, 3, stride, 1, bias=False), make_norm(norm, width), nn.ReLU(inplace=True),
            nn.Conv2d(width, out_ch, 1, bias=False), make_norm(norm, out_ch))
        self.shortcut = nn.Identity()
        if stride != 1 or in_ch != out_ch:
            self.shortcut = nn.Sequential(nn.Conv2d(in_ch, out_ch, 1, stride, bias=False), make_norm(norm, out_ch))


class ResNetEncoder(nn.Module):
    """F_enc of paper §3.2: ResNet backbone (depth 18/34/50) + fully connected layer -> c in R^d.

    ``x: [B, in_channels, H, W] -> c: [B, out_dim]``; ``forward_features`` gives the four stage outputs
    (strides 4, 8, 16, 32) used by SparK pre-training.
    """

    def __init__(self, depth: int = 18, in_channels: int = 1, out_dim: int = 128, base_width: int = 64,
                 norm: str = "group") -> None:
        super().__init__()
        if depth not in RESNET_LAYOUTS:
            raise ValueError(f"ResNetEncoder: depth must be one of {sorted(RESNET_LAYOUTS)}, got {depth}")
        if base_width < 1 or out_dim < 1:
            raise ValueError(f"ResNetEncoder: base_width and out_dim must be positive, got {base_width}, {out_dim}")
        make_norm(norm, 8)  # validates ``norm``
        self.hparams: dict[str, Any] = dict(depth=depth, in_channels=in_channels, out_dim=out_dim,
                                            base_width=base_width, norm=norm)
        kind, blocks = RESNET_LAYOUTS[depth]
        block = BasicBlock if kind == "basic" else Bottleneck
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, base_width, 7, 2, 3, bias=False), make_norm(norm, base_width),
            nn.ReLU(inplace=True), nn.MaxPool2d(3, 2, 1))
        self.stages = nn.ModuleList()
        self.stage_channels: list[int] = []
        ch = base_width
        for i, (n, stride) in enumerate(zip(blocks, (1, 2, 2, 2))):
            width = base_width * 2 ** i
            layers = []
            for j in range(n):
                layers.append(block(ch, width, stride if j == 0 else 1, norm))
                ch = width * block.expansion
            self.stages.append(nn.Sequential(*layers))
            self.stage_channels.append(ch)
        self.fc = nn.Linear(ch, out_dim)

    def forward_features(self, x: Tensor) -> list[Tensor]:
        """The four stage outputs ``[B, stage_channels[i], H / 2^(i+2), W / 2^(i+2)]``."""
        h = self.stem(x)
        feats = []
        for stage in self.stages:
            h = stage(h)
            feats.append(h)
        return feats

    def forward(self, x: Tensor) -> Tensor:
        """``c = FC(global_avg_pool(ResNet(x)))``: ``[B, in_channels, H, W] -> [B, out_dim]``."""
        return self.fc(self.forward_features(x)[-1].mean(dim=(-2, -1)))


def save_encoder_weights(encoder: ResNetEncoder, path: str | Path, **meta: Any) -> None:
    """Write ``{"encoder": state_dict, "hparams": {...}, **meta}`` atomically (temp file + rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save({"encoder": encoder.state_dict(), "hparams": dict(encoder.hparams), **meta}, tmp)
    tmp.replace(path)


def load_encoder_weights(encoder: ResNetEncoder, path: str | Path) -> None:
    """Load weights written by :func:`save_encoder_weights` into ``encoder`` (in place).

    Raises a clear error when the file is missing, is not an encoder checkpoint, or was written for another
    architecture (depth, width, d, norm).
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"encoder weights {path} do not exist; run the SparK pre-training first (notebook 02)")
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(ckpt, dict) or "encoder" not in ckpt:
        raise ValueError(f"{path}: not an encoder checkpoint (missing 'encoder')")
    saved = dict(ckpt.get("hparams", {}))
    own = getattr(encoder, "hparams", {})
    diff = {k: (saved[k], own.get(k)) for k in saved if k in own and saved[k] != own[k]}
    if diff:
        raise ValueError(f"{path}: encoder architecture mismatch (saved vs model): "
                         + ", ".join(f"{k}={a!r} vs {b!r}" for k, (a, b) in diff.items()))
    try:
        encoder.load_state_dict(ckpt["encoder"])
    except RuntimeError as exc:
        raise ValueError(f"{path}: encoder weights do not fit this ResNetEncoder: {exc}") from exc
