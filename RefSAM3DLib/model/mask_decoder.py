"""3D mask decoder (paper section 3.4), split into a shared and a per-prompt part.

Cost rule: P prompts must cost little more than one per window. So everything at full
resolution that does not need the prompt is computed ONCE per window (``PixelDecoder``):

* U-shaped aggregation: the neck embedding (stage 4) is up-sampled by log2(patch_size)
  progressive 2x transposed 3D convolutions (4 for patch 16 as in the paper, 3 for patch 8).
  Before up-sampling step l (l = 0, 1, 2) the stage-(3-l) features, projected by a 1x1x1 conv
  and trilinearly resized to that step's input, are added: deeper stages join at coarser
  levels, as in a U-Net. No stage joins at full resolution, where token-resolution features
  would add cost but no detail (the detail comes from the image fusion below);
* the image half of the final fusion convolution (3x3x3 over the input image).

Prompts enter cheaply (``MaskDecoder3D``), at token resolution:

* the dense cross-modal prompt embedding (hierarchical cross-attention) is added to the neck
  embedding, as SAM adds its dense prompt embedding;
* SAM's ``TwoWayTransformer`` runs over the 3D tokens (with a 3D positional encoding) and the
  sparse tokens [mask token, projected sentence embedding, optional points/boxes];
* a hypernetwork MLP turns the mask token into a vector that is dotted with the shared
  full-resolution features (SAM's mask-decoder scheme) -> a coarse mask logit per prompt;
* with ``token_logits``, a second hypernetwork vector is dotted with the transformer's updated
  image tokens (which are per prompt: they attended to the clicks and the box) and the token-grid
  logit is trilinearly up-sampled and added. This is where a gesture says *where*: the shared
  features know nothing of the prompt, and the mask token alone only says *what*. Its last layer
  starts at zero, so adding it to a trained model changes no output until it trains;
* with ``click_prior``, each click corrects its prompt's coarse logits at full resolution, at and
  around the click where the pixel features look like the clicked voxel's (``click_prior.py``):
  the token grid is too coarse for a click to fix a miss a few voxels wide;
* with ``gesture_maps``, the box and clicks drawn as full-resolution maps are read voxel by voxel
  with the pixel features, and correct the coarse logits on the crop they reach
  (``gesture_maps.py``);
* the light per-prompt fusion with the image: the paper concatenates [mask logit, image] and
  applies a 3D convolution. That convolution is linear in its input channels, so it is computed
  as (3x3x3 conv of the image, shared) + (1x1x1 conv of the mask logit, per prompt), followed by
  GELU and a 1x1x1 conv to one logit added to the coarse logit. The mask channel's kernel is
  pointwise to keep the per-prompt cost at a few FLOPs per voxel.

Unlike SAM, the up-sampled features do not come from the transformer's updated image tokens
(those are per prompt, and up-sampling them per prompt would cost what the shared path saves);
the updated tokens reach the mask only at token resolution, through ``token_logits``.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from monai.networks.blocks import UnetResBlock
from segment_anything.modeling.mask_decoder import MLP
from segment_anything.modeling.transformer import TwoWayTransformer

from .click_prior import ClickPrior
from .gesture_maps import GestureMaps
from .image_encoder import LayerNorm3d


class PixelDecoder(nn.Module):
    """Prompt-independent full-resolution features, computed once per window.

    Args:
        neck_dim: channels of the neck embedding.
        stage_dim: channels of the stage features.
        upsample_channels: channels after each 2x step (log2(patch_size) entries).
        fusion_channels: channels of the final image/mask fusion.
        skip_channels: channels of the convolutional stem's levels, finest first (hybrid config):
            after each up-sampling step the level of the same resolution is concatenated and
            merged by a MONAI ``UnetResBlock``, as in UNETR's decoder. Empty: no stem skips.
    """

    def __init__(self, neck_dim: int, stage_dim: int, upsample_channels: tuple[int, ...], fusion_channels: int,
                 skip_channels: tuple[int, ...] = ()) -> None:
        super().__init__()
        steps = len(upsample_channels)
        channels_in = (neck_dim,) + tuple(upsample_channels[:-1])
        self.up = nn.ModuleList(
            nn.Sequential(
                nn.ConvTranspose3d(c_in, c_out, kernel_size=2, stride=2),
                LayerNorm3d(c_out) if l < steps - 1 else nn.Identity(),
                nn.GELU(),
            )
            for l, (c_in, c_out) in enumerate(zip(channels_in, upsample_channels))
        )
        # Up-sampling step l takes stage index 2 - l (stage 3, then 2, then 1) at its input.
        self.skips = nn.ModuleList(nn.Conv3d(stage_dim, c, kernel_size=1) for c in channels_in[: min(3, steps)])
        # Up-sampling step l ends at the resolution of stem level steps - 1 - l: the last
        # len(skip_channels) steps each merge one level, the coarsest first.
        self.first_merge = steps - len(skip_channels)
        self.stem_merge = nn.ModuleList(
            UnetResBlock(3, upsample_channels[l] + skip_channels[steps - 1 - l], upsample_channels[l],
                         kernel_size=3, stride=1, norm_name="instance")
            for l in range(self.first_merge, steps)
        )
        self.image_conv = nn.Conv3d(1, fusion_channels, kernel_size=3, padding=1)

    def forward(self, embedding: torch.Tensor, stages: list[torch.Tensor], image: torch.Tensor,
                stem_features: list[torch.Tensor] = ()) -> tuple[torch.Tensor, torch.Tensor]:
        """
        Args:
            embedding: (B, neck_dim, d, h, w) neck output.
            stages: 4 x (B, d, h, w, stage_dim) adapted stage features.
            image: (B, 1, D, H, W) model input.
            stem_features: the convolutional stem's level outputs, finest first (or none).

        Returns:
            pixel features (B, upsample_channels[-1], D, H, W) and image fusion term (B, F, D, H, W).
        """
        x = embedding
        for l, up in enumerate(self.up):
            if l < len(self.skips):
                skip = self.skips[l](stages[2 - l].permute(0, 4, 1, 2, 3))
                if skip.shape[2:] != x.shape[2:]:
                    skip = trilinear_upsample(skip, x.shape[2:])
                x = x + skip
            x = up(x)
            if l >= self.first_merge:
                level = len(self.up) - 1 - l
                x = self.stem_merge[l - self.first_merge](torch.cat([x, stem_features[level]], dim=1))
        return x, self.image_conv(image)


class MaskDecoder3D(nn.Module):
    """Per-prompt decoding at token resolution, then a cheap full-resolution read-out.

    Args:
        dim: transformer width C (= neck_dim).
        depth: TwoWayTransformer layers.
        num_heads: TwoWayTransformer heads.
        mlp_dim: TwoWayTransformer MLP width.
        pixel_dim: channels of the shared full-resolution features.
        fusion_channels: channels of the final image/mask fusion.
        token_logits: add the per-prompt logit of the updated image tokens (see the module doc).
        click_prior: correct the coarse logits at and around clicks (``click_prior.ClickPrior``).
        gesture_maps: correct them from the gestures drawn as maps (``gesture_maps.GestureMaps``).
        gesture_text_biases: the gesture maps' MLP has its own biases for prompts with text.
        gesture_intensity: the gesture maps' MLP also reads the window's intensities.
    """

    def __init__(self, dim: int, depth: int, num_heads: int, mlp_dim: int, pixel_dim: int, fusion_channels: int,
                 token_logits: bool = False, click_prior: bool = False, gesture_maps: bool = False,
                 gesture_text_biases: bool = False, gesture_intensity: bool = False) -> None:
        super().__init__()
        self.transformer = TwoWayTransformer(depth=depth, embedding_dim=dim, num_heads=num_heads, mlp_dim=mlp_dim)
        self.mask_token = nn.Embedding(1, dim)
        self.hypernetwork = MLP(dim, dim, pixel_dim, num_layers=3)
        self.mask_conv = nn.Conv3d(1, fusion_channels, kernel_size=1)
        self.out_conv = nn.Conv3d(fusion_channels, 1, kernel_size=1)
        self.token_hypernetwork = None
        if token_logits:
            self.token_hypernetwork = MLP(dim, dim, dim, num_layers=3)
            nn.init.zeros_(self.token_hypernetwork.layers[-1].weight)
            nn.init.zeros_(self.token_hypernetwork.layers[-1].bias)
        self.click_prior = ClickPrior(pixel_dim) if click_prior else None
        self.gesture_maps = None
        if gesture_maps:
            self.gesture_maps = GestureMaps(pixel_dim, text_biases=gesture_text_biases, intensity=gesture_intensity)

    def forward(
        self,
        embedding: torch.Tensor,
        image_pe: torch.Tensor,
        dense: torch.Tensor,
        sparse: torch.Tensor,
        pixel_features: torch.Tensor,
        image_term: torch.Tensor,
        points_dhw: torch.Tensor | None = None,
        point_labels: torch.Tensor | None = None,
        boxes_dhw: torch.Tensor | None = None,
        has_text: Sequence[bool] | None = None,
        image: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """
        Args:
            embedding: (B, C, d, h, w) neck embedding.
            image_pe: (C, d, h, w) positional encoding of the token grid.
            dense: (B, P, d*h*w, C) cross-modal prompt embeddings.
            sparse: (P, T, C) sparse prompt tokens.
            pixel_features: (B, C_pix, D, H, W) shared up-sampled features.
            image_term: (B, F, D, H, W) shared image half of the fusion convolution.
            points_dhw, point_labels: the clicks (P, N, 3) and their labels (P, N), for the click
                prior (``click_prior.py``), which corrects the coarse logits before the fusion with
                the image refines their edges.
            boxes_dhw: (P, 6) boxes in window voxels, for the gesture maps (with the clicks).
            has_text: P bools, whether each prompt has text (the gesture maps read it); None = all.
            image: (B, 1, D, H, W) the windows' intensities (the gesture maps read them).

        Returns:
            (B, P, D, H, W) mask logits.
        """
        b, c = embedding.shape[:2]
        p = sparse.shape[0]
        src = embedding.flatten(2).transpose(1, 2)[:, None] + dense  # (B, P, N, C)
        src = src.reshape(b * p, -1, c).transpose(1, 2)[..., None]  # (B*P, C, N, 1)
        pos = image_pe.flatten(1)[None, :, :, None].expand(b * p, -1, -1, -1)
        tokens = torch.cat([self.mask_token.weight.expand(p, -1, -1), sparse], dim=1)
        tokens = tokens[None].expand(b, -1, -1, -1).reshape(b * p, -1, c)
        hs, image_tokens = self.transformer(src, pos, tokens)  # (B*P, T, C), (B*P, N, C)
        hyper = self.hypernetwork(hs[:, 0]).reshape(b, p, -1)
        coarse = torch.einsum("bpc,bcdhw->bpdhw", hyper, pixel_features)
        if self.token_hypernetwork is not None:
            token_logit = torch.einsum("bnc,bc->bn", image_tokens, self.token_hypernetwork(hs[:, 0]))
            token_logit = token_logit.reshape(b, p, *embedding.shape[2:])
            coarse = coarse + trilinear_upsample(token_logit, pixel_features.shape[2:])
        coarse = coarse.float()
        if self.click_prior is not None and points_dhw is not None:
            coarse = self.click_prior(pixel_features, coarse, points_dhw, point_labels)
        if self.gesture_maps is not None and points_dhw is not None:  # the maps need a click
            coarse = self.gesture_maps(pixel_features, coarse, points_dhw, point_labels, boxes_dhw, has_text, image)
        return self._fuse_with_image(coarse, image_term.float())

    def _fuse_with_image(self, coarse: torch.Tensor, image_term: torch.Tensor) -> torch.Tensor:
        """The per-prompt fusion ``coarse + out_conv(GELU(image_term + mask_conv(coarse)))``, one
        prompt at a time (memory stays at one prompt's F channels), in float32: the read-out is
        memory-bound, and autocast would send the 4-channel sum through a bfloat16 matmul.

        Args:
            coarse: (B, P, D, H, W) float32 coarse logits.
            image_term: (B, F, D, H, W) float32 image half of the fusion convolution.
        Returns:
            (B, P, D, H, W) mask logits.
        """
        image_in = image_term + self.mask_conv.bias.view(1, -1, 1, 1, 1)
        weight_in = self.mask_conv.weight.view(1, -1, 1, 1, 1)
        weight_out = self.out_conv.weight.view(1, -1, 1, 1, 1)
        fine = [(F.gelu(torch.addcmul(image_in, coarse[:, i : i + 1], weight_in)) * weight_out).sum(dim=1)
                for i in range(coarse.shape[1])]
        return torch.stack(fine, dim=1) + coarse + self.out_conv.bias


def trilinear_upsample(x: torch.Tensor, size) -> torch.Tensor:
    """``F.interpolate(x, size, mode="trilinear", align_corners=False)`` for (B, C, d, h, w), in
    float32, as one small matrix product per axis (trilinear interpolation is separable): about 4x
    faster on CPU for the decoder's 12^3 -> 96^3 step.
    """
    with torch.autocast(x.device.type, enabled=False):
        x = x.float()
        for axis, length in zip((4, 3, 2), reversed(tuple(size))):
            inputs = torch.eye(x.shape[axis], device=x.device)[None]  # each input sample as a signal
            weights = F.interpolate(inputs, size=int(length), mode="linear", align_corners=False)[0]  # (in, out)
            x = torch.movedim(torch.movedim(x, axis, -1) @ weights, -1, axis)
        return x
