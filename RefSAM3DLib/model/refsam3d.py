"""The assembled RefSAM3D network (paper Fig. 1): encode the window once, decode P text prompts.

    features = model.encode_image(image)            # image (B, 1, D, H, W) in [0, 1], D = H = W = window
    prompts = model.encode_prompts(["liver", ...])   # P prompts
    logits = model.decode(image, features, prompts)  # (B, P, D, H, W) mask logits

``encode_image`` runs the ViT, the neck and every prompt-independent part of the decoder (the
up-sampling path and the image half of the final fusion) once; ``decode`` only adds the
per-prompt work at token resolution plus a few FLOPs per voxel per prompt.

Trainable parameters: with a SAM-initialised image encoder (``vit_b``) only the PETL parts of
the encoder train (adapters, depth-wise patch conv, depth position and relative-position
tables, neck) plus the prompt fusion and decoder; in configs trained from scratch
(``small``) every image-side weight trains. The text encoder is always frozen.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..errors import RefSAM3DError
from .config import ModelConfig
from .image_encoder import ImageEncoderViT3D
from .mask_decoder import MaskDecoder3D, PixelDecoder
from .prompt_encoder import NO_TEXT_PROMPT, PositionEmbeddingRandom3D, SpatialPromptEncoder, click_labels
from .prompt_fusion import CrossModalProjector, HierarchicalCrossAttention
from .text_encoder import TextEncoder


@dataclass
class ImageFeatures:
    """Everything prompt-independent about one batch of windows.

    Attributes:
        embedding: (B, C, d, h, w) neck embedding.
        stage_queries: (4, B, heads, d*h*w, head_dim) image half of the hierarchical cross-attention.
        pixel_features: (B, C_pix, D, H, W) shared up-sampled features (U-shaped aggregation).
        image_term: (B, F, D, H, W) image half of the final fusion convolution.
    """

    embedding: torch.Tensor
    stage_queries: torch.Tensor
    pixel_features: torch.Tensor
    image_term: torch.Tensor

    def select(self, b: int) -> "ImageFeatures":
        """Window ``b`` of the batch, as a batch of one (stage_queries carry the batch on dim 1)."""
        return ImageFeatures(self.embedding[b:b + 1], self.stage_queries[:, b:b + 1],
                             self.pixel_features[b:b + 1], self.image_term[b:b + 1])


@dataclass
class PromptEmbeddings:
    """P text prompts projected into the decoder space (Eq. III).

    Attributes:
        texts: the P prompt texts.
        tokens: (P, L, C) projected word embeddings.
        mask: (P, L) bool, True for real tokens.
        sentence: (P, C) projected sentence embedding (a sparse token for the decoder).
    """

    texts: list[str]
    tokens: torch.Tensor
    mask: torch.Tensor
    sentence: torch.Tensor


class RefSAM3D(nn.Module):
    """Text-prompted 3D segmentation network, assembled from ready parts (``build.build_model``
    makes them from a config, as ``segment_anything``'s ``build_sam`` does for ``Sam``).

    Args:
        config: the ModelConfig the parts were made from (``config.MODEL_CONFIGS``): its window
            size checks inputs, and checkpoints record it.
        image_encoder: the 3D ViT with adapters and neck.
        text_encoder: a ready TextEncoder of width ``config.text_dim``; frozen here.
        projector: text embeddings -> decoder width (Eq. III).
        cross_attention: the hierarchical text-image cross-attention.
        pe: the decoder's 3D positional encoding.
        spatial_prompts: points / boxes -> sparse tokens (sharing ``pe``).
        pixel_decoder: the prompt-independent up-sampling path.
        mask_decoder: SAM's two-way transformer and the per-prompt mask head.
    """

    def __init__(
        self,
        config: ModelConfig,
        image_encoder: ImageEncoderViT3D,
        text_encoder: TextEncoder,
        projector: CrossModalProjector,
        cross_attention: HierarchicalCrossAttention,
        pe: PositionEmbeddingRandom3D,
        spatial_prompts: SpatialPromptEncoder,
        pixel_decoder: PixelDecoder,
        mask_decoder: MaskDecoder3D,
    ) -> None:
        super().__init__()
        self.config = config
        # name -> SHA-256 of base-weight files loaded into this model (recorded in checkpoints).
        self.base_weights: dict[str, str] = {}
        # Facts from the checkpoint this model was loaded from (name, version, structures, ...).
        self.metadata: dict = {}
        if text_encoder.dim != config.text_dim:
            raise RefSAM3DError(
                f"Text encoder width {text_encoder.dim} does not match config text_dim {config.text_dim}."
            )
        self.image_encoder = image_encoder
        self.text_encoder = text_encoder.requires_grad_(False)
        self.projector = projector
        self.cross_attention = cross_attention
        self.pe = pe
        self.spatial_prompts = spatial_prompts
        self.pixel_decoder = pixel_decoder
        self.mask_decoder = mask_decoder
        if config.pretrained_image_encoder:
            petl = self.image_encoder.petl_parameter_names()
            for name, param in self.image_encoder.named_parameters():
                param.requires_grad_(name in petl)

    def _check_image(self, image: torch.Tensor) -> None:
        s = self.config.window_size_vox
        if image.ndim != 5 or image.shape[1] != 1 or tuple(image.shape[2:]) != (s, s, s):
            raise RefSAM3DError(
                f"Model input must have shape (B, 1, {s}, {s}, {s}) for config {self.config.name!r}, "
                f"got {tuple(image.shape)}; use the sliding-window engine for other sizes."
            )

    def encode_image(self, image: torch.Tensor) -> ImageFeatures:
        """ONE image-encoder pass and all prompt-independent decoder work. image: (B, 1, D, H, W)."""
        self._check_image(image)
        embedding, stages, stem_features = self.image_encoder(image)
        pixel_features, image_term = self.pixel_decoder(embedding, stages, image, stem_features)
        return ImageFeatures(embedding, self.cross_attention.stage_queries(stages), pixel_features, image_term)

    def encode_prompts(self, texts: list[str]) -> PromptEmbeddings:
        """Frozen text encoding (cached by text) + trainable projection of P prompts."""
        text = self.text_encoder(list(texts))
        return PromptEmbeddings(list(texts), self.projector(text.tokens), text.mask, self.projector(text.pooled))

    def decode(
        self,
        image: torch.Tensor,
        features: ImageFeatures,
        prompts: PromptEmbeddings,
        points_dhw: torch.Tensor | None = None,
        point_labels: torch.Tensor | None = None,
        boxes_dhw: torch.Tensor | None = None,
        dense: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Mask logits (B, P, D, H, W) for P prompts from one ``encode_image`` result.

        Args:
            image: (B, 1, D, H, W) the encoded window (the gesture maps read its intensities).
            features: from ``encode_image``.
            prompts: from ``encode_prompts``.
            points_dhw: optional (P, N, 3) voxel coordinates of clicks, with point_labels (P, N)
                1 positive / 0 negative / -1 padding.
            boxes_dhw: optional (P, 6) boxes (d0, h0, w0, d1, h1, w1) in voxels.
            dense: ``text_dense(features, prompts)`` when the caller kept it (None: computed).
        """
        self._check_image(image)
        grid = tuple(features.embedding.shape[2:])
        if dense is None:
            dense = self.text_dense(features, prompts)
        sparse = prompts.sentence[:, None]
        has_text = [text != NO_TEXT_PROMPT for text in prompts.texts]
        token_labels = self._token_labels(point_labels, points_dhw, has_text)
        spatial = self.spatial_prompts(tuple(image.shape[2:]), points_dhw, token_labels, boxes_dhw)
        if spatial is not None:
            sparse = torch.cat([sparse, spatial], dim=1)
        return self.mask_decoder(
            features.embedding, self.pe.grid(grid), dense, sparse, features.pixel_features, features.image_term,
            points_dhw, point_labels, boxes_dhw, has_text, image,
        )

    def text_dense(self, features: ImageFeatures, prompts: PromptEmbeddings) -> torch.Tensor:
        """(B, P, d*h*w, C) the prompts' dense embedding: their text's hierarchical cross-attention
        with the windows' stages. It depends on no gesture, so an interactive session computes it
        once per window and prompt, not once per click."""
        return self.cross_attention(features.stage_queries, prompts.tokens, prompts.mask)

    def _token_labels(self, point_labels: torch.Tensor | None, points_dhw: torch.Tensor | None,
                      has_text: list[bool]) -> torch.Tensor | None:
        """The click labels the sparse tokens see: with ``config.local_clicks_with_text``, the clicks
        of prompts with text become padding there, so that they act only through the click prior
        and the gesture maps (which know what the text answered at them). Why: a positive click's
        token reaches every voxel through the mask token, and refsam3d-small-v12's grew kidneys that
        text had right (1.02x -> 1.08x their volume on its own training windows; 1.05x without the
        token); without text the token is what finds the structure."""
        if not self.config.local_clicks_with_text or points_dhw is None:
            return point_labels
        labels = click_labels(points_dhw, point_labels)
        with_text = torch.tensor(has_text, device=labels.device)[:, None]
        return torch.where(with_text, torch.full_like(labels, -1), labels)

    def forward(self, image: torch.Tensor, texts: list[str], **spatial) -> torch.Tensor:
        """``decode(image, encode_image(image), encode_prompts(texts))``: (B, P, D, H, W) logits."""
        return self.decode(image, self.encode_image(image), self.encode_prompts(texts), **spatial)

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """The parameters that training changes (what a RefSAM3D checkpoint stores)."""
        return {name: p.detach() for name, p in self.named_parameters() if p.requires_grad}
