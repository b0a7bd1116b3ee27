"""The one in-memory image type every entry point produces and everything downstream consumes.

Conventions (the same as Slicer's ``arrayFromVolume`` and SimpleITK's ``GetArrayFromImage``):

* ``array`` is indexed ``array[k, j, i]``: shape ``(K, J, I)`` = (slices, rows, columns).
* ``ijk_to_ras`` is a 4x4 matrix taking the homogeneous voxel index ``(i, j, k, 1)`` to
  patient coordinates in millimetres, in **RAS** (Slicer's frame). Files on disk are LPS; the
  conversion happens once, in :mod:`RefSAM3DLib.geometry`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .errors import RefSAM3DError

MODALITIES = ("CT", "MR")


@dataclass(frozen=True)
class Volume:
    """A scalar 3D image with its geometry.

    Args:
        array: voxel values, shape ``(K, J, I)``, any real numeric dtype.
        ijk_to_ras: ``(4, 4)`` affine from ``(i, j, k, 1)`` to RAS millimetres.
        modality: ``"CT"``, ``"MR"`` or ``None`` when unknown (the engine then decides:
            ``inference.decide_modality``).
        name: a human label for reports (usually the file name).
    """

    array: np.ndarray
    ijk_to_ras: np.ndarray
    modality: str | None = None
    name: str = ""
    metadata: dict = field(default_factory=dict, compare=False)

    def __post_init__(self):
        if self.array.ndim != 3:
            raise RefSAM3DError(
                f"{self.name or 'volume'}: expected a 3D image, got {self.array.ndim} dimensions "
                f"(shape {self.array.shape})."
            )
        matrix = np.asarray(self.ijk_to_ras, dtype=np.float64)
        if matrix.shape != (4, 4):
            raise RefSAM3DError(f"ijk_to_ras must be a 4x4 matrix, got shape {matrix.shape}.")
        object.__setattr__(self, "ijk_to_ras", matrix)
        if self.modality is not None and self.modality not in MODALITIES:
            raise RefSAM3DError(
                f"Unknown modality {self.modality!r}: use one of {', '.join(MODALITIES)}."
            )

    @property
    def shape_kji(self) -> tuple[int, int, int]:
        return tuple(int(n) for n in self.array.shape)

    @property
    def spacing_mm(self) -> tuple[float, float, float]:
        """Voxel size along (i, j, k) in millimetres."""
        return tuple(float(s) for s in np.linalg.norm(self.ijk_to_ras[:3, :3], axis=0))

    @property
    def voxel_volume_ml(self) -> float:
        return float(abs(np.linalg.det(self.ijk_to_ras[:3, :3])) / 1000.0)


def guess_modality(array: np.ndarray) -> str | None:
    """``"CT"`` when the voxel values look like Hounsfield units, else ``None``.

    The heuristic: the minimum lies in [-3100, -500] (air is -1000 HU; scanners pad outside the
    field of view with -1024, -2048 or -3024) and the 99th percentile is at most 4000 (bone and
    contrast stay below that). MR and PET values are rarely negative at all, so an MR is almost
    never taken for a CT; an unknown modality is left to the caller's default.
    """
    minimum = float(array.min())
    if not -3100.0 <= minimum <= -500.0:
        return None
    sample = array.ravel()[:: max(1, array.size // 1_000_000)]
    return "CT" if float(np.percentile(sample, 99)) <= 4000.0 else None
