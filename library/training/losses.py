"""The per-sample training loss: elementwise loss by type, optional loss mask, mean per sample.

Loss types and formulas follow sd-scripts' `conditional_loss` (l2, l1, and its pseudo-Huber "huber"
and "smooth_l1" with a per-sample threshold c from the noise scheme); masking follows sd-scripts'
`apply_masked_loss`: the mask (alpha channel, 0..1) is area-resized to the latent size and multiplies
the elementwise loss before the mean over channels and pixels. As in sd-scripts the mean is not
renormalized by the mask's coverage, so a half-masked image contributes half the loss of a full one.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Optional

from library.training.noise import LOSS_TYPES

if TYPE_CHECKING:
    import torch


def resize_mask_to_latents(mask: "torch.Tensor", latent_hw: tuple[int, int]) -> "torch.Tensor":
    """A [B,1,H,W] (or [B,H,W]) mask in 0..1 area-averaged to [B,1,h,w] at the latent size."""
    import torch.nn.functional as F

    if mask.ndim == 3:
        mask = mask.unsqueeze(1)
    if mask.ndim != 4 or mask.shape[1] != 1:
        raise ValueError(f"loss mask must be [B,1,H,W] or [B,H,W], got {tuple(mask.shape)}")
    mask = mask.float()
    if tuple(mask.shape[-2:]) == tuple(latent_hw):
        return mask
    return F.interpolate(mask, size=tuple(latent_hw), mode="area")


def elementwise_loss(pred: "torch.Tensor", target: "torch.Tensor", loss_type: str,
                     huber_c: Optional["torch.Tensor"] = None) -> "torch.Tensor":
    """Unreduced loss, same shape as pred; huber_c [B] is needed for huber and smooth_l1."""
    import torch.nn.functional as F

    if loss_type == "l2":
        return F.mse_loss(pred, target, reduction="none")
    if loss_type == "l1":
        return F.l1_loss(pred, target, reduction="none")
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"unknown loss type {loss_type!r}; expected one of {LOSS_TYPES}")
    if huber_c is None:
        raise ValueError(f"loss type {loss_type} needs a per-sample huber_c")
    c = huber_c.to(pred.device, pred.dtype).view(-1, *([1] * (pred.ndim - 1)))
    pseudo_huber = ((pred - target) ** 2 + c**2).sqrt() - c
    return 2 * c * pseudo_huber if loss_type == "huber" else 2 * pseudo_huber


def per_sample_loss(pred: "torch.Tensor", target: "torch.Tensor", loss_type: str,
                    huber_c: Optional["torch.Tensor"] = None,
                    mask: Optional["torch.Tensor"] = None) -> "torch.Tensor":
    """Float32 loss of each sample [B]: elementwise loss (masked if given) averaged over the rest."""
    loss = elementwise_loss(pred.float(), target.float(), loss_type, huber_c)
    if mask is not None:
        if loss.ndim != 4:
            raise ValueError(f"a loss mask needs [B,C,H,W] predictions, got {tuple(loss.shape)}")
        loss = loss * resize_mask_to_latents(mask, tuple(loss.shape[-2:])).to(loss.device)
    return loss.mean(dim=tuple(range(1, loss.ndim)))
