"""The RefSAM3D network (paper section 3), composed from segment_anything and open_clip modules.

``config`` holds the registry of named configs, ``build`` composes the network's parts into a
``RefSAM3D``; ``sam_weights`` and ``text_encoder`` load the SAM and CLIP base weights.
"""

from .build import build_model, parameter_report
from .config import MODEL_CONFIGS, ModelConfig, get_config
from .refsam3d import ImageFeatures, PromptEmbeddings, RefSAM3D

__all__ = [
    "MODEL_CONFIGS", "ModelConfig", "build_model", "get_config", "parameter_report",
    "ImageFeatures", "PromptEmbeddings", "RefSAM3D",
]
