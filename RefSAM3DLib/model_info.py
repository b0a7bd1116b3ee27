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

BUNDLED_MODELS = Path(__file__).resolve().parent / "models"
BUNDLED_MODEL_DIR = BUNDLED_MODELS / "refsam3d-small-v15"
"""The bundled default model; defined here, torch-free, so that the Slicer panel can read it (``checkpoint`` uses it too)."""


def model_folder(name_or_path: str | Path | None = None) -> Path:
    """The checkpoint folder a model option names; the one reading of ``--model``, the panel's
    model path and ``RunOptions.model``, for ``checkpoint.load_model`` and :func:`model_summary`.

    ``None``, ``""`` or ``"default"``: the bundled default; an existing folder: that folder; the
    name of a bundled model (a folder of ``RefSAM3DLib/models``): that model, from any working folder.
    """
    if not name_or_path or str(name_or_path) == "default":
        folder = BUNDLED_MODEL_DIR
        if not (folder / "config.json").is_file():
            raise RefSAM3DError(
                f"The bundled model {folder.name} is missing from this installation; train one with "
                "'refsam3d train' or pass a model folder (an untrained network: RefSAM3DLib.checkpoint.build_untrained)."
            )
        return folder
    folder = Path(name_or_path).expanduser()
    if folder.is_dir():
        return folder
    if folder.name == str(name_or_path) and (BUNDLED_MODELS / folder.name).is_dir():
        return BUNDLED_MODELS / folder.name
    names = ", ".join(sorted(p.name for p in BUNDLED_MODELS.iterdir() if p.is_dir())) if BUNDLED_MODELS.is_dir() else ""
    raise RefSAM3DError(f"Model folder {folder} does not exist; give a folder with config.json and model.safetensors"
                        + (f", or a bundled model's name ({names})." if names else "."))


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


def model_summary(name_or_path: str | Path | None = None) -> ModelSummary:
    """The summary of a model (as :func:`model_folder` reads its name) from its config.json."""
    folder = model_folder(name_or_path)
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
