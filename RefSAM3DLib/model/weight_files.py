"""Reading weight files without running their code, and what a base-weight file gave a model.

Nothing is unpickled beyond plain tensors: ``.pth``/``.pt``/``.bin`` files go through
``torch.load(weights_only=True)`` (a pickle that asks to run code is refused with a
RefSAM3DError) and safetensors files hold tensors only. Used by the SAM and CLIP loaders
(``sam_weights.py``, ``text_encoder.py``) and by ``checkpoint.py`` for RefSAM3D's own weights.
"""

from __future__ import annotations

import pickle
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from ..errors import RefSAM3DError


@dataclass
class LoadReport:
    """What a base-weight file gave the model.

    Attributes:
        source: the file.
        loaded: model parameter names filled from the file.
        missing: frozen model parameters the file did not provide.
        unexpected: file keys the model did not use (e.g. SAM's 2D neck and mask decoder).
    """

    source: str
    loaded: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)

    def summary(self) -> str:
        shown = ", ".join(self.unexpected[:6]) + (" ..." if len(self.unexpected) > 6 else "")
        return (f"{Path(self.source).name}: {len(self.loaded)} tensors loaded, missing {self.missing or 'none'}, "
                f"{len(self.unexpected)} unused ({shown or 'none'})")


def read_torch_weights(path: "str | Path") -> dict[str, torch.Tensor]:
    """A flat name -> tensor dict from a .pth/.pt/.bin file, without running pickled code."""
    path = Path(path)
    if not path.is_file():
        raise RefSAM3DError(f"Weights file {path} does not exist; check the path.")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        lines = [line.strip() for line in str(error).splitlines() if "unsupported" in line.lower()]
        reason = lines[0] if lines else "it asks to build objects or run code"
        raise RefSAM3DError(
            f"Refused to load {path.name}: it is not a plain weights file ({reason[:160]}); "
            "use the official checkpoint or a safetensors file."
        ) from None
    except (RuntimeError, EOFError, OSError, ValueError) as error:
        raise RefSAM3DError(f"Cannot read weights {path.name} ({str(error).splitlines()[0][:120]}); the file is corrupt or truncated -- download it again.") from None
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(torch.is_tensor(v) for v in state.values()):
        raise RefSAM3DError(f"{path.name} does not hold a dictionary of tensors; it is not a model weights file.")
    return state


def read_safetensors(path: "str | Path") -> dict[str, torch.Tensor]:
    """Tensors of a safetensors file; a corrupt or truncated file gives a RefSAM3DError."""
    path = Path(path)
    if not path.is_file():
        raise RefSAM3DError(f"Weights file {path} does not exist; check the path.")
    try:
        return load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError, RuntimeError) as error:
        raise RefSAM3DError(f"Cannot read {path.name} ({str(error)[:120]}); the file is corrupt or truncated -- restore or re-download it.") from None


def read_weights(path: "str | Path") -> dict[str, torch.Tensor]:
    """A ``.safetensors`` file by :func:`read_safetensors`, anything else by :func:`read_torch_weights`."""
    return read_safetensors(path) if str(path).endswith(".safetensors") else read_torch_weights(path)
