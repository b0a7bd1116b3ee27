"""The RefSAM3D network (paper section 3), composed from segment_anything and open_clip modules."""

from .build import CONFIGS, ModelConfig, build_model, get_config, parameter_report
from .refsam3d import ImageFeatures, PromptEmbeddings, RefSAM3D

__all__ = [
    "CONFIGS", "ModelConfig", "build_model", "get_config", "parameter_report",
    "ImageFeatures", "PromptEmbeddings", "RefSAM3D",
]
