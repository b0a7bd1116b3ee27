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

The per-prompt terms never compare prompts with each other, but the label map does: a voxel goes to
the most probable prompt. A prompt that fires at 0.7 on a neighbour its own BCE only mildly
penalises still takes the neighbour's voxels (v4: "right kidney" at 0.71 inside the aorta, "aorta"
at 0.51 there). The optional *exclusive* term is the label map's own loss: a softmax
cross-entropy over ``[background, prompt 1..P]`` per voxel, the background's logit fixed at 0, so
that "prompt k wins" and "sigmoid(logit k) > 0.5" stay the same decision. It holds because a
window's targets come from one label map and never overlap (voxels claimed twice are skipped);
with P = 1 it equals the BCE.

Targets may be partial-volume fractions in [0, 1] (``training.partial_volume_targets``): the BCE
then places each logit's zero where half of the voxel is inside, which is where the mask's edge is
drawn once the logits are interpolated onto the input's finer grid; the exclusive term keeps the
majority label of each voxel.
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
        exclusive_weight: weight of the cross-prompt label-map cross-entropy (0 = off).

    ``forward(logits (B, P, D, H, W), target (B, P, D, H, W) in [0, 1]) -> scalar``.
    """

    def __init__(self, dice_weight: float = 1.0, exclusive_weight: float = 0.0) -> None:
        super().__init__()
        self.dice_weight = dice_weight
        self.exclusive_weight = exclusive_weight
        self.dice = DiceLoss(sigmoid=True, reduction="none", smooth_nr=1e-5, smooth_dr=1e-5)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        target = target.to(logits.dtype)
        cross_entropy = F.binary_cross_entropy_with_logits(logits, target)
        if self.exclusive_weight > 0:
            cross_entropy = cross_entropy + self.exclusive_weight * exclusive_cross_entropy(logits, target)
        present = target.flatten(2).amax(dim=2) > 0  # (B, P)
        if not present.any():
            return cross_entropy
        dice = self.dice(logits, target).reshape(present.shape)
        return cross_entropy + self.dice_weight * dice[present].mean()


def exclusive_cross_entropy(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Softmax cross-entropy of the label map over ``[background (logit 0), prompt 1..P]``.

    Args:
        logits: (B, P, D, H, W) per-prompt logits.
        target: (B, P, D, H, W) in [0, 1]; a voxel belongs to a prompt whose target exceeds 0.5,
            at most one prompt per voxel (others are skipped).
    Returns:
        the mean over voxels claimed by at most one prompt (a scalar).
    """
    claims = (target > 0.5).sum(dim=1)  # (B, D, H, W)
    owner = torch.where(claims > 0, target.argmax(dim=1) + 1, 0)
    scores = torch.cat([torch.zeros_like(logits[:, :1]), logits], dim=1)
    per_voxel = F.cross_entropy(scores, owner, reduction="none")
    return per_voxel[claims <= 1].mean()
