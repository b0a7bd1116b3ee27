"""The builder: a RefSAM3D network composed from its parts, as ``segment_anything.build_sam``.

The parts (``image_encoder``, ``text_encoder``, ``prompt_fusion``, ``prompt_encoder``,
``mask_decoder``) and the assembled ``RefSAM3D`` know nothing of configs or of this module: here
each part is made from a ``ModelConfig`` (``config.py``, the registry ``MODEL_CONFIGS``) and the
parts are passed into ``RefSAM3D(...)``, as ``build_sam`` passes its encoders and decoder into
``Sam(...)``. Base weights (SAM, CLIP, MiniLM) are loaded afterwards: ``sam_weights.py``,
``text_encoder.py`` (``checkpoint.build_untrained`` does both).
"""

from __future__ import annotations

from .config import ModelConfig, get_config
from .image_encoder import ImageEncoderViT3D
from .mask_decoder import MaskDecoder3D, PixelDecoder
from .prompt_encoder import PositionEmbeddingRandom3D, SpatialPromptEncoder
from .prompt_fusion import CrossModalProjector, HierarchicalCrossAttention
from .refsam3d import RefSAM3D
from .text_encoder import TextEncoder, build_text_encoder


def build_model(name_or_config: "str | ModelConfig" = "small", text_encoder: TextEncoder | None = None) -> RefSAM3D:
    """Build an untrained RefSAM3D (random PETL weights; base weights: ``checkpoint.build_untrained``).

    Args:
        name_or_config: a key of MODEL_CONFIGS (``"small"``, ``"vit_b"``) or a ModelConfig.
        text_encoder: optional ready TextEncoder to use instead of the config's default
            (tests pass a tiny random one; the default loads MiniLM / CLIP weights from disk).

    Returns:
        RefSAM3D in train mode on the CPU, with frozen parameters already marked
        ``requires_grad=False``.
    """
    config = get_config(name_or_config)
    c = config.neck_dim
    # Made in this order (the order of RefSAM3D's children), so that a seeded build draws the
    # same random initial weights as before the parts were built here.
    image_encoder = ImageEncoderViT3D(
        grid_tok=config.grid_tok, patch_size=config.patch_size, embed_dim=config.embed_dim,
        depth=config.depth, num_heads=config.num_heads, mlp_ratio=config.mlp_ratio,
        attn_window_tok=config.attn_window_tok, global_attn_indexes=config.global_attn_indexes,
        stage_indexes=config.stage_indexes, adapter_dim=config.adapter_dim, neck_dim=c,
        stem_channels=config.stem_channels,
    )
    if text_encoder is None:
        text_encoder = build_text_encoder(config)
    projector = CrossModalProjector(config.text_dim, c)
    cross_attention = HierarchicalCrossAttention(config.embed_dim, c, config.decoder_heads)
    pe = PositionEmbeddingRandom3D(c // 2)
    spatial_prompts = SpatialPromptEncoder(c, pe)
    pixel_decoder = PixelDecoder(c, config.embed_dim, config.upsample_channels, config.fusion_channels,
                                 config.stem_channels)
    mask_decoder = MaskDecoder3D(c, config.decoder_depth, config.decoder_heads, config.decoder_mlp_dim,
                                 config.upsample_channels[-1], config.fusion_channels, config.token_logits,
                                 config.click_prior, config.gesture_maps, config.gesture_text_biases,
                                 config.gesture_intensity)
    return RefSAM3D(
        config,
        image_encoder=image_encoder,
        text_encoder=text_encoder,
        projector=projector,
        cross_attention=cross_attention,
        pe=pe,
        spatial_prompts=spatial_prompts,
        pixel_decoder=pixel_decoder,
        mask_decoder=mask_decoder,
    )


TEXT_ENCODER_DESCRIPTIONS = {
    "minilm": "all-MiniLM-L6-v2 (sentence-transformers), frozen",
    "clip": "CLIP ViT-B/16 text tower (open_clip), frozen",
}


def parameter_report(name_or_config: "str | ModelConfig") -> dict:
    """Parameter counts per component of an untrained model (what ``refsam3d info`` prints).

    Returns:
        ``{"config": name, "image_encoder": description, "text_encoder": description,
        "components": {component: {"total", "trainable", "frozen"}}, "total": {...},
        "trainable_fraction": float}``; frozen = base weights (SAM, text encoder).
    """
    model = build_model(name_or_config)
    config = model.config
    components = {}
    for component, module in model.named_children():
        params = list(module.parameters())
        if not params:
            continue
        trainable = sum(p.numel() for p in params if p.requires_grad)
        total = sum(p.numel() for p in params)
        components[component] = {"total": total, "trainable": trainable, "frozen": total - trainable}
    total = {key: sum(c[key] for c in components.values()) for key in ("total", "trainable", "frozen")}
    vit = f"3D ViT (patch {config.patch_size}, width {config.embed_dim}, depth {config.depth})"
    return {
        "config": config.name,
        "image_encoder": (f"SAM {vit} with 3D adapters, frozen except the PETL parts" if config.pretrained_image_encoder
                          else f"convolutional stem {list(config.stem_channels)} + {vit}, trained from scratch"
                          if config.stem_channels else f"{vit}, trained from scratch"),
        "text_encoder": TEXT_ENCODER_DESCRIPTIONS[config.text_encoder],
        "components": components,
        "total": total,
        "trainable_fraction": total["trainable"] / total["total"],
    }
