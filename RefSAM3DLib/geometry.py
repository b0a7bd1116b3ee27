"""The only place where file geometry (LPS, SimpleITK) meets the Volume (RAS).

ITK, NIfTI-through-ITK, NRRD and DICOM describe voxel positions in LPS; Slicer and
:class:`~RefSAM3DLib.volume.Volume` use RAS. The two frames differ by a sign flip of x and y:
``ijk_to_ras = LPS_TO_RAS @ ijk_to_lps``. Every conversion between a SimpleITK image and a
Volume goes through this module, so the flip happens exactly once.

A SimpleITK image's geometry is ``origin`` (LPS mm of voxel (0, 0, 0)), ``spacing`` (mm along
i, j, k) and ``direction`` (3x3, column c = unit LPS vector of index axis c). Then
``ijk_to_lps = [[direction @ diag(spacing), origin], [0, 0, 0, 1]]``.

Spatial prompts (clicks and boxes in RAS mm, Slicer's world space) become voxels here too: of the
input volume (to check they lie on it), of the model-space grid, and of one sliding window.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import SimpleITK as sitk

from .errors import RefSAM3DError
from .volume import Volume

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
"""4x4 matrix from LPS to RAS millimetres (its own inverse)."""

_ORTHONORMAL_TOLERANCE = 1e-4


def ijk_to_ras_from_lps(ijk_to_lps: np.ndarray) -> np.ndarray:
    """The IJK-to-RAS matrix of a grid given by its IJK-to-LPS matrix (a file's, ITK's)."""
    return LPS_TO_RAS @ np.asarray(ijk_to_lps, dtype=np.float64)


def ijk_to_lps_from_ras(ijk_to_ras: np.ndarray) -> np.ndarray:
    """The IJK-to-LPS matrix (a file's, ITK's) of a grid given by its IJK-to-RAS matrix."""
    return LPS_TO_RAS @ np.asarray(ijk_to_ras, dtype=np.float64)  # the flip is its own inverse


def ijk_to_ras_from_sitk(image: sitk.Image) -> np.ndarray:
    """``(4, 4)`` float64 matrix from voxel index ``(i, j, k, 1)`` of a 3D image to RAS mm."""
    if image.GetDimension() != 3:
        raise RefSAM3DError(f"Expected a 3D image, got {image.GetDimension()} dimensions.")
    return Grid.of_image(image).ijk_to_ras


def sitk_geometry_from_ijk_to_ras(ijk_to_ras: np.ndarray) -> tuple[tuple, tuple, tuple]:
    """Split a 4x4 IJK-to-RAS matrix into SimpleITK's ``(origin, spacing, direction)`` in LPS.

    Raises RefSAM3DError for matrices SimpleITK cannot represent: a zero-length or sheared axis,
    or a projective last row.
    """
    matrix = np.asarray(ijk_to_ras, dtype=np.float64)
    if matrix.shape != (4, 4) or not np.allclose(matrix[3], [0.0, 0.0, 0.0, 1.0]):
        raise RefSAM3DError("ijk_to_ras must be a 4x4 affine matrix with last row (0, 0, 0, 1).")
    ijk_to_lps = ijk_to_lps_from_ras(matrix)
    linear = ijk_to_lps[:3, :3]
    spacing = np.linalg.norm(linear, axis=0)
    if not np.all(spacing > 0):
        raise RefSAM3DError(
            f"ijk_to_ras has a zero-length voxel axis (spacing {tuple(spacing)} mm): fix the matrix."
        )
    direction = linear / spacing
    if not np.allclose(direction.T @ direction, np.eye(3), atol=_ORTHONORMAL_TOLERANCE):
        raise RefSAM3DError(
            "ijk_to_ras has sheared (non-perpendicular) voxel axes; resample the volume onto a "
            "regular grid first."
        )
    return (
        tuple(float(v) for v in ijk_to_lps[:3, 3]),
        tuple(float(v) for v in spacing),
        tuple(float(v) for v in direction.ravel()),
    )


def sitk_from_array(array_kji: np.ndarray, ijk_to_ras: np.ndarray) -> sitk.Image:
    """A SimpleITK image of ``array_kji`` (shape ``(K, J, I)``) placed by ``ijk_to_ras``."""
    array_kji = np.asarray(array_kji)
    if array_kji.ndim != 3:
        raise RefSAM3DError(f"Expected a (K, J, I) array, got shape {array_kji.shape}.")
    origin, spacing, direction = sitk_geometry_from_ijk_to_ras(ijk_to_ras)
    image = sitk.GetImageFromArray(array_kji, isVector=False)
    image.SetOrigin(origin)
    image.SetSpacing(spacing)
    image.SetDirection(direction)
    return image


def volume_from_sitk(image: sitk.Image, name: str = "", modality: str | None = None) -> Volume:
    """A :class:`Volume` holding a copy of a scalar 3D SimpleITK image's voxels, in RAS."""
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise RefSAM3DError(
            f"{name or 'image'}: {image.GetNumberOfComponentsPerPixel()} values per voxel; "
            "RefSAM3D needs a scalar (grey-value) image."
        )
    return Volume(
        array=sitk.GetArrayFromImage(image),
        ijk_to_ras=ijk_to_ras_from_sitk(image),
        modality=modality,
        name=name,
    )


