"""Perceptual distance of Table 2: LPIPS on features of MedicalNet's 3D ResNet (paper §4.5.1).

Paper §4.5.1: "For the feature-based LPIPS metric (Zhang et al. 2018), features are extracted by a resnet-based
network, pre-trained on 3D medical data (Chen et al. 2019)" — MedicalNet / Med3D.

- :class:`MedicalNetResNet` is Med3D's 3D ResNet backbone (depth 10/18/34 with basic blocks, 50 with
  bottlenecks) with the parameter names of the published checkpoints (``conv1.weight``, ``bn1.*``,
  ``layer1.0.conv1.weight``, ``layer2.0.downsample.0.weight`` …; DataParallel's ``module.`` prefix is stripped;
  the segmentation head ``conv_seg.*`` is not needed and ignored). Stem: 7³ convolution, stride 2, max-pool;
  ``layer3``/``layer4`` keep the resolution and use dilation 2/4, as in Med3D. Shortcut "A" (zero-padded identity,
  no parameters; Med3D's resnet_18/34) or "B" (1³ convolution + batch norm; resnet_10/50) is read off the weights.
- :func:`lpips_distance` is LPIPS without its learned linear layer (no such layer exists for MedicalNet): for each
  of the 5 feature maps (stem after ReLU, layer1…layer4) the features are unit-normalised over channels at every
  voxel, the squared difference is summed over channels, averaged over space, and the layers are summed
  (Zhang et al. 2018, Eq. 1 with w_l = 1).
- Input: one volume ``[X, Y, Z]`` in [0, 1] becomes ``[1, 1, Z, X, Y]`` (Med3D's depth axis first). Both volumes
  are multiplied by the brain mask and z-scored with the input's brain statistics (Med3D normalises each volume by
  the mean/std of its non-zero voxels; one shared transform keeps an intensity difference visible).

The weights cannot be downloaded by the kit. They are read from ``$CDDPM_MEDICALNET_WEIGHTS`` (or a path given
as a parameter), e.g. ``resnet_10_23dataset.pth`` of the MedicalNet release. When absent, Table 2's LPIPS column
says so and :func:`substitute_distance` reports, clearly labelled as *not* LPIPS, the same distance on the features
of the kit's own SparK-pretrained 2D encoder (slice by slice).
"""
from __future__ import annotations

import dataclasses
import math
import os
from pathlib import Path
from typing import Literal, Mapping

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

WEIGHTS_ENV = "CDDPM_MEDICALNET_WEIGHTS"
LPIPS_LABEL = "LPIPS (MedicalNet)"
SUBSTITUTE_LABEL = "feature distance (substitute: SSL encoder, not LPIPS)"
#: depth -> (block type, blocks per layer) of Med3D's ResNets
DEPTHS: dict[int, tuple[str, tuple[int, int, int, int]]] = {
    10: ("basic", (1, 1, 1, 1)), 18: ("basic", (2, 2, 2, 2)), 34: ("basic", (3, 4, 6, 3)),
    50: ("bottleneck", (3, 4, 6, 3)),
}


class WeightsNotFound(FileNotFoundError):
    """MedicalNet weights are missing; the message says where the kit looked and how to provide them."""


def _conv3(cin: int, cout: int, stride: int = 1, dilation: int = 1) -> nn.Conv3d:
    return nn.Conv3d(cin, cout, 3, stride=stride, padding=dilation, dilation=dilation, bias=False)


class _Shortcut(nn.Module):
    """Shortcut "A": strided identity, zero-padded to ``cout`` channels (no parameters)."""

    def __init__(self, cout: int, stride: int) -> None:
        super().__init__()
        self.cout, self.stride = cout, stride

    def forward(self, x: Tensor) -> Tensor:
        x = x[:, :, :: self.stride, :: self.stride, :: self.stride]
        return F.pad(x, (0, 0, 0, 0, 0, 0, 0, self.cout - x.shape[1]))


