"""SparK masked pre-training of the cDDPM encoder ``F_enc`` (paper §3.3; Tian et al. 2023, "Designing BERT for
convolutional networks: sparse and hierarchical masked modeling").

Stage ``ssl`` (notebook 02): on the same healthy IXI training slices as the main task, the
:class:`~cddpm_lib.encoder.ResNetEncoder` learns to reconstruct masked-out patches; afterwards the decoder is
discarded and the encoder saved (``encoder.save_encoder_weights``) to
``paths.checkpoint_dir(profile, "spark_<w>", fold) / "encoder.pt"``, from where the training stage loads it into
the cDDPM (``ssl=True``). The optimisation loop is the engine's (:func:`cddpm_lib.engine.fit`); the encoder
saved is the one of the lowest masked-patch loss on the healthy validation fold (fixed validation masks).

The method, step by step (:meth:`SparK.loss`):

1. **Mask** (:func:`random_patch_mask`): the image is cut into a grid of square patches of the encoder's deepest
   stride (32 px: 3×3 at 96 px, 2×2 at 64 px) and ``round(n · (1 − ratio))`` of the ``n`` patches of every slice
   stay visible, the rest (paper: 65 %) are zeroed. The count is clamped to ``1 … n − 1`` (something to see,
   something to predict); grids smaller than 2×2 (32 px slices) use half the patch size, repeatedly.
2. **Sparse encoding**, emulated: after the stem and after every residual stage the features at masked positions
   are set to 0 again, so masked regions never leak into visible ones through the growing receptive field (the
   dense stand-in for SparK's sparse convolutions; normalisation layers still see the zeros, which with the
   encoder's default GroupNorm only shifts per-sample statistics).
3. **Densify** each of the four stage outputs: masked positions are filled with a learned mask token of that
   level, then projected (1×1 conv at the deepest level, 3×3 elsewhere) to the decoder width of the level.
4. **Hierarchical light decoder**: U-Net-style, from stride 32 to stride 1 by five blocks (transposed conv ×2,
   two 3×3 convs), adding the densified skip features of strides 16, 8, 4 on the way; a 1×1 conv to one channel.
5. **Loss** (:func:`masked_patch_l2`): squared error per patch, averaged over the **masked patches only**. With
   ``normalize_target=True`` (SparK's default) each target patch is standardised by its own mean and standard
   deviation, so the network predicts structure rather than brightness; shown reconstructions then restore
   each masked patch's true mean and std (:meth:`SparK.masked_reconstruction`).

Optimiser as SparK / the authors: AdamW, lr 1e-4, weight decay 0.05, betas (0.9, 0.95), no weight decay on
biases, norm parameters and mask tokens. No augmentation.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, ClassVar, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import ConfigError
from .encoder import ResNetEncoder, make_norm, save_encoder_weights
from .engine import FitResult, LoopConfig, fit, isolated_rng
from .models.base import UADModel
from .runtime import seed_everything
from .train import example_slices, load_fold, ssl_encoder_path

ENCODER_STRIDE = 32


@dataclasses.dataclass(frozen=True)
class SSLConfig(LoopConfig):
    """Stage ``ssl`` (notebook 02). Encoder fields must equal the cDDPM's (``build_cddpm``) it initialises."""

    STAGE: ClassVar[str] = "ssl"  # profiles/<STAGE>.yaml resolves None parameters

    lr: float = 1e-4  # AdamW, SparK / authors' code
    weight_decay: float = 0.05  # AdamW, SparK / authors' code
    augment: bool = False  # no augmentation during pre-training
    mask_ratio: float = 0.65  # fraction of masked patches, paper §4.4
    mask_patch: int | None = None  # patch side in px (None: the encoder's stride 32, halved for tiny images)
    normalize_target: bool = True  # per-patch standardised targets (SparK default)
    decoder_width: int = 256  # channels of the decoder's deepest level (halved per level)
    encoder_depth: int = 50  # ResNet depth, as build_cddpm (authors' code: ResNet-50)
    encoder_width: int = 64  # ResNet base width, as build_cddpm
    encoder_norm: str = "group"  # group | batch, as build_cddpm
    cond_dim: int = 128  # d, the encoder's output size, as build_cddpm (paper: 128)

    def validate(self) -> None:
        super().validate()
        if not 0 < self.mask_ratio < 1:
            raise ConfigError(f"parameter 'mask_ratio' must lie in (0, 1), got {self.mask_ratio}")
        if self.mask_patch is not None and self.mask_patch < 4:
            raise ConfigError(f"parameter 'mask_patch' must be >= 4 px (the stem's stride), got {self.mask_patch}")