def sitk_from_volume(volume: Volume) -> sitk.Image:
    """The SimpleITK image of a :class:`Volume` (same voxels, LPS geometry)."""
    return sitk_from_array(volume.array, volume.ijk_to_ras)


@dataclass(frozen=True)
class Grid:
    """A voxel grid in SimpleITK's terms (LPS), without voxels: where a resampling lands.

    Args:
        size_ijk: number of voxels along i, j, k.
        origin_lps: LPS mm of voxel (0, 0, 0).
        spacing_mm: voxel size along i, j, k.
        direction: 9 numbers, row-major 3x3; column c is the LPS unit vector of index axis c.
    """

    size_ijk: tuple[int, int, int]
    origin_lps: tuple[float, float, float]
    spacing_mm: tuple[float, float, float]
    direction: tuple[float, ...]

    @classmethod
    def of_image(cls, image: sitk.Image) -> "Grid":
        return cls(tuple(image.GetSize()), tuple(image.GetOrigin()), tuple(image.GetSpacing()),
                   tuple(image.GetDirection()))

    @classmethod
    def from_ijk_to_ras(cls, ijk_to_ras: np.ndarray, shape_kji) -> "Grid":
        origin, spacing, direction = sitk_geometry_from_ijk_to_ras(ijk_to_ras)
        return cls(tuple(int(n) for n in reversed(shape_kji)), origin, spacing, direction)

    @classmethod
    def of_volume(cls, volume: Volume) -> "Grid":
        return cls.from_ijk_to_ras(volume.ijk_to_ras, volume.shape_kji)

    @property
    def shape_kji(self) -> tuple[int, int, int]:
        return tuple(int(n) for n in reversed(self.size_ijk))

    @property
    def ijk_to_lps(self) -> np.ndarray:
        ijk_to_lps = np.eye(4)
        ijk_to_lps[:3, :3] = np.reshape(self.direction, (3, 3)) @ np.diag(self.spacing_mm)
        ijk_to_lps[:3, 3] = self.origin_lps
        return ijk_to_lps

    @property
    def ijk_to_ras(self) -> np.ndarray:
        return ijk_to_ras_from_lps(self.ijk_to_lps)

    def matches(self, other: "Grid", tolerance_mm: float = 1e-4) -> bool:
        """Same size and every voxel at the same place (corner voxels compared, in mm)."""
        if tuple(self.size_ijk) != tuple(other.size_ijk):
            return False
        i, j, k = (n - 1 for n in self.size_ijk)
        corners = np.array([[a, b, c, 1.0] for a in (0, i) for b in (0, j) for c in (0, k)]).T
        difference = self.ijk_to_ras @ corners - other.ijk_to_ras @ corners
        return bool(np.max(np.abs(difference)) <= tolerance_mm)


def resample(image: sitk.Image, grid: Grid, interpolator: int = sitk.sitkLinear,
             default_value: float = 0.0, pixel_type: int = sitk.sitkUnknown) -> sitk.Image:
    """``image`` resampled onto ``grid`` (physical positions preserved; outside -> default_value).

    ``pixel_type`` sitkUnknown keeps the input's pixel type.
    """
    resampler = sitk.ResampleImageFilter()
    resampler.SetSize([int(n) for n in grid.size_ijk])
    resampler.SetOutputOrigin(grid.origin_lps)
    resampler.SetOutputSpacing(grid.spacing_mm)
    resampler.SetOutputDirection(grid.direction)
    resampler.SetInterpolator(interpolator)
    resampler.SetDefaultPixelValue(float(default_value))
    resampler.SetOutputPixelType(pixel_type)
    return resampler.Execute(image)


# Spatial prompts: RAS millimetres (Slicer's world space) -> voxels of a grid -> window voxels.
# A point's voxel coordinates are continuous indices: voxel n spans n - 0.5 .. n + 0.5.


def ras_to_ijk(points_ras, ijk_to_ras: np.ndarray) -> np.ndarray:
    """Continuous voxel indices ``(N, 3)`` (i, j, k) of RAS points ``(N, 3)`` in mm."""
    points = np.asarray(points_ras, dtype=np.float64).reshape(-1, 3)
    homogeneous = np.concatenate([points, np.ones((len(points), 1))], axis=1)
    return (np.linalg.inv(np.asarray(ijk_to_ras, dtype=np.float64)) @ homogeneous.T).T[:, :3]


def nearest_voxel_kji(point_ras, volume: Volume) -> tuple[int, int, int]:
    """The ``(k, j, i)`` index of ``volume``'s voxel holding ``point_ras``; RefSAM3DError outside."""
    ijk = ras_to_ijk(point_ras, volume.ijk_to_ras)[0]
    _check_points_inside(ijk[None], volume.shape_kji[::-1], [point_ras], volume.name)
    i, j, k = (int(v) for v in np.floor(ijk + 0.5))
    return k, j, i