class BasicBlock3d(nn.Module):
    expansion = 1

    def __init__(self, cin: int, planes: int, stride: int, dilation: int, downsample: nn.Module | None) -> None:
        super().__init__()
        self.conv1, self.bn1 = _conv3(cin, planes, stride, dilation), nn.BatchNorm3d(planes)
        self.conv2, self.bn2 = _conv3(planes, planes, 1, dilation), nn.BatchNorm3d(planes)
        self.downsample = downsample

    def forward(self, x: Tensor) -> Tensor:
        out = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
        return F.relu(out + (x if self.downsample is None else self.downsample(x)))


class Bottleneck3d(nn.Module):
    expansion = 4

    def __init__(self, cin: int, planes: int, stride: int, dilation: int, downsample: nn.Module | None) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv3d(cin, planes, 1, bias=False), nn.BatchNorm3d(planes)
        self.conv2, self.bn2 = _conv3(planes, planes, stride, dilation), nn.BatchNorm3d(planes)
        self.conv3, self.bn3 = nn.Conv3d(planes, planes * 4, 1, bias=False), nn.BatchNorm3d(planes * 4)
        self.downsample = downsample

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return F.relu(out + (x if self.downsample is None else self.downsample(x)))


class MedicalNetResNet(nn.Module):
    """Med3D 3D ResNet backbone (Chen et al. 2019) without the segmentation head; x: [B, 1, D, H, W]."""

    def __init__(self, depth: int = 10, shortcut: str = "B") -> None:
        super().__init__()
        if depth not in DEPTHS:
            raise ValueError(f"MedicalNet depth {depth} not supported; choose one of {sorted(DEPTHS)}")
        if shortcut not in ("A", "B"):
            raise ValueError(f"shortcut must be 'A' or 'B', got {shortcut!r}")
        kind, blocks = DEPTHS[depth]
        block = BasicBlock3d if kind == "basic" else Bottleneck3d
        self.depth, self.shortcut, self._cin = depth, shortcut, 64
        self.conv1 = nn.Conv3d(1, 64, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm3d(64)
        self.maxpool = nn.MaxPool3d(3, stride=2, padding=1)
        specs = [(64, 1, 1), (128, 2, 1), (256, 1, 2), (512, 1, 4)]  # (planes, stride, dilation), Med3D
        for i, ((planes, stride, dil), n) in enumerate(zip(specs, blocks), start=1):
            setattr(self, f"layer{i}", self._make_layer(block, planes, n, stride, dil))

    def _make_layer(self, block, planes: int, n: int, stride: int, dilation: int) -> nn.Sequential:
        cout = planes * block.expansion
        down = None
        if stride != 1 or self._cin != cout:
            down = (_Shortcut(cout, stride) if self.shortcut == "A" else
                    nn.Sequential(nn.Conv3d(self._cin, cout, 1, stride=stride, bias=False), nn.BatchNorm3d(cout)))
        layers = [block(self._cin, planes, stride, dilation, down)]
        self._cin = cout
        layers += [block(cout, planes, 1, dilation, None) for _ in range(n - 1)]
        return nn.Sequential(*layers)

    def forward_features(self, x: Tensor) -> list[Tensor]:
        """The 5 feature maps LPIPS compares: stem (after ReLU), layer1, layer2, layer3, layer4."""
        h = F.relu(self.bn1(self.conv1(x)))
        feats = [h]
        h = self.maxpool(h)
        for i in range(1, 5):
            h = getattr(self, f"layer{i}")(h)
            feats.append(h)
        return feats


def clean_state_dict(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Unwrap ``{"state_dict": …}``, strip DataParallel's ``module.`` prefix, drop the ``conv_seg`` head."""
    if "state_dict" in state and isinstance(state["state_dict"], Mapping):
        state = state["state_dict"]
    out = {}
    for key, value in state.items():
        key = key[len("module."):] if key.startswith("module.") else key
        if not key.startswith("conv_seg."):
            out[key] = value
    return out


def infer_architecture(state: Mapping[str, Tensor]) -> tuple[int, str]:
    """(depth, shortcut) of a cleaned Med3D state dict, from its block counts and shortcut parameters."""
    bottleneck = "layer1.0.conv3.weight" in state
    counts = tuple(len({k.split(".")[1] for k in state if k.startswith(f"layer{i}.")}) for i in range(1, 5))
    for depth, (kind, blocks) in DEPTHS.items():
        if blocks == counts and (kind == "bottleneck") == bottleneck:
            return depth, ("B" if "layer2.0.downsample.0.weight" in state else "A")
    raise ValueError(f"state dict is not a Med3D ResNet this kit knows: blocks per layer {counts}, "
                     f"bottleneck={bottleneck}; supported depths {sorted(DEPTHS)}")


def load_medicalnet(path: str | os.PathLike, map_location: str = "cpu") -> MedicalNetResNet:
    """Build the Med3D backbone matching the checkpoint at ``path`` and load its weights (strict), eval mode."""
    path = Path(path)
    if not path.is_file():
        raise WeightsNotFound(f"MedicalNet weights not found at {path}")
    state = clean_state_dict(torch.load(path, map_location=map_location, weights_only=True))
    depth, shortcut = infer_architecture(state)
    net = MedicalNetResNet(depth, shortcut)
    missing, unexpected = net.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(f"{path}: weights do not fit MedicalNet ResNet-{depth} (shortcut {shortcut}): "
                         f"missing {missing[:5]}, unexpected {unexpected[:5]}")
    return net.eval()


def medicalnet_weights_path(path: str | None = None) -> Path | None:
    """The weights file to use: ``path`` if given, else ``$CDDPM_MEDICALNET_WEIGHTS``; ``None`` if neither is set."""
    value = path or os.environ.get(WEIGHTS_ENV) or ""
    return Path(value).expanduser() if value else None


def missing_weights_message(path: Path | None) -> str:
    """The note Table 2 shows instead of LPIPS values when the weights are absent."""
    where = str(path) if path is not None else f"${WEIGHTS_ENV} (not set)"
    return (f"n/a — MedicalNet weights not found at {where}; download resnet_10_23dataset.pth (or another "
            f"Med3D ResNet) from the MedicalNet release and set {WEIGHTS_ENV}")


def normalize_features(f: Tensor, eps: float = 1e-10) -> Tensor:
    """Unit length over the channel axis at every position (Zhang et al. 2018); f: [B, C, ...]."""
    return f / (f.pow(2).sum(dim=1, keepdim=True).sqrt() + eps)


def feature_distance(feats_a: list[Tensor], feats_b: list[Tensor]) -> Tensor:
    """Σ_l mean_space Σ_c (f̂ᵃ − f̂ᵇ)² over paired feature maps (LPIPS with unit weights) -> [B]."""
    if len(feats_a) != len(feats_b):
        raise ValueError("feature_distance: different numbers of feature maps")
    total = 0.0
    for a, b in zip(feats_a, feats_b):
        d = (normalize_features(a) - normalize_features(b)).pow(2).sum(dim=1)
        total = total + d.flatten(1).mean(dim=1)
    return total


def _masked_pair(image: np.ndarray, recon: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Brain-masked copies z-scored with the input's brain statistics."""
    m = np.asarray(mask) > 0
    if not m.any():
        raise ValueError("perceptual distance: empty brain mask")
    mu, sd = float(image[m].mean()), float(image[m].std()) or 1.0
    return (np.where(m, (image - mu) / sd, 0.0), np.where(m, (recon - mu) / sd, 0.0))


def _to_med3d(volume: np.ndarray, device: str | torch.device) -> Tensor:
    """[X, Y, Z] -> [1, 1, Z, X, Y] (Med3D's depth axis first)."""
    return torch.as_tensor(np.moveaxis(volume, -1, 0)[None, None], dtype=torch.float32, device=device)


@torch.no_grad()
def lpips_distance(net: MedicalNetResNet, image: np.ndarray, recon: np.ndarray, mask: np.ndarray,
                   device: str | torch.device = "cpu") -> float:
    """LPIPS (MedicalNet features, unit layer weights) of one volume pair; image, recon, mask: [X, Y, Z]."""
    a, b = _masked_pair(np.asarray(image, np.float32), np.asarray(recon, np.float32), mask)
    net = net.to(device)
    fa, fb = net.forward_features(_to_med3d(a, device)), net.forward_features(_to_med3d(b, device))
    return float(feature_distance(fa, fb)[0])


@torch.no_grad()
def substitute_distance(encoder: nn.Module, image: np.ndarray, recon: np.ndarray, mask: np.ndarray,
                        device: str | torch.device = "cpu", max_batch: int = 64) -> float:
    """The LPIPS-style distance on the 2D SSL encoder's 4 stage outputs, mean over slices that hold brain.

    NOT LPIPS: a substitute reported (labelled :data:`SUBSTITUTE_LABEL`) only when MedicalNet weights are absent.
    encoder: has ``forward_features(x: [S, 1, H, W]) -> list[Tensor]``; image, recon, mask: [X, Y, Z].
    """
    m = np.asarray(mask) > 0
    a = np.where(m, image, 0.0).astype(np.float32)
    b = np.where(m, recon, 0.0).astype(np.float32)
    keep = np.flatnonzero(m.reshape(-1, m.shape[-1]).any(axis=0))
    if keep.size == 0:
        raise ValueError("substitute distance: empty brain mask")
    encoder = encoder.to(device).eval()
    dists = []
    for start in range(0, keep.size, max_batch):
        z = keep[start:start + max_batch]
        xa = torch.as_tensor(np.moveaxis(a[..., z], -1, 0)[:, None], device=device)
        xb = torch.as_tensor(np.moveaxis(b[..., z], -1, 0)[:, None], device=device)
        dists.append(feature_distance(encoder.forward_features(xa), encoder.forward_features(xb)).cpu())
    return float(torch.cat(dists).mean())


@dataclasses.dataclass
class PerceptualMetric:
    """The perceptual column of Table 2: real LPIPS, the labelled substitute, or nothing (with the reason)."""

    kind: Literal["lpips", "substitute", "none"]
    label: str  # column header: LPIPS_LABEL or SUBSTITUTE_LABEL
    note: str  # what was used, or why LPIPS is n/a
    net: nn.Module | None = None

    def distance(self, image: np.ndarray, recon: np.ndarray, mask: np.ndarray,
                 device: str | torch.device = "cpu") -> float:
        """Distance of one volume pair ([X, Y, Z]); NaN when no network is available."""
        if self.kind == "lpips":
            return lpips_distance(self.net, image, recon, mask, device)
        if self.kind == "substitute":
            return substitute_distance(self.net, image, recon, mask, device)
        return math.nan


def load_ssl_encoder(path: str | os.PathLike) -> nn.Module:
    """The kit's SparK-pretrained 2D encoder (:mod:`cddpm_lib.encoder`) from ``encoder.pt``."""
    from .encoder import ResNetEncoder, load_encoder_weights

    ckpt = torch.load(Path(path), map_location="cpu", weights_only=True)
    encoder = ResNetEncoder(**dict(ckpt.get("hparams", {})))
    load_encoder_weights(encoder, path)
    return encoder.eval()


def resolve_perceptual(weights: str | None = None, encoder_checkpoint: str | os.PathLike | None = None
                       ) -> PerceptualMetric:
    """LPIPS with MedicalNet if its weights exist, else the labelled SSL-encoder substitute, else nothing.

    weights: MedicalNet checkpoint (default ``$CDDPM_MEDICALNET_WEIGHTS``); encoder_checkpoint: the kit's
    ``checkpoints/spark_<w>/fold<k>/encoder.pt``.
    """
    path = medicalnet_weights_path(weights)
    if path is not None and path.is_file():
        net = load_medicalnet(path)
        return PerceptualMetric("lpips", LPIPS_LABEL, f"LPIPS on MedicalNet ResNet-{net.depth} features ({path})",
                                net)
    missing = missing_weights_message(path)
    if encoder_checkpoint is not None and Path(encoder_checkpoint).is_file():
        return PerceptualMetric("substitute", SUBSTITUTE_LABEL,
                                f"{missing}. Reported instead, NOT LPIPS: the same unit-weight feature distance on "
                                f"the kit's SparK-pretrained 2D encoder ({encoder_checkpoint}), slice by slice.",
                                load_ssl_encoder(encoder_checkpoint))
    where = encoder_checkpoint if encoder_checkpoint is not None else "(no path given)"
    return PerceptualMetric("none", LPIPS_LABEL, f"{missing}. No substitute either: SSL encoder not found at {where}.")
