"""A PNG for a quick look: axial, coronal and sagittal slices with the segments drawn on top.

The slices pass through the centre of mass of all segments (the volume's centre when every
segment is empty). Views are in radiological convention: the patient's right on the viewer's
left in axial and coronal views, anterior on the left in the sagittal view, superior up; pixels
are drawn at their true size in millimetres, so the aspect follows the spacing.

The voxel array is brought to RAS-aligned axes by transposes and flips only (no resampling), which
is exact for volumes whose axes are parallel to the patient axes. An oblique volume is shown
along its nearest patient axes and the footer says so.

Rendering uses Pillow alone (its built-in scalable font included), imported only when a picture
is drawn: matplotlib's import and savefig cost about a second of a command-line run, and no GUI
backend is involved, so a host application's (Slicer's) is left alone. Each view is composited
at native voxel resolution and then scaled to its size in millimetres with nearest-neighbour
resampling, so voxels and outlines stay crisp.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from .atomic import atomic_write
from .errors import RefSAM3DError
from .result import LabelResult
from .volume import Volume

if TYPE_CHECKING:
    from PIL import Image, ImageFont

CT_SOFT_TISSUE_WINDOW_HU = (-160.0, 240.0)  # level 40, width 400
MR_PERCENTILES = (1.0, 99.0)
FILL_ALPHA = 0.35
_OBLIQUE_TOLERANCE = 1e-3

CANVAS_SIZE = (1500, 620)  # (width, height) px, the former 15 x 6.2 inch figure at 100 dpi; see render_overlay
LEGEND_COLUMNS = 5
_MARGIN = 8  # px: around the canvas and between the three panels
_LEGEND_ROW_PX = 24
_TITLE_PX = 26  # room above each view for its title
_TITLE_GAP_PX = 4
_FOOTER_PX = 26
_LETTER_INSET_PX = 4
_LETTER_BOX_PX = 80  # letters go on the edges of a box at least this wide and high
_MIN_PANEL_PX = 500  # height the views keep however many rows the legend takes
_FONT_PX = {"title": 18, "letter": 16, "legend": 15, "footer": 14}
_SMALLEST_FONT_PX = 8


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
    """The pixels of a 2D boolean ``mask`` ``(rows, cols)`` that have a 4-neighbour outside it.

    ``mask & ~binary_erosion(mask)`` with a cross-shaped element and border value 0 (scipy's
    default), in numpy: mask pixels on the array's border always count as outline.
    """
    eroded = np.zeros_like(mask)
    eroded[1:-1, 1:-1] = (mask[1:-1, 1:-1] & mask[:-2, 1:-1] & mask[2:, 1:-1]
                          & mask[1:-1, :-2] & mask[1:-1, 2:])
    return mask & ~eroded


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


@dataclass
class OverlayView:
    """One view of an :class:`OverlayPicture`.

    Attributes:
        layer: ``(rows, cols, 4)`` float32 RGBA in [0, 1] at native voxel resolution: the segments'
            fill (alpha ``FILL_ALPHA``) and outlines (alpha 1); row 0 at the top, column 0 on the left.
        size_mm: ``(width, height)`` of the slice in millimetres.
        box: ``(left, top, right, bottom)`` canvas pixels the slice is drawn in (right, bottom excluded).
    """

    layer: np.ndarray
    size_mm: tuple[float, float]
    box: tuple[int, int, int, int]


@dataclass
class OverlayPicture:
    """The three-view overlay and what was drawn on it, for tests and callers to inspect.

    Attributes:
        image: the RGB picture (size: see :func:`render_overlay`).
        views: ``{"Axial", "Coronal", "Sagittal"}`` -> :class:`OverlayView`, in that order.
        legend: ``"Name: X.X mL"`` per segment, in segment order.
        footer: the line at the bottom (model, volume, "Not for clinical use", oblique note).
    """

    image: Image.Image
    views: dict[str, OverlayView]
    legend: list[str]
    footer: str


@lru_cache(maxsize=None)
def _font(size: int) -> ImageFont.FreeTypeFont:
    """Pillow's built-in scalable font at ``size`` px (cached: each load parses the font)."""
    from PIL import ImageFont

    return ImageFont.load_default(size=size)


def _fitting_font(size: int, fits) -> ImageFont.FreeTypeFont:
    """The font at ``size`` px, or smaller until ``fits(font)``, so long names are not clipped."""
    while size > _SMALLEST_FONT_PX and not fits(_font(size)):
        size -= 1
    return _font(size)


