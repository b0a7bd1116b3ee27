"""What a segmentation run returns: one binary mask per prompt on the input's own voxel grid."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .vocabulary import Structure
from .volume import Volume


@dataclass
class Segment:
    """One prompt's answer.

    Args:
        prompt: the user's own words that reached the text encoder ("perform liver segmentation").
        structure: the vocabulary entry that names, colours and codes the output; ``None`` when the
            text is outside the trained vocabulary (the segment is then named after the prompt).
        mask: ``(K, J, I)`` uint8 (0/1) on the input volume's grid.
    """

    prompt: str
    structure: Structure | None
    mask: np.ndarray

    @property
    def name(self) -> str:
        return self.structure.name if self.structure is not None else self.prompt

    @property
    def color_rgb(self) -> tuple[int, int, int]:
        return self.structure.color_rgb if self.structure is not None else (255, 255, 0)


@dataclass
class LabelResult:
    """All segments of one run, plus the provenance every output must carry.

    ``reference`` is the input volume (its ``ijk_to_ras`` and shape define the output grid).
    Segments may overlap. ``label_map`` ``(K, J, I)`` (values 1..N in segment order) is the
    engine's resolution of overlaps: each voxel goes to the prompt with the highest probability;
    a result without one (read back from a file) resolves overlaps in segment order.
    """

    reference: Volume
    segments: list[Segment]
    model_name: str
    model_version: str
    elapsed_s: float = 0.0
    warnings: list[str] = field(default_factory=list)
    label_map: np.ndarray | None = None

    def volume_ml(self, segment: Segment) -> float:
        return float(np.count_nonzero(segment.mask)) * self.reference.voxel_volume_ml
