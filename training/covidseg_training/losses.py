"""Dice + cross-entropy loss, with the total-variation term of TV-UNet and a Tversky weighting of the
infection's Dice term (Salehi et al. 2017) as options."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .data import BACKGROUND, INFECTION, LUNG, LUNG_UNKNOWN


def soft_dice_loss(probabilities: torch.Tensor, target: torch.Tensor, classes: list[int],
                   known: torch.Tensor | None = None, missed_weight: dict[int, float] | None = None) -> torch.Tensor:
    """1 - mean soft Dice over ``classes``, pooled over the batch (stable when a slice lacks a class);
    pixels where ``known`` is False count for no class.

    ``missed_weight`` {class: beta} turns that class's Dice into the Tversky index TP / (TP + (1 - beta) FP +
    beta FN): beta 0.5 is the Dice, above it a missed pixel costs more than a false one."""
    losses = []
    for cls in classes:
        prob = probabilities[:, cls]
        truth = (target == cls).float()
        if known is not None:
            prob = prob * known
        true_positive = (prob * truth).sum()
        called, present = prob.sum(), truth.sum()
        beta = (missed_weight or {}).get(cls, 0.5)
        # 2 (TP + (1 - beta) FP + beta FN) = called + present + (2 beta - 1)(present - called); at beta 0.5 the
        # added term is exactly 0, so the Dice term is summed bit for bit as before the option existed.
        denominator = called + present + (2 * beta - 1) * (present - called)
        losses.append(1 - (2 * true_positive + 1) / (denominator + 1))
    return torch.stack(losses).mean()


def total_variation(probabilities: torch.Tensor) -> torch.Tensor:
    """Anisotropic TV of foreground probabilities (TV-UNet, Saeedizadeh et al. 2021)."""
    foreground = probabilities[:, 1:]
    dx = (foreground[..., :, 1:] - foreground[..., :, :-1]).abs().mean()
    dy = (foreground[..., 1:, :] - foreground[..., :-1, :]).abs().mean()
    return dx + dy


def segmentation_loss(
    logits: torch.Tensor, target: torch.Tensor, dice_weight: float = 1.0, tv_weight: float = 0.0,
    infection_missed_weight: float = 0.5,
) -> torch.Tensor:
    """Cross-entropy + ``dice_weight`` x soft Dice of lung and infection (+ total variation).
    ``infection_missed_weight`` above 0.5 makes the infection's Dice term a Tversky index that weighs
    missed infection more than false infection (:func:`soft_dice_loss`).

    Pixels labelled ``LUNG_UNKNOWN`` take the cross-entropy of "lung or infection" (minus the log of
    the two probabilities summed) and no part in the Dice terms.
    """
    logits = logits.float()
    log_probabilities = F.log_softmax(logits, dim=1)
    unknown = target == LUNG_UNKNOWN
    if unknown.any():
        known_target = target.masked_fill(unknown, BACKGROUND).long()
        pixel_loss = -log_probabilities.gather(1, known_target[:, None]).squeeze(1)
        lung_or_infection = -torch.logsumexp(log_probabilities[:, [LUNG, INFECTION]], dim=1)
        loss = torch.where(unknown, lung_or_infection, pixel_loss).mean()
        known = (~unknown).float()
    else:
        loss = F.nll_loss(log_probabilities, target.long())
        known = None
    probabilities = log_probabilities.exp()
    loss = loss + dice_weight * soft_dice_loss(probabilities, target, list(range(1, logits.shape[1])), known,
                                               {INFECTION: infection_missed_weight})
    if tv_weight:
        loss = loss + tv_weight * total_variation(probabilities)
    return loss


def deep_supervision_loss(outputs: list[torch.Tensor], target: torch.Tensor, dice_weight: float = 1.0,
                          tv_weight: float = 0.0, infection_missed_weight: float = 0.5) -> torch.Tensor:
    """:func:`segmentation_loss` of the full-size logits and of each coarser auxiliary output (against
    the labels subsampled to its size), weighted 1, 1/2, 1/4, ... and normalised to sum 1 (nnU-Net)."""
    weights = [0.5**level for level in range(len(outputs))]
    total = outputs[0].new_zeros((), dtype=torch.float32)
    for level, (logits, weight) in enumerate(zip(outputs, weights)):
        step = 2**level
        total = total + weight * segmentation_loss(logits, target[..., ::step, ::step], dice_weight, tv_weight,
                                                  infection_missed_weight)
    return total / sum(weights)
