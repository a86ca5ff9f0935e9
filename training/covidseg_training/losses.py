"""Dice + cross-entropy loss, with the total-variation term of TV-UNet as an option."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def soft_dice_loss(probabilities: torch.Tensor, target: torch.Tensor, classes: list[int]) -> torch.Tensor:
    """1 - mean soft Dice over ``classes``, pooled over the batch (stable when a slice lacks a class)."""
    losses = []
    for cls in classes:
        prob = probabilities[:, cls]
        truth = (target == cls).float()
        intersection = (prob * truth).sum()
        denominator = prob.sum() + truth.sum()
        losses.append(1 - (2 * intersection + 1) / (denominator + 1))
    return torch.stack(losses).mean()


def total_variation(probabilities: torch.Tensor) -> torch.Tensor:
    """Anisotropic TV of foreground probabilities (TV-UNet, Saeedizadeh et al. 2021)."""
    foreground = probabilities[:, 1:]
    dx = (foreground[..., :, 1:] - foreground[..., :, :-1]).abs().mean()
    dy = (foreground[..., 1:, :] - foreground[..., :-1, :]).abs().mean()
    return dx + dy


def segmentation_loss(
    logits: torch.Tensor, target: torch.Tensor, dice_weight: float = 1.0, tv_weight: float = 0.0
) -> torch.Tensor:
    logits = logits.float()
    loss = F.cross_entropy(logits, target.long())
    probabilities = logits.softmax(dim=1)
    loss = loss + dice_weight * soft_dice_loss(probabilities, target, list(range(1, logits.shape[1])))
    if tv_weight:
        loss = loss + tv_weight * total_variation(probabilities)
    return loss
