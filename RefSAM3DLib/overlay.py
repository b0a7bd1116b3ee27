"""A PNG for a quick look: axial, coronal and sagittal slices with the segments drawn on top.

The slices pass through the centre of mass of all segments (the volume's centre when every
segment is empty). Views are in radiological convention: the patient's right on the viewer's
left in axial and coronal views, anterior on the left in the sagittal view, superior up; pixels
are drawn at their true size in millimetres, so the aspect follows the spacing.

The voxel array is brought to RAS-aligned axes by transposes and flips only (no resampling), which
is exact for volumes whose axes are parallel to the patient axes. An oblique volume is shown
along its nearest patient axes and the footer says so.

Rendering uses a bare matplotlib ``Figure`` (saved through the Agg canvas), never pyplot, so no
GUI backend is needed and a host application's backend (Slicer's) is left alone.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .atomic import atomic_write
from .errors import RefSAM3DError
from .result import LabelResult
from .volume import Volume

CT_SOFT_TISSUE_WINDOW_HU = (-160.0, 240.0)  # level 40, width 400
MR_PERCENTILES = (1.0, 99.0)
FILL_ALPHA = 0.35
_OBLIQUE_TOLERANCE = 1e-3


def ras_axes(ijk_to_ras: np.ndarray) -> tuple[np.ndarray, np.ndarray, bool]:
    """For each RAS axis (R, A, S): the voxel axis (0=i, 1=j, 2=k) nearest to it and whether that
    voxel axis points the opposite way; plus whether the volume is oblique.

    Returns:
        (perm, flipped, oblique): ``perm[r]`` voxel axis along RAS axis ``r``; ``flipped[r]`` True
        when increasing voxel index goes towards L, P or I.
    """
    direction = ijk_to_ras[:3, :3] / np.linalg.norm(ijk_to_ras[:3, :3], axis=0)
    perm = np.argmax(np.abs(direction), axis=1)
    if sorted(perm) != [0, 1, 2]:
        # Strongly oblique: give every RAS axis a different voxel axis, greedily by alignment.
        perm = np.full(3, -1)
        for flat in np.argsort(-np.abs(direction), axis=None):
            r, a = divmod(int(flat), 3)
            if perm[r] < 0 and a not in perm:
                perm[r] = a
    flipped = direction[np.arange(3), perm] < 0
    oblique = bool(np.max(np.abs(np.abs(direction[np.arange(3), perm]) - 1.0)) > _OBLIQUE_TOLERANCE)
    return perm, flipped, oblique


def to_ras_array(array_kji: np.ndarray, perm: np.ndarray, flipped: np.ndarray) -> np.ndarray:
    """``(K, J, I)`` voxel array -> ``(X, Y, Z)`` array indexed towards R, A and S."""
    array_ijk = np.transpose(array_kji, (2, 1, 0))
    ras = np.transpose(array_ijk, tuple(int(a) for a in perm))
    return ras[tuple(slice(None, None, -1) if f else slice(None) for f in flipped)]


def display_range(volume: Volume) -> tuple[float, float]:
    """CT: the soft-tissue window; MR or unknown: robust percentiles of the non-zero voxels."""
    if volume.modality == "CT":
        return CT_SOFT_TISSUE_WINDOW_HU
    values = volume.array[:: max(1, volume.array.shape[0] // 64)].astype(np.float32)
    values = values[values != 0] if np.any(values != 0) else values.ravel()
    low, high = np.percentile(values, MR_PERCENTILES)
    return float(low), float(high) if high > low else float(low) + 1.0


def segments_centre_kji(result: LabelResult) -> np.ndarray:
    """The centre of mass ``(k, j, i)`` of all segments together (the volume's centre when all
    are empty), computed on the masks' own contiguous voxels: a 512 x 512 x 300 union through
    transposed views took seconds."""
    union = np.zeros(result.reference.shape_kji, dtype=bool)
    for segment in result.segments:
        np.logical_or(union, segment.mask, out=union)
    if not union.any():
        return (np.asarray(union.shape) - 1) / 2.0
    return np.array([np.average(np.arange(size), weights=np.count_nonzero(union, axis=tuple(a for a in range(3) if a != axis)))
                     for axis, size in enumerate(union.shape)])


def ras_centre(centre_kji: np.ndarray, ras_shape, perm: np.ndarray, flipped: np.ndarray) -> tuple[int, int, int]:
    """A ``(k, j, i)`` voxel position as the nearest index of :func:`to_ras_array`'s array."""
    centre_ijk = np.asarray(centre_kji, dtype=np.float64)[::-1]
    index = [centre_ijk[a] for a in perm]
    index = [size - 1 - value if flip else value for value, size, flip in zip(index, ras_shape, flipped)]
    return tuple(int(round(value)) for value in index)


