"""The one preprocessing, shared by training and inference, and its inverse.

Model space is an axis-aligned grid at the model's spacing with identity LPS direction
(i -> L, j -> P, k -> S) that covers the input's physical bounding box, then cropped to the body
(:func:`body_box`). Whatever the input's orientation (oblique, flipped axes, anisotropic voxels),
the model sees the anatomy the same way round; the array handed to it is ``(D, H, W) = (k, j, i)``
of that grid.

The body crop is why training, validation and every run see the same windows: training has always
learnt from body-cropped volumes, and the air around a patient is windows of work that find
nothing (a BTCV-size CT: 4 windows instead of 8).

Volumes smaller than one model window need no special case here: MONAI's
``sliding_window_inference`` pads the image up to the window (constant 0, the darkest normalised
intensity) and crops its output back.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import numpy as np
import SimpleITK as sitk
from monai.transforms import ScaleIntensityRange

from .errors import RefSAM3DError
from .geometry import Grid, ijk_to_lps_from_ras, resample, sitk_from_array
from .volume import MODALITIES, Volume

_INTERPOLATORS = {"linear": sitk.sitkLinear, "nearest": sitk.sitkNearestNeighbor}

BODY_THRESHOLD = 0.01
"""Normalised intensity above which a model voxel counts as body (CT: above -121 HU; MR: above
1 % of the percentile range, so a noisy MR background keeps its whole grid)."""
BODY_MARGIN_VOX = 2


@dataclass(frozen=True)
class IntensitySettings:
    """How voxel values become model intensities in [0, 1].

    Args:
        modality: ``"CT"`` or ``"MR"``.
        ct_window_hu: ``(low, high)`` HU; CT values are clipped to it and scaled to [0, 1].
        mr_percentiles: ``(low, high)`` percentiles of the non-zero voxels that map to 0 and 1
            (values beyond are clipped).
    """

    modality: str
    ct_window_hu: tuple[float, float]
    mr_percentiles: tuple[float, float]

    def __post_init__(self):
        if self.modality not in MODALITIES:
            raise RefSAM3DError(
                f"Unknown modality {self.modality!r}: use one of {', '.join(MODALITIES)}."
            )

    @classmethod
    def from_config(cls, config, modality: str) -> "IntensitySettings":
        """The settings a model config prescribes (its ``ct_window_hu`` and ``mr_percentiles``)."""
        return cls(modality, tuple(config.ct_window_hu), tuple(config.mr_percentiles))


@dataclass(frozen=True)
class ModelGrid:
    """The two grids of one preprocessing: what is needed to go back to the input's voxels.

    Args:
        model: the axis-aligned model-space grid (identity LPS direction, model spacing).
        input: the input volume's own grid.
    """

    model: Grid
    input: Grid

    @property
    def shape_dhw(self) -> tuple[int, int, int]:
        return self.model.shape_kji


def model_grid(volume: Volume, spacing_mm) -> ModelGrid:
    """The model-space grid at ``spacing_mm`` (i, j, k) covering ``volume``'s bounding box.

    The box spans the outer faces of the input's corner voxels; the grid is centred on it.
    """
    spacing = np.asarray(spacing_mm, dtype=np.float64).reshape(3)
    if not np.all(spacing > 0):
        raise RefSAM3DError(f"Model spacing must be positive, got {tuple(spacing)} mm.")
    ijk_to_lps = ijk_to_lps_from_ras(volume.ijk_to_ras)
    k, j, i = volume.shape_kji
    corners = np.array([[a, b, c, 1.0] for a in (-0.5, i - 0.5) for b in (-0.5, j - 0.5)
                        for c in (-0.5, k - 0.5)]).T
    corners_lps = (ijk_to_lps @ corners)[:3]
    low, high = corners_lps.min(axis=1), corners_lps.max(axis=1)
    size = [max(1, math.ceil(round(extent, 6))) for extent in (high - low) / spacing]
    margin = (np.array(size) * spacing - (high - low)) / 2.0
    origin = low - margin + spacing / 2.0
    model = Grid(tuple(size), tuple(float(v) for v in origin), tuple(float(v) for v in spacing),
                 (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0))
    return ModelGrid(model=model, input=Grid.of_volume(volume))


def _sub_grid(grid: Grid, box: tuple[slice, slice, slice]) -> Grid:
    """The part of ``grid`` that ``box`` (``(k, j, i)`` slices) covers: same spacing and
    direction, moved origin."""
    start_ijk = np.array([part.start for part in box[::-1]], dtype=np.float64)
    origin = np.asarray(grid.origin_lps) + grid.ijk_to_lps[:3, :3] @ start_ijk
    return dataclasses.replace(grid, size_ijk=tuple(part.stop - part.start for part in box[::-1]),
                               origin_lps=tuple(float(v) for v in origin))


def body_box(image_dhw: np.ndarray) -> tuple[slice, slice, slice]:
    """The bounding box of the voxels above ``BODY_THRESHOLD``, grown by ``BODY_MARGIN_VOX``:
    ``(d, h, w)`` slices of ``image_dhw`` (normalised intensities); all of it where none is above."""
    inside = image_dhw > BODY_THRESHOLD
    if not inside.any():
        return tuple(slice(0, size) for size in image_dhw.shape)
    box = []
    for axis, size in enumerate(image_dhw.shape):
        hits = np.flatnonzero(inside.any(axis=tuple(a for a in range(3) if a != axis)))
        box.append(slice(max(0, int(hits[0]) - BODY_MARGIN_VOX), min(size, int(hits[-1]) + 1 + BODY_MARGIN_VOX)))
    return tuple(box)


def to_model_space(volume: Volume, spacing_mm, intensity: IntensitySettings
                   ) -> tuple[np.ndarray, ModelGrid]:
    """Resample ``volume`` into model space, normalise its intensities and crop it to the body.

    Linear interpolation; outside the input the image takes the volume's minimum (background).

    Returns:
        ``(image_dhw, grid)``: float32 ``(D, H, W)`` in [0, 1] on ``grid.model`` (the body's box of
        :func:`model_grid`), and the grids to go back.
    """
    grid = model_grid(volume, spacing_mm)
    background = float(volume.array.min())
    resampled = resample(sitk_from_array(volume.array, volume.ijk_to_ras), grid.model,
                         sitk.sitkLinear, background, sitk.sitkFloat32)
    image_dhw = sitk.GetArrayFromImage(resampled)
    if intensity.modality == "CT":
        low, high = intensity.ct_window_hu
    else:
        nonzero = image_dhw[image_dhw != 0]
        if nonzero.size == 0:
            low, high = 0.0, 1.0
        else:
            low, high = (float(v) for v in np.percentile(nonzero, intensity.mr_percentiles))
    if high <= low:
        high = low + 1.0  # a constant image: everything maps to 0 instead of dividing by zero
    scale = ScaleIntensityRange(a_min=low, a_max=high, b_min=0.0, b_max=1.0, clip=True,
                                dtype=np.float32)
    image_dhw = np.asarray(scale(image_dhw), dtype=np.float32)
    box = body_box(image_dhw)
    cropped = ModelGrid(model=_sub_grid(grid.model, box), input=grid.input)
    return np.ascontiguousarray(image_dhw[box]), cropped


def labels_to_model_space(label_volume: Volume, grid: ModelGrid) -> np.ndarray:
    """A label map resampled (nearest neighbour) onto the model grid: uint8 ``(D, H, W)``.

    Resampled by physical position, so the label file may have its own grid.
    """
    if label_volume.array.size and (label_volume.array.min() < 0 or label_volume.array.max() > 255):
        raise RefSAM3DError(
            f"{label_volume.name or 'label map'}: label values must be 0..255, got "
            f"{label_volume.array.min()}..{label_volume.array.max()}."
        )
    labels = sitk_from_array(label_volume.array.astype(np.uint8, copy=False),
                             label_volume.ijk_to_ras)
    return sitk.GetArrayFromImage(resample(labels, grid.model, sitk.sitkNearestNeighbor, 0))


COVERAGE_SUBDIVISIONS = 3
"""Sub-voxels per model-voxel edge for :func:`label_coverage_in_model_space` (27 per voxel: 1 mm
samples of a 3 mm voxel, about an abdominal CT's slice spacing)."""
COVERAGE_LEVELS = COVERAGE_SUBDIVISIONS ** 3


def label_coverage_in_model_space(label_volume: Volume, grid: ModelGrid, values) -> np.ndarray:
    """How much of each model voxel lies inside each label: uint8 ``(N, D, H, W)`` counts of its
    ``COVERAGE_LEVELS`` sub-voxels whose centre has ``values[n]`` (nearest neighbour).

    Why: a nearest-neighbour label on the model grid says only whether a voxel's centre is inside,
    so a loss on it cannot see a boundary move by less than a model voxel, while the mask is
    drawn on the input's finer grid (refsam3d-small-v12's box + click grew kidneys by ~1.2 mm).
    The sub-voxel grid is aligned so that its middle sample of each voxel is that voxel's centre:
    ``coverage >= 14`` of a single label agrees with :func:`labels_to_model_space` there.
    """
    n = COVERAGE_SUBDIVISIONS
    model = grid.model
    fine_ijk_to_ras = model.ijk_to_ras @ np.array(
        [[1 / n, 0, 0, -(n - 1) / (2 * n)], [0, 1 / n, 0, -(n - 1) / (2 * n)],
         [0, 0, 1 / n, -(n - 1) / (2 * n)], [0, 0, 0, 1]])
    fine = Grid.from_ijk_to_ras(fine_ijk_to_ras, tuple(n * s for s in model.shape_kji))
    labels = sitk_from_array(label_volume.array.astype(np.uint8, copy=False), label_volume.ijk_to_ras)
    fine_labels = sitk.GetArrayFromImage(resample(labels, fine, sitk.sitkNearestNeighbor, 0))
    d, h, w = model.shape_kji
    blocks = fine_labels.reshape(d, n, h, n, w, n)
    coverage = np.zeros((len(values), d, h, w), dtype=np.uint8)
    for index, value in enumerate(values):
        coverage[index] = (blocks == value).sum(axis=(1, 3, 5), dtype=np.uint8)
    return coverage


InputBox = tuple[slice, slice, slice]
"""A box of the input grid as ``(k, j, i)`` slices: where one structure can lie."""


def input_box(region_dhw: np.ndarray, grid: ModelGrid) -> InputBox | None:
    """The smallest box of the input grid outside which a linear resampling of a model-space
    channel is below a level, given where the channel reaches it (``region_dhw``, bool ``(D, H, W)``).

    A linearly interpolated value mixes the (up to 8) model voxels around its point, so it can reach
    the level only within one model voxel of ``region_dhw``'s bounding box; one input voxel more on
    every side keeps a background margin round the structure (hole filling and connected
    components on the box then give what they give on the whole grid).

    Returns:
        ``(k, j, i)`` slices, or None where ``region_dhw`` is empty.
    """
    if not region_dhw.any():
        return None
    low_kji, high_kji = (np.array(f(np.nonzero(region_dhw), axis=1)) for f in (np.min, np.max))
    low, high = low_kji[::-1] - 1.0, high_kji[::-1] + 1.0  # (i, j, k) continuous model indices
    corners = np.array([[a, b, c, 1.0] for a in (low[0], high[0]) for b in (low[1], high[1])
                        for c in (low[2], high[2])]).T
    model_to_input = np.linalg.inv(grid.input.ijk_to_ras) @ grid.model.ijk_to_ras
    ijk = (model_to_input @ corners)[:3]
    start = np.maximum(np.floor(ijk.min(axis=1)) - 1, 0).astype(int)
    stop = np.minimum(np.ceil(ijk.max(axis=1)) + 2, grid.input.size_ijk).astype(int)
    if np.any(stop <= start):
        return None
    return tuple(slice(int(a), int(b)) for a, b in zip(start[::-1], stop[::-1]))


def from_model_space(channel_dhw: np.ndarray, grid: ModelGrid,
                     interpolation: str = "linear", box: InputBox | None = None) -> np.ndarray:
    """One model-space channel (e.g. one prompt's probabilities) back on the input grid.

    Args:
        channel_dhw: ``(D, H, W)`` array on ``grid.model``.
        grid: the ModelGrid from :func:`to_model_space`.
        interpolation: ``"linear"`` (probabilities) or ``"nearest"`` (labels).
        box: only this part of the input grid (from :func:`input_box`); None for all of it.

    Returns:
        float32 ``(K, J, I)`` on the input volume's grid (or on ``box`` of it); 0 outside the
        model grid.
    """
    if interpolation not in _INTERPOLATORS:
        raise RefSAM3DError(
            f"Unknown interpolation {interpolation!r}: use one of {', '.join(_INTERPOLATORS)}."
        )
    channel_dhw = np.asarray(channel_dhw, dtype=np.float32)
    if channel_dhw.shape != grid.shape_dhw:
        raise RefSAM3DError(
            f"Model-space array has shape {channel_dhw.shape}, the model grid {grid.shape_dhw}."
        )
    image = sitk_from_array(channel_dhw, grid.model.ijk_to_ras)
    target = grid.input if box is None else _sub_grid(grid.input, box)
    back = resample(image, target, _INTERPOLATORS[interpolation], 0.0, sitk.sitkFloat32)
    return sitk.GetArrayFromImage(back)
