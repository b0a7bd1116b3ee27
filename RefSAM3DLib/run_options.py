"""The options of one segmentation run, as one value: the Slicer panel and Logic, the worker's
command line, ``refsam3d segment``/``evaluate`` and the engine all take a :class:`RunOptions`.

Defaults and checks live here only; :meth:`RunOptions.to_cli_args` and
:meth:`RunOptions.from_cli_args` (with :func:`add_cli_arguments`) are the one translation to and
from a command line. No torch, SimpleITK or MONAI: Slicer's own process imports this module.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, fields
from pathlib import Path

from .errors import RefSAM3DError

DEVICES = ("auto", "cpu", "cuda", "mps")
MAX_OVERLAP = 0.9
"""Beyond this the window count explodes for no visible gain: the stride shrinks to a few voxels
(0.99 turns the 27 windows of a 170-voxel cube at 0.25 into 421,875)."""


def check_device(device: str) -> str:
    """``device`` lower-cased, or RefSAM3DError for a name the engine does not know (whether
    the machine has it is only known where torch is: ``inference.resolve_device``)."""
    name = str(device or "auto").lower()
    if name not in DEVICES and not (name.startswith("cuda:") and name[5:].isdigit()):
        raise RefSAM3DError(f"Unknown device {device!r}: use one of auto, cpu, cuda (or cuda:N), mps.")
    return name


def _number(name: str, value) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        raise RefSAM3DError(f"The {name} must be a number, not {value!r}.") from None


@dataclass(frozen=True)
class RunOptions:
    """Everything a user may set for one run; checked when made (RefSAM3DError says what to use).

    Args:
        device: ``auto`` (a CUDA GPU when there is one), ``cpu``, ``cuda``, ``cuda:N`` or ``mps``.
        overlap: fraction of a sliding window shared with its neighbours, 0 to ``MAX_OVERLAP``.
        threshold: probability at or above which a voxel belongs to the structure, in (0, 1).
        model: a bundled model's name or a checkpoint folder; None for the bundled default
            (``model_info.model_folder`` reads it).
        largest_component: keep only the largest connected component of each structure that is
            one piece (``Structure.one_piece``: organs, vessels, bones; not tumours, bowel or
            groups such as the vertebrae): islands of a one-piece organ are false positives. A
            piece holding a positive click stays too: the user said it is the structure. On by
            default; off keeps every component.
        fill_holes: fill holes enclosed by each structure.
    """

    device: str = "auto"
    overlap: float = 0.25
    threshold: float = 0.5
    model: str | None = None
    largest_component: bool = True
    fill_holes: bool = False

    def __post_init__(self):
        def set_field(name, value):  # frozen: normalised once, here
            object.__setattr__(self, name, value)

        set_field("device", check_device(self.device))
        set_field("overlap", _number("window overlap", self.overlap))
        if not 0.0 <= self.overlap <= MAX_OVERLAP:  # NaN fails too
            raise RefSAM3DError(
                f"Window overlap {self.overlap} is outside 0 to {MAX_OVERLAP}: near 1 the windows multiply "
                "without end (0.99: hundreds of thousands); use 0.25 (default) to 0.5."
            )
        set_field("threshold", _number("threshold", self.threshold))
        if not 0.0 < self.threshold < 1.0:  # NaN fails too
            raise RefSAM3DError(
                f"Threshold {self.threshold} is outside 0 to 1 (both excluded): it is the probability a voxel "
                "needs to belong to a structure; use 0.5 (default), lower for more voxels, higher for fewer."
            )
        if not isinstance(self.model, (str, Path, type(None))):
            raise RefSAM3DError(f"The model must be a name or a folder, not {self.model!r}.")
        set_field("model", str(self.model) if self.model else None)  # "" (an empty panel field): bundled
        set_field("largest_component", bool(self.largest_component))
        set_field("fill_holes", bool(self.fill_holes))

    def to_cli_args(self) -> list[str]:
        """The options as ``refsam3d segment`` arguments, read back by :meth:`from_cli_args`.

        ``--option=value`` throughout: a value starting with '-' (a model folder) is never taken
        for an option of its own. ``repr`` keeps every float exact.
        """
        args = [f"--device={self.device}", f"--overlap={self.overlap!r}", f"--threshold={self.threshold!r}"]
        if self.model:
            args.append(f"--model={self.model}")
        args.append("--largest-component" if self.largest_component else "--no-largest-component")
        if self.fill_holes:
            args.append("--fill-holes")
        return args

    @classmethod
    def from_cli_args(cls, args: argparse.Namespace) -> "RunOptions":
        """The options of a command line parsed with the arguments of :func:`add_cli_arguments`."""
        return cls(**{field.name: getattr(args, field.name) for field in fields(cls)})


def add_cli_arguments(parser: argparse.ArgumentParser) -> None:
    """The run options as command-line options, with the defaults of :class:`RunOptions`."""
    default = RunOptions()
    parser.add_argument("--model", default=default.model,
                        help="bundled model name or checkpoint folder (default: the bundled model)")
    parser.add_argument("--device", default=default.device, help="auto, cpu, cuda, cuda:N or mps (default: auto)")
    parser.add_argument("--overlap", type=float, default=default.overlap,
                        help=f"sliding-window overlap in [0, {MAX_OVERLAP}] (default {default.overlap})")
    parser.add_argument("--threshold", type=float, default=default.threshold,
                        help=f"probability a voxel needs to belong to a structure, in (0, 1) (default {default.threshold})")
    parser.add_argument("--largest-component", action=argparse.BooleanOptionalAction, default=default.largest_component,
                        help="keep only the largest connected component of each one-piece structure: organs, "
                             "vessels, bones (and every piece holding a positive --point); never tumours, bowel "
                             "or groups such as the vertebrae (default: on)")
    parser.add_argument("--fill-holes", action="store_true", default=default.fill_holes, help="fill enclosed holes")