def _outline(mask: np.ndarray) -> np.ndarray:
    from scipy.ndimage import binary_erosion

    return mask & ~binary_erosion(mask)


def _view_slices(ras: np.ndarray, centre: tuple[int, int, int]) -> dict[str, np.ndarray]:
    """2D display arrays, row 0 at the top of the picture and column 0 at its left."""
    x, y, z = centre
    return {
        # rows: anterior -> posterior, columns: patient right -> left
        "Axial": ras[::-1, ::-1, z].T,
        # rows: superior -> inferior, columns: patient right -> left
        "Coronal": ras[::-1, y, ::-1].T,
        # rows: superior -> inferior, columns: anterior -> posterior
        "Sagittal": ras[x, ::-1, ::-1].T,
    }


_VIEW_SPACING = {"Axial": (1, 0), "Coronal": (2, 0), "Sagittal": (2, 1)}  # (row axis, column axis)
_VIEW_LETTERS = {"Axial": ("A", "P", "R", "L"), "Coronal": ("S", "I", "R", "L"), "Sagittal": ("S", "I", "A", "P")}


def overlay_figure(result: LabelResult):
    """The three-view figure of ``result`` (a matplotlib ``Figure``, no pyplot state touched)."""
    from matplotlib.figure import Figure  # only when drawing: `refsam3d --help` imports this module
    from matplotlib.patches import Patch

    volume = result.reference
    perm, flipped, oblique = ras_axes(volume.ijk_to_ras)
    spacing_ras = np.asarray(volume.spacing_mm)[perm]
    image = to_ras_array(volume.array, perm, flipped)
    masks = [to_ras_array(segment.mask, perm, flipped) for segment in result.segments]
    centre = ras_centre(segments_centre_kji(result), image.shape, perm, flipped)

    low, high = display_range(volume)
    images = _view_slices(image, centre)
    mask_views = [_view_slices(mask, centre) for mask in masks]
    colours = [np.array(segment.color_rgb, dtype=np.float32) / 255.0 for segment in result.segments]

    figure = Figure(figsize=(15, 6.2), facecolor="black")
    for ax, view in zip(figure.subplots(1, 3), images):
        rows, cols = images[view].shape
        row_mm, col_mm = (spacing_ras[a] for a in _VIEW_SPACING[view])
        extent = (0, cols * col_mm, rows * row_mm, 0)
        ax.imshow(images[view].astype(np.float32), cmap="gray", vmin=low, vmax=high, extent=extent,
                  interpolation="nearest")
        layer = np.zeros((rows, cols, 4), dtype=np.float32)
        for views, colour in zip(mask_views, colours):
            inside = views[view] > 0
            layer[inside] = (*colour, FILL_ALPHA)
            layer[_outline(inside)] = (*colour, 1.0)
        ax.imshow(layer, extent=extent, interpolation="nearest")
        top, bottom, left, right = _VIEW_LETTERS[view]
        for text, xy, align in ((top, (0.5, 0.98), ("center", "top")), (bottom, (0.5, 0.02), ("center", "bottom")),
                                (left, (0.01, 0.5), ("left", "center")), (right, (0.99, 0.5), ("right", "center"))):
            ax.text(*xy, text, color="yellow", fontsize=11, ha=align[0], va=align[1], transform=ax.transAxes)
        ax.set_title(view, color="white")
        ax.set_axis_off()

    legend = [Patch(facecolor=c, edgecolor=c, label=f"{s.name}: {result.volume_ml(s):.1f} mL")
              for s, c in zip(result.segments, colours)]
    if legend:
        figure.legend(handles=legend, loc="upper center", ncol=min(len(legend), 5), frameon=False,
                      labelcolor="white", fontsize=10)
    footer = f"{result.model_name} {result.model_version}  |  {volume.name or 'volume'}  |  Not for clinical use"
    if oblique:
        footer += "  |  oblique volume: shown along its nearest patient axes (not resampled)"
    figure.text(0.5, 0.02, footer, ha="center", color="white", fontsize=9)
    figure.subplots_adjust(left=0.01, right=0.99, top=0.84, bottom=0.07, wspace=0.03)
    return figure


def write_overlay_png(result: LabelResult, path, overwrite: bool = False) -> Path:
    """Write the three-view overlay of ``result`` to ``path`` (PNG), atomically.

    Args:
        result: the segmentation; its ``reference`` volume is the background image.
        path: the PNG file to write.
        overwrite: replace an existing file; otherwise an existing file is an error.
    """
    path = Path(path)
    if path.exists() and not overwrite:
        raise RefSAM3DError(f"{path} already exists; choose another name or use --overwrite.")
    figure = overlay_figure(result)
    with atomic_write(path) as temporary:
        figure.savefig(temporary, format="png", dpi=100, facecolor="black")
    return path
