"""The one interface every anomaly-detection model of the kit implements.

Training (``cddpm_lib.train``) and evaluation (``cddpm_lib.reconstruct``) only talk to this interface, so
DDPM, cDDPM, pDDPM, AE, VAE, SVAE, DAE, f-AnoGAN and Thresh are interchangeable.

Batches are dicts of tensors::

    batch["image"]: [B, 1, H, W] float in [0, 1]   axial slices
    batch["mask"]:  [B, 1, H, W] float in {0, 1}   brain mask of those slices

For models with ``slab_length = L > 1`` (SVAE) the training sampler delivers ``B = n_slabs * L`` slices in
which every run of ``L`` consecutive rows is a contiguous stack of neighbouring slices of one volume.
"""
from __future__ import annotations

from typing import Any, ClassVar, Sequence

import torch
from torch import Tensor, nn


class UADModel(nn.Module):
    """Base class: subclasses implement :meth:`loss` and :meth:`reconstruct` (or :meth:`anomaly_map`)."""

    name: ClassVar[str] = "base"
    #: False for models without parameters to learn (Thresh): the training stage skips them.
    trainable: ClassVar[bool] = True
    #: >1: training batches are stacks of this many consecutive slices (SVAE).
    slab_length: ClassVar[int] = 1
    #: True: :meth:`reconstruct` must see all slices of a volume at once, in order (SVAE).
    needs_whole_volume: ClassVar[bool] = False

    def __init__(self, **hparams: Any) -> None:
        super().__init__()
        #: keyword arguments that rebuild this model with ``build_model(name, **hparams)``; stored in checkpoints
        self.hparams: dict[str, Any] = dict(hparams)

    # --- training -------------------------------------------------------------------------------------
    def loss(self, batch: dict[str, Tensor]) -> Tensor:
        """Scalar training loss of a batch."""
        raise NotImplementedError

    def configure_optimizers(self, lr: float) -> list[torch.optim.Optimizer]:
        """Optimisers (paper: Adam). GAN-type models return several."""
        return [torch.optim.Adam(self.parameters(), lr=lr)]

    def training_step(
        self, batch: dict[str, Tensor], optimizers: Sequence[torch.optim.Optimizer], step: int,
        grad_clip: float | None = None,
    ) -> dict[str, float]:
        """One optimisation step; returns the logged losses. Override for multi-optimiser models."""
        (opt,) = optimizers
        opt.zero_grad(set_to_none=True)
        loss = self.loss(batch)
        loss.backward()
        if grad_clip:
            torch.nn.utils.clip_grad_norm_(self.parameters(), grad_clip)
        opt.step()
        return {"loss": float(loss.detach())}

    @torch.no_grad()
    def validation_loss(self, batch: dict[str, Tensor]) -> float:
        """Score on healthy validation slices (lower is better; selects ``best.pt``)."""
        return float(self.loss(batch))

    # --- inference ------------------------------------------------------------------------------------
    @torch.no_grad()
    def reconstruct(self, x: Tensor, mask: Tensor | None = None, **kwargs: Any) -> Tensor:
        """Pseudo-healthy reconstruction ``x̂`` of slices ``x: [B, 1, H, W]`` -> ``[B, 1, H, W]``."""
        raise NotImplementedError

    @torch.no_grad()
    def anomaly_map(self, x: Tensor, mask: Tensor | None = None, **kwargs: Any) -> Tensor:
        """Residual ``R = |x − x̂|`` ([B, 1, H, W]); Thresh overrides it (no reconstruction)."""
        return (x - self.reconstruct(x, mask, **kwargs)).abs()