def mask_patch_size(image_size: Sequence[int], patch: int | None = None) -> int:
    """Patch side: ``patch`` or the encoder stride 32, halved until the grid has >= 2 patches per side."""
    h, w = (int(s) for s in image_size)
    if patch is None:
        patch = ENCODER_STRIDE
        while patch > 4 and (h // patch < 2 or w // patch < 2):
            patch //= 2
    if h % patch or w % patch or h // patch * (w // patch) < 2:
        raise ValueError(f"SparK: image size {(h, w)} must be divisible by the mask patch {patch} into >= 2 patches")
    return patch


def random_patch_mask(batch: int, grid: tuple[int, int], ratio: float, device=None,
                      generator: torch.Generator | None = None) -> Tensor:
    """``active: [B, 1, gh, gw]`` bool, True = visible; exactly ``clamp(round(n (1 − ratio)), 1, n − 1)``
    visible patches per slice, chosen uniformly (SparK's masking)."""
    n = grid[0] * grid[1]
    keep = min(max(round(n * (1 - ratio)), 1), n - 1)
    order = torch.rand(batch, n, device=device, generator=generator).argsort(dim=1)
    active = torch.zeros(batch, n, dtype=torch.bool, device=device)
    active.scatter_(1, order[:, :keep], True)
    return active.view(batch, 1, *grid)


def resize_mask(active: Tensor, size: tuple[int, int]) -> Tensor:
    """Mask at a feature resolution: nearest up-sampling; down-sampling marks a cell visible if any part is."""
    a = active.float()
    if size[0] >= active.shape[-2]:
        return F.interpolate(a, size=size, mode="nearest").bool()
    return F.adaptive_max_pool2d(a, size).bool()


def patchify(x: Tensor, p: int) -> Tensor:
    """``[B, 1, H, W] -> [B, (H/p)(W/p), p²]`` (row-major patches, as :func:`random_patch_mask`'s grid)."""
    b, c, h, w = x.shape
    return x.view(b, c, h // p, p, w // p, p).permute(0, 2, 4, 1, 3, 5).reshape(b, (h // p) * (w // p), c * p * p)


def unpatchify(patches: Tensor, p: int, size: tuple[int, int]) -> Tensor:
    b, h, w = patches.shape[0], size[0] // p, size[1] // p
    return patches.view(b, h, w, 1, p, p).permute(0, 3, 1, 4, 2, 5).reshape(b, 1, h * p, w * p)


def patch_stats(target: Tensor) -> tuple[Tensor, Tensor]:
    """Per-patch mean and std ``sqrt(var + 1e-6)`` of ``[B, n, p²]`` (SparK's target normalisation)."""
    return target.mean(-1, keepdim=True), (target.var(-1, keepdim=True) + 1e-6).sqrt()


def masked_patch_l2(pred: Tensor, x: Tensor, active: Tensor, p: int, normalize_target: bool = True) -> Tensor:
    """Mean over **masked** patches of the per-patch mean squared error (paper §3.3, SparK eq. 3)."""
    target = patchify(x, p)
    if normalize_target:
        mean, std = patch_stats(target)
        target = (target - mean) / std
    err = (patchify(pred, p) - target).pow(2).mean(-1)  # [B, n]
    masked = (~active).flatten(1).float()
    return (err * masked).sum() / masked.sum().clamp_min(1.0)


class DecoderBlock(nn.Module):
    """×2 up-sampling (transposed conv), then two 3×3 convolutions (SparK's light U-Net block)."""

    def __init__(self, cin: int, cout: int, norm: str) -> None:
        super().__init__()
        self.up = nn.ConvTranspose2d(cin, cin, 4, 2, 1)
        self.conv = nn.Sequential(nn.Conv2d(cin, cin, 3, 1, 1, bias=False), make_norm(norm, cin), nn.ReLU6(True),
                                  nn.Conv2d(cin, cout, 3, 1, 1, bias=False), make_norm(norm, cout))

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(self.up(x))


class SparK(UADModel):
    """Encoder + densifiers + light decoder; ``loss`` is SparK's masked-patch objective (module docstring)."""

    name = "spark"

    def __init__(self, image_size: Sequence[int], encoder_depth: int = 50, encoder_width: int = 64,
                 encoder_norm: str = "group", cond_dim: int = 128, mask_ratio: float = 0.65,
                 mask_patch: int | None = None, decoder_width: int = 256, normalize_target: bool = True,
                 weight_decay: float = 0.05) -> None:
        size = tuple(int(s) for s in image_size)
        super().__init__(image_size=size, encoder_depth=encoder_depth, encoder_width=encoder_width,
                         encoder_norm=encoder_norm, cond_dim=cond_dim, mask_ratio=mask_ratio, mask_patch=mask_patch,
                         decoder_width=decoder_width, normalize_target=normalize_target, weight_decay=weight_decay)
        if any(s % ENCODER_STRIDE for s in size):
            raise ValueError(f"SparK: image size {size} must be divisible by the encoder stride {ENCODER_STRIDE}")
        self.image_size, self.mask_ratio, self.normalize_target = size, mask_ratio, normalize_target
        self.weight_decay = weight_decay
        self.patch = mask_patch_size(size, mask_patch)
        self.grid = (size[0] // self.patch, size[1] // self.patch)
        self.encoder = ResNetEncoder(depth=encoder_depth, in_channels=1, out_dim=cond_dim, base_width=encoder_width,
                                     norm=encoder_norm)
        enc_ch = self.encoder.stage_channels[::-1]  # deepest first: strides 32, 16, 8, 4
        widths = [max(decoder_width // 2**i, 8) for i in range(int(math.log2(ENCODER_STRIDE)) + 1)]
        self.mask_tokens = nn.ParameterList([nn.Parameter(torch.zeros(1, c, 1, 1)) for c in enc_ch])
        for token in self.mask_tokens:
            nn.init.trunc_normal_(token, std=0.02, a=-0.02, b=0.02)
        self.densify = nn.ModuleList([nn.Conv2d(c, widths[i], 1 if i == 0 else 3, padding=0 if i == 0 else 1)
                                      for i, c in enumerate(enc_ch)])
        self.decoder = nn.ModuleList([DecoderBlock(widths[i], widths[i + 1], encoder_norm)
                                      for i in range(len(widths) - 1)])
        self.head = nn.Conv2d(widths[-1], 1, 1)

    def sparse_features(self, x: Tensor, active: Tensor) -> list[Tensor]:
        """Stage outputs of the encoder on the masked image, re-masked after the stem and every stage."""
        h = x * resize_mask(active, x.shape[-2:])
        h = self.encoder.stem(h)
        h = h * resize_mask(active, h.shape[-2:])
        feats = []
        for stage in self.encoder.stages:
            h = stage(h)
            h = h * resize_mask(active, h.shape[-2:])
            feats.append(h)
        return feats

    def predict(self, x: Tensor, active: Tensor) -> Tensor:
        """Prediction of every pixel ``[B, 1, H, W]`` from the visible patches of ``x`` (``active`` True)."""
        feats = self.sparse_features(x, active)[::-1]
        y: Tensor | int = 0
        for i, block in enumerate(self.decoder):
            if i < len(feats):
                f = feats[i]
                f = torch.where(resize_mask(active, f.shape[-2:]), f, self.mask_tokens[i].to(f.dtype))
                y = y + self.densify[i](f)
            y = block(y)
        return self.head(y)

    def draw_mask(self, batch: int, device=None) -> Tensor:
        return random_patch_mask(batch, self.grid, self.mask_ratio, device=device)

    def loss(self, batch: dict[str, Tensor]) -> Tensor:
        x = batch["image"]
        active = self.draw_mask(x.shape[0], x.device)
        return masked_patch_l2(self.predict(x, active), x, active, self.patch, self.normalize_target)

    def configure_optimizers(self, lr: float) -> list[torch.optim.Optimizer]:
        """AdamW (SparK): weight decay on weights, none on biases, norms and mask tokens."""
        no_decay = {id(t) for t in self.mask_tokens} | {id(p) for p in self.parameters() if p.ndim <= 1}
        params = list(self.parameters())
        groups = [{"params": [p for p in params if id(p) not in no_decay], "weight_decay": self.weight_decay},
                  {"params": [p for p in params if id(p) in no_decay], "weight_decay": 0.0}]
        return [torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95))]

    @torch.no_grad()
    def masked_reconstruction(self, x: Tensor, active: Tensor | None = None) -> dict[str, Tensor]:
        """``{"visible": [B,1,H,W] 0/1, "masked_input", "reconstruction"}``: visible patches copied from ``x``,
        masked ones predicted (de-standardised with the true patch mean/std when ``normalize_target``)."""
        active = self.draw_mask(x.shape[0], x.device) if active is None else active
        pred = patchify(self.predict(x, active), self.patch)
        if self.normalize_target:
            mean, std = patch_stats(patchify(x, self.patch))
            pred = pred * std + mean
        visible = resize_mask(active, x.shape[-2:]).float()
        rec = visible * x + (1 - visible) * unpatchify(pred, self.patch, self.image_size)
        return {"visible": visible, "masked_input": x * visible, "reconstruction": rec}

    @torch.no_grad()
    def reconstruct(self, x: Tensor, mask: Tensor | None = None, **kwargs: Any) -> Tensor:
        return self.masked_reconstruction(x)["reconstruction"]


def build_spark(cfg: SSLConfig, image_size: tuple[int, int]) -> SparK:
    seed_everything(cfg.seed)
    return SparK(image_size, encoder_depth=cfg.encoder_depth, encoder_width=cfg.encoder_width,
                 encoder_norm=cfg.encoder_norm, cond_dim=cfg.cond_dim, mask_ratio=cfg.mask_ratio,
                 mask_patch=cfg.mask_patch, decoder_width=cfg.decoder_width, normalize_target=cfg.normalize_target,
                 weight_decay=cfg.weight_decay)


def pretrain(cfg: SSLConfig, log=print) -> FitResult:
    """Stage ``ssl``: SparK on IXI ``weighting`` fold ``fold`` (resumable), then save the best encoder."""
    train_set, val_set = load_fold(cfg)
    model = build_spark(cfg, train_set.image_size)
    run_dir = ssl_encoder_path(cfg.profile, cfg.weighting, cfg.fold).parent
    info = {"hparams": dict(model.hparams), "mask_patch_px": model.patch, "mask_grid": list(model.grid),
            "train_subjects": train_set.subject_ids, "val_subjects": val_set.subject_ids}
    result = fit(model, cfg, run_dir, train_set, val_set, info=info, log=log)
    save_encoder_weights(result.model.encoder, run_dir / "encoder.pt", step=result.best_step,
                         val_loss=float(result.best_val), mask_ratio=cfg.mask_ratio)
    return result


def plot_masked_reconstructions(model: SparK, cohort, n: int = 4, seed: int = 0):
    """Rows: input, masked input (what the encoder sees), reconstruction of the masked patches."""
    import matplotlib.pyplot as plt

    device = next(model.parameters()).device
    x = torch.cat([cohort.slab(v, z)[0] for v, z in example_slices(cohort, n)]).to(device)
    model.eval()
    with isolated_rng(seed):
        out = model.masked_reconstruction(x)
    rows = [("input", x), ("masked input", out["masked_input"]), ("reconstruction", out["reconstruction"])]
    fig, axes = plt.subplots(3, n, figsize=(2 * n, 6), squeeze=False)
    for i, (label, images) in enumerate(rows):
        for j in range(n):
            axes[i, j].imshow(images[j, 0].cpu().numpy().T, cmap="gray", vmin=0, vmax=1, origin="lower")
            axes[i, j].set_axis_off()
        axes[i, 0].set_title(label, fontsize=8, loc="left")
    fig.tight_layout()
    return fig
