"""Training RefSAM3D (paper section 4.1.2): datasets -> model-space cache -> augmented windows ->
multi-prompt Dice + CE steps. Entry points: ``train`` (here and ``refsam3d train``) and
``python -m RefSAM3DLib.training {prepare,train}``.

Modules: ``config`` (the run's YAML/JSON), ``cache`` (preprocess once; the cases and their
patient-level split come from ``RefSAM3DLib.datasets``, shared with evaluation), ``prompts`` (frozen text embeddings once), ``augment`` (MONAI pipeline),
``windows`` (samples), ``prepare`` (cache + prompt table), ``loop`` (the optimisation).
"""

from .loop import train

__all__ = ["train"]
