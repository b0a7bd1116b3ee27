"""What a model folder says about itself, read without torch: name, version, the structures it was
trained on and how well it scored on patients it never saw.

The Slicer panel shows this next to the prompt (Slicer's own process must not import torch). The
scores are the model card's held-out table, stored in the checkpoint's ``config.json`` as
``metadata.held_out_dice`` (modality -> structure key -> Dice); a checkpoint without them (one a
user trained) shows its trained structures only.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from .errors import RefSAM3DError
from .vocabulary import STRUCTURES

BUNDLED_MODEL_DIR = Path(__file__).resolve().parent / "models" / "refsam3d-small-v3"
"""The bundled default model; defined here, torch-free, so that the Slicer panel can read it (``checkpoint`` uses it too)."""


@dataclass(frozen=True)
class ModelSummary:
    """Args:
        name, version: the model's own (``metadata.name`` / ``metadata.version``).
        structures: keys of the structures it was trained on (empty when the checkpoint does not say).
        held_out_dice: modality -> structure key -> Dice on held-out patients.
        folder: the checkpoint folder.
    """

    name: str
    version: str
    structures: tuple[str, ...]
    held_out_dice: dict[str, dict[str, float]] = field(default_factory=dict)
    folder: Path | None = None

    def trained_on(self, key: str) -> bool:
        return key in self.structures

    def scores(self, key: str) -> str:
        """``"CT 0.82, MR 0.85"``: the held-out Dice of one structure, per modality ('' if none)."""
        return ", ".join(f"{modality} {dice[key]:.2f}" for modality, dice in sorted(self.held_out_dice.items()) if key in dice)

    def rows(self) -> list[tuple[str, str]]:
        """``(structure name, held-out Dice text)`` for every trained structure, best scored first."""
        def best(key: str) -> float:
            return max((dice[key] for dice in self.held_out_dice.values() if key in dice), default=-1.0)

        keys = sorted(self.structures, key=lambda key: (-best(key), STRUCTURES[key].name if key in STRUCTURES else key))
        return [(STRUCTURES[key].name if key in STRUCTURES else key, self.scores(key)) for key in keys]


def model_summary(folder: str | Path | None = None) -> ModelSummary:
    """The summary of a checkpoint folder (``None`` or ``""``: the bundled model) from its config.json."""
    folder = Path(folder) if folder else BUNDLED_MODEL_DIR
    path = folder / "config.json"
    try:
        metadata = json.loads(path.read_text(encoding="utf-8")).get("metadata", {})
    except (OSError, ValueError, AttributeError) as error:
        raise RefSAM3DError(f"{folder} is not a readable RefSAM3D model folder ({error}); choose the folder holding config.json.") from None
    dice = metadata.get("held_out_dice") or {}
    return ModelSummary(
        name=str(metadata.get("name") or folder.name),
        version=str(metadata.get("version", "")),
        structures=tuple(metadata.get("structures") or ()),
        held_out_dice={str(modality): {str(k): float(v) for k, v in scores.items()} for modality, scores in dice.items()
                       if isinstance(scores, dict)},
        folder=folder,
    )
