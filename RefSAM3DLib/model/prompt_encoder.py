"""3D positional encoding and optional spatial prompts (3D points and boxes).

SAM's random-Fourier ``PositionEmbeddingRandom`` is reused with a 3 x C/2 frequency matrix
(its ``_pe_encoding`` works for any coordinate dimension); the grid and point methods are 3D.
Spatial prompts follow SAM's ``PromptEncoder``: a point is its positional encoding plus a
learned label embedding (positive, negative, padding); a box is its two corner points with
their own corner embeddings. They are extra sparse tokens for interactive refinement.
Coordinates are voxel indices (d, h, w) of the model-space window.
"""

from __future__ import annotations

import torch
from torch import nn
from segment_anything.modeling.prompt_encoder import PositionEmbeddingRandom

NO_TEXT_PROMPT = "the structure at this point"
"""The text that accompanies points or a box given without a text prompt (the model always
decodes with a text embedding; this one names no structure)."""


def click_labels(points_dhw: torch.Tensor, point_labels: torch.Tensor | None) -> torch.Tensor:
    """(P, N) long click labels (1 positive, 0 negative, -1 padding) for (P, N, 3) clicks; None = all positive."""
    if point_labels is None:
        return torch.ones(points_dhw.shape[:-1], dtype=torch.long, device=points_dhw.device)
    return point_labels.long()


class PositionEmbeddingRandom3D(PositionEmbeddingRandom):
    """Random-Fourier positional encoding of 3D coordinates.

    Args:
        num_pos_feats: C/2 (the encoding has 2 * num_pos_feats channels).
    """

    def __init__(self, num_pos_feats: int) -> None:
        super().__init__(num_pos_feats)
        # A fixed seed: the frequencies are a buffer that checkpoints (trainable weights only) omit.
        generator = torch.Generator().manual_seed(0)
        self.positional_encoding_gaussian_matrix = torch.randn(3, num_pos_feats, generator=generator)

    def grid(self, size: tuple[int, int, int]) -> torch.Tensor:
        """Encoding of voxel centres of a (d, h, w) grid: (C, d, h, w)."""
        device = self.positional_encoding_gaussian_matrix.device
        axes = [(torch.arange(s, device=device, dtype=torch.float32) + 0.5) / s for s in size]
        coords = torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1)
        return self._pe_encoding(coords).permute(3, 0, 1, 2)

    def points(self, coords_dhw: torch.Tensor, size: tuple[int, int, int]) -> torch.Tensor:
        """(..., 3) voxel coordinates (d, h, w) in a grid of ``size`` -> (..., C)."""
        scale = torch.tensor(size, dtype=torch.float32, device=coords_dhw.device)
        return self._pe_encoding((coords_dhw.float() + 0.5) / scale)


class SpatialPromptEncoder(nn.Module):
    """3D points / boxes -> sparse tokens (P, N_tokens, C).

    Args:
        dim: C.
        pe: the decoder's positional encoding (shared, so points and image tokens agree).
    """

    def __init__(self, dim: int, pe: PositionEmbeddingRandom3D) -> None:
        super().__init__()
        self.pe = pe
        # 0: negative, 1: positive, 2 and 3: box corners; padding (-1) uses not_a_point.
        self.point_embeddings = nn.Embedding(4, dim)
        self.not_a_point = nn.Embedding(1, dim)

    def forward(
        self,
        size_vox: tuple[int, int, int],
        points_dhw: torch.Tensor | None = None,
        point_labels: torch.Tensor | None = None,
        boxes_dhw: torch.Tensor | None = None,
    ) -> torch.Tensor | None:
        """Sparse tokens for P prompts, or None without spatial prompts.

        Args:
            size_vox: (D, H, W) of the model input window.
            points_dhw: (P, N, 3) voxel coordinates.
            point_labels: (P, N) 1 positive, 0 negative, -1 padding; None = all positive.
            boxes_dhw: (P, 6) corners (d0, h0, w0, d1, h1, w1) in voxels.
        """
        tokens = []
        if points_dhw is not None:
            emb = self.pe.points(points_dhw, size_vox)
            labels = click_labels(points_dhw, point_labels)
            emb = torch.where((labels == -1)[..., None], self.not_a_point.weight[0], emb)
            emb = emb + self.point_embeddings(labels.clamp(min=0)) * (labels >= 0)[..., None]
            tokens.append(emb)
        if boxes_dhw is not None:
            corners = self.pe.points(boxes_dhw.reshape(-1, 2, 3), size_vox)
            tokens.append(corners + self.point_embeddings.weight[2:4])
        return torch.cat(tokens, dim=1) if tokens else None