def _segment_layer(shape: tuple[int, int], masks: list[np.ndarray], colours: list[np.ndarray]) -> np.ndarray:
    """``(rows, cols)`` masks and RGB colours in [0, 1] -> ``(rows, cols, 4)`` RGBA layer; a later
    segment covers an earlier one where they overlap."""
    layer = np.zeros((*shape, 4), dtype=np.float32)
    for mask, colour in zip(masks, colours):
        inside = mask > 0
        layer[inside] = (*colour, FILL_ALPHA)
        layer[_outline(inside)] = (*colour, 1.0)
    return layer


def _composite(grey: np.ndarray, layer: np.ndarray) -> np.ndarray:
    """``(rows, cols)`` grey in [0, 1] under an RGBA ``layer`` -> ``(rows, cols, 3)`` uint8 RGB."""
    alpha = layer[..., 3:]
    rgb = grey[..., None] * (1.0 - alpha) + layer[..., :3] * alpha
    return np.rint(rgb * 255.0).astype(np.uint8)


def _panels(top: int, bottom: int) -> list[tuple[int, int, int, int]]:
    """Three side-by-side ``(left, top, right, bottom)`` panels between rows ``top`` and ``bottom``."""
    width = (CANVAS_SIZE[0] - 4 * _MARGIN) // 3
    lefts = [_MARGIN + n * (width + _MARGIN) for n in range(3)]
    return [(left, top, left + width, bottom) for left in lefts]


def _fit(panel: tuple[int, int, int, int], size_mm: tuple[float, float]) -> tuple[int, int, int, int]:
    """The largest box with the aspect of ``size_mm`` (width, height) centred in ``panel``."""
    left, top, right, bottom = panel
    scale = min((right - left) / size_mm[0], (bottom - top) / size_mm[1])
    width, height = (max(1, round(mm * scale)) for mm in size_mm)
    x, y = left + (right - left - width) // 2, top + (bottom - top - height) // 2
    return x, y, x + width, y + height


def _letter_box(box: tuple[int, int, int, int], panel: tuple[int, int, int, int]) -> tuple[int, int, int, int]:
    """``box`` grown to at least ``_LETTER_BOX_PX`` each way, within ``panel``: the orientation
    letters of a thin slab (a few slices) then sit beside it instead of on top of each other."""
    left, top, right, bottom = box
    grow_x = max(0, _LETTER_BOX_PX - (right - left) + 1) // 2
    grow_y = max(0, _LETTER_BOX_PX - (bottom - top) + 1) // 2
    return (max(panel[0], left - grow_x), max(panel[1], top - grow_y),
            min(panel[2], right + grow_x), min(panel[3], bottom + grow_y))


def _draw_view(canvas: Image.Image, name: str, rgb: np.ndarray, box: tuple[int, int, int, int],
               panel: tuple[int, int, int, int]) -> None:
    """Paste the ``(rows, cols, 3)`` uint8 view scaled into ``box``; draw its orientation letters just
    inside the edges of its :func:`_letter_box` and its title above that."""
    from PIL import Image, ImageDraw

    canvas.paste(Image.fromarray(rgb).resize((box[2] - box[0], box[3] - box[1]), Image.Resampling.NEAREST), box[:2])
    draw = ImageDraw.Draw(canvas)
    left, top, right, bottom = _letter_box(box, panel)
    centre_x, centre_y = (left + right) // 2, (top + bottom) // 2
    upper, lower, left_letter, right_letter = _VIEW_LETTERS[name]
    inset = _LETTER_INSET_PX
    for text, xy, anchor in ((upper, (centre_x, top + inset), "mt"), (lower, (centre_x, bottom - inset), "mb"),
                             (left_letter, (left + inset, centre_y), "lm"),
                             (right_letter, (right - inset, centre_y), "rm")):
        # A black rim keeps the letters legible over bright bone and contrast.
        draw.text(xy, text, fill="yellow", font=_font(_FONT_PX["letter"]), anchor=anchor,
                  stroke_width=2, stroke_fill="black")
    draw.text((centre_x, top - _TITLE_GAP_PX), name, fill="white", font=_font(_FONT_PX["title"]), anchor="md")


_LegendEntry = tuple[str, tuple[int, int, int]]  # (text, RGB colour)


def _entry_width(text: str, font: ImageFont.FreeTypeFont) -> float:
    """Pixels of one legend entry: a swatch (the font's size), half a swatch of gap, the text."""
    return 1.5 * font.size + font.getlength(text)


def _row_width(row: list[_LegendEntry], font: ImageFont.FreeTypeFont) -> float:
    """Pixels of one legend row: its entries, two swatches between them."""
    return sum(_entry_width(text, font) for text, _ in row) + 2 * font.size * (len(row) - 1)


