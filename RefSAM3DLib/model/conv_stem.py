"""A convolutional stem for the ViT (the hybrid ``small`` config; not in the paper).

A ViT trained from scratch on a few dozen volumes learns slowly, and 8-voxel tokens cannot draw
the boundary of a thin structure (aorta, veins, adrenals). As in TransUNet and UNETR, a few
convolution levels run before the tokens are formed:

    image (B, 1, D, H, W) -> level 0 (B, c0, D, H, W) -> level 1 (B, c1, D/2, ...) -> ...
                          -> tokens (B, D/k, H/k, W/k, C) by a strided convolution

and the level outputs go to the pixel decoder as U-Net skips (finest first). Blocks are MONAI's
``UnetResBlock`` (two 3x3x3 convolutions, instance norm, residual), as in UNETR / SwinUNETR.
``vit_b`` keeps SAM's patch embedding instead (``ModelConfig.stem_channels == ()``).
"""

from __future__ import annotations

import torch
from monai.networks.blocks import UnetResBlock
from torch import nn


class ConvStem(nn.Module):
    """(B, 1, D, H, W) -> tokens (B, D/k, H/k, W/k, C) and one feature map per level.

    Args:
        channels: channels of each level (c0 at full resolution, each next level at half).
        patch_size: k, the token edge in voxels; ``2 ** (len(channels) - 1)`` must divide it.
        embed_dim: C, the token width.
    """

    def __init__(self, channels: tuple[int, ...], patch_size: int, embed_dim: int) -> None:
        super().__init__()
        levels = len(channels)
        stride_left = patch_size // 2 ** (levels - 1)
        if stride_left < 1 or stride_left * 2 ** (levels - 1) != patch_size:
            raise ValueError(f"{levels} stem levels do not fit patch size {patch_size}")
        in_channels = (1,) + tuple(channels[:-1])
        self.levels = nn.ModuleList(
            UnetResBlock(3, c_in, c_out, kernel_size=3, stride=1 if level == 0 else 2, norm_name="instance")
            for level, (c_in, c_out) in enumerate(zip(in_channels, channels))
        )
        self.to_tokens = nn.Conv3d(channels[-1], embed_dim, kernel_size=stride_left, stride=stride_left)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Returns tokens (B, d, h, w, C) and the level outputs, finest first."""
        features = []
        for level in self.levels:
            x = level(x)
            features.append(x)
        return self.to_tokens(x).permute(0, 2, 3, 4, 1), features
