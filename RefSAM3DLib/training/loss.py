"""The training loss: one binary problem per prompt.

Each prompt of a window is its own yes/no question per voxel, so the loss is a per-prompt sigmoid
binary cross-entropy plus a soft Dice term. Two traps this avoids:

* MONAI's ``DiceCELoss(sigmoid=True)`` on more than one channel computes its CE term as a
  *softmax* cross-entropy across the channels; with P >= 2 prompts the gradient on an
  all-background voxel is then exactly zero, so false positives cost nothing;
* a Dice term on an empty target is 1 for every prediction but the empty one and teaches nothing
  but "predict less" through a near-constant gradient; empty targets (a structure absent from the
  window) are taught by the cross-entropy alone.

The Dice term is per prompt, so a small structure weighs as much as the liver.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from monai.losses import DiceLoss
from torch import nn


class PromptLoss(nn.Module):
    """BCE-with-logits over every prompt + soft Dice over prompts with a non-empty target.

    Args:
        dice_weight: weight of the Dice term against the cross-entropy.

    ``forward(logits (B, P, D, H, W), target (B, P, D, H, W) in {0, 1}) -> scalar``.
    """

    def __init__(self, dice_weight: float = 1.0) -> None:
        super().__init__()
        self.dice_weight = dice_weight
        self.dice = DiceLoss(sigmoid=True, reduction="none", smooth_nr=1e-5, smooth_dr=1e-5)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        target = target.to(logits.dtype)
        bce = F.binary_cross_entropy_with_logits(logits, target)
        present = target.flatten(2).amax(dim=2) > 0  # (B, P)
        if not present.any():
            return bce
        dice = self.dice(logits, target).reshape(present.shape)
        return bce + self.dice_weight * dice[present].mean()