def _legend_layout(entries: list[_LegendEntry]) -> tuple[ImageFont.FreeTypeFont, list[list[_LegendEntry]]]:
    """The legend's font and rows: up to ``LEGEND_COLUMNS`` entries a row, fewer when long names
    would not fit the width (a smaller font only for an entry too long for a row of its own)."""
    width = CANVAS_SIZE[0] - 2 * _MARGIN
    font = _fitting_font(_FONT_PX["legend"], lambda f: all(_row_width([entry], f) <= width for entry in entries))
    rows = [[]]
    for entry in entries:
        if len(rows[-1]) == LEGEND_COLUMNS or (rows[-1] and _row_width(rows[-1] + [entry], font) > width):
            rows.append([])
        rows[-1].append(entry)
    return font, [row for row in rows if row]


def _draw_legend(canvas: Image.Image, font: ImageFont.FreeTypeFont, rows: list[list[_LegendEntry]]) -> None:
    """Each legend row centred along the top of the canvas, ``_LEGEND_ROW_PX`` apart."""
    from PIL import ImageDraw

    draw = ImageDraw.Draw(canvas)
    swatch = font.size
    for number, row in enumerate(rows):
        x = (canvas.width - _row_width(row, font)) / 2
        y = _MARGIN + (number + 0.5) * _LEGEND_ROW_PX
        for text, colour in row:
            draw.rectangle((x, y - swatch / 2, x + swatch, y + swatch / 2), fill=colour)
            draw.text((x + 1.5 * swatch, y), text, fill="white", font=font, anchor="lm")
            x += _entry_width(text, font) + 2 * swatch


def _draw_footer(canvas: Image.Image, text: str) -> None:
    """``text`` centred along the bottom edge, smaller if needed to fit the canvas's width."""
    from PIL import ImageDraw

    font = _fitting_font(_FONT_PX["footer"], lambda f: f.getlength(text) <= canvas.width - 2 * _MARGIN)
    ImageDraw.Draw(canvas).text((canvas.width // 2, canvas.height - _MARGIN), text, fill="white", font=font,
                                anchor="md")


def render_overlay(result: LabelResult) -> OverlayPicture:
    """Draw the three-view overlay of ``result`` on black: ``CANVAS_SIZE`` pixels, taller only when
    the legend needs more than two rows (so the views keep ``_MIN_PANEL_PX`` of height)."""
    from PIL import Image  # only when drawing: `refsam3d --help` imports this module

    volume = result.reference
    perm, flipped, oblique = ras_axes(volume.ijk_to_ras)
    spacing_ras = np.asarray(volume.spacing_mm)[perm]
    image = to_ras_array(volume.array, perm, flipped)
    centre = ras_centre(segments_centre_kji(result), image.shape, perm, flipped)
    mask_views = [_view_slices(to_ras_array(segment.mask, perm, flipped), centre) for segment in result.segments]
    colours = [np.array(segment.color_rgb, dtype=np.float32) / 255.0 for segment in result.segments]
    low, high = display_range(volume)

    legend = [f"{s.name}: {result.volume_ml(s):.1f} mL" for s in result.segments]
    font, legend_rows = _legend_layout([(text, s.color_rgb) for text, s in zip(legend, result.segments)])
    panels_top = _MARGIN + len(legend_rows) * _LEGEND_ROW_PX + _TITLE_PX
    canvas = Image.new("RGB", (CANVAS_SIZE[0], max(CANVAS_SIZE[1], panels_top + _MIN_PANEL_PX + _FOOTER_PX)), "black")
    _draw_legend(canvas, font, legend_rows)
    views = {}
    panels = _panels(panels_top, canvas.height - _FOOTER_PX)
    for panel, (name, values) in zip(panels, _view_slices(image, centre).items()):
        rows, cols = values.shape
        row_mm, col_mm = (float(spacing_ras[a]) for a in _VIEW_SPACING[name])
        size_mm = (cols * col_mm, rows * row_mm)
        layer = _segment_layer(values.shape, [views_of[name] for views_of in mask_views], colours)
        grey = np.clip((values.astype(np.float32) - low) / (high - low), 0.0, 1.0)
        box = _fit(panel, size_mm)
        _draw_view(canvas, name, _composite(grey, layer), box, panel)
        views[name] = OverlayView(layer, size_mm, box)

    footer = f"{result.model_name} {result.model_version}  |  {volume.name or 'volume'}  |  Not for clinical use"
    if oblique:
        footer += "  |  oblique volume: shown along its nearest patient axes (not resampled)"
    _draw_footer(canvas, footer)
    return OverlayPicture(canvas, views, legend, footer)


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
    picture = render_overlay(result)
    with atomic_write(path) as temporary:
        picture.image.save(temporary, format="PNG")
    return path