def _check_points_inside(ijk: np.ndarray, size_ijk, points_ras, name: str) -> None:
    outside = np.any((ijk < -0.5) | (ijk > np.asarray(size_ijk) - 0.5), axis=1)
    if outside.any():
        point = ", ".join(f"{v:.1f}" for v in np.asarray(points_ras, dtype=float).reshape(-1, 3)[outside.argmax()])
        raise RefSAM3DError(
            f"The point ({point}) RAS mm lies outside {name or 'the volume'}; place points on the image "
            "(Slicer's RAS world coordinates in mm)."
        )


def ras_points_to_dhw(points_ras, volume: Volume, grid: Grid) -> np.ndarray:
    """RAS points ``(N, 3)`` -> continuous ``(d, h, w)`` voxel coordinates ``(N, 3)`` on ``grid``
    (the model-space grid, whose array is ``(D, H, W) = (k, j, i)``).

    Raises RefSAM3DError when a point lies outside ``volume`` (its own voxels, oblique or not).
    """
    points = np.asarray(points_ras, dtype=np.float64).reshape(-1, 3)
    _check_points_inside(ras_to_ijk(points, volume.ijk_to_ras), volume.shape_kji[::-1], points, volume.name)
    return ras_to_ijk(points, grid.ijk_to_ras)[:, ::-1].copy()


def box_ras_to_dhw(box_ras, volume: Volume, grid: Grid) -> np.ndarray:
    """A RAS box ``(R1, A1, S1, R2, A2, S2)`` (any two opposite corners, in any order) ->
    ``(d0, h0, w0, d1, h1, w1)`` on ``grid`` with low <= high, clipped to the grid's voxels.

    The box is axis-aligned in RAS, so it is axis-aligned on the model grid (axis-aligned in LPS).
    Raises RefSAM3DError when it does not overlap the volume's extent or has a wrong length.
    """
    values = np.asarray(box_ras, dtype=np.float64).ravel()
    if values.size != 6 or not np.all(np.isfinite(values)):
        raise RefSAM3DError(
            f"A box needs 6 numbers R1,A1,S1,R2,A2,S2 (two opposite corners in RAS mm), got {values.size}."
        )
    low, high = np.minimum(values[:3], values[3:]), np.maximum(values[:3], values[3:])
    corners = np.array([[x, y, z] for x in (low[0], high[0]) for y in (low[1], high[1]) for z in (low[2], high[2])])
    corners_ijk = ras_to_ijk(corners, volume.ijk_to_ras)
    size_ijk = np.asarray(volume.shape_kji[::-1], dtype=np.float64)
    if np.any(corners_ijk.max(axis=0) < -0.5) or np.any(corners_ijk.min(axis=0) > size_ijk - 0.5):
        shown = ", ".join(f"{v:.1f}" for v in values)
        raise RefSAM3DError(
            f"The box ({shown}) RAS mm lies outside {volume.name or 'the volume'}; draw it on the image "
            "(two opposite corners in Slicer's RAS world coordinates in mm)."
        )
    corners_dhw = ras_to_ijk(corners, grid.ijk_to_ras)[:, ::-1]
    upper = np.asarray(grid.shape_kji, dtype=np.float64) - 1.0
    start = np.clip(corners_dhw.min(axis=0), 0.0, upper)
    end = np.clip(corners_dhw.max(axis=0), 0.0, upper)
    return np.concatenate([start, end])


def points_in_window(points_dhw: np.ndarray, window_start_dhw, window_size_vox: int) -> np.ndarray:
    """Which points ``(N, 3)`` (model-space voxels) lie inside the window: bool ``(N,)``."""
    local = np.asarray(points_dhw, dtype=np.float64).reshape(-1, 3) - np.asarray(window_start_dhw)
    return np.all((local >= -0.5) & (local < window_size_vox - 0.5), axis=1)


def window_holds_box(box_dhw: np.ndarray, window_start_dhw, window_size_vox: int) -> bool:
    """Whether a model-space box ``(6,)`` lies wholly inside the window (no clipping needed)."""
    low = np.asarray(window_start_dhw, dtype=np.float64) - 0.5
    return bool(np.all(np.asarray(box_dhw[:3]) >= low) and np.all(np.asarray(box_dhw[3:]) < low + window_size_vox))


def box_in_window(box_dhw: np.ndarray, window_start_dhw, window_size_vox: int) -> np.ndarray | None:
    """A model-space box ``(6,)`` in window voxels, clipped to the window; None when they do not meet."""
    start = np.asarray(window_start_dhw, dtype=np.float64)
    low, high = np.asarray(box_dhw[:3]) - start, np.asarray(box_dhw[3:]) - start
    if np.any(high < -0.5) or np.any(low > window_size_vox - 0.5):
        return None
    return np.concatenate([np.clip(low, 0, window_size_vox - 1), np.clip(high, 0, window_size_vox - 1)])
