"""The PNG overlay: radiological orientation, true aspect, legend, atomic writing."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from RefSAM3DLib.errors import RefSAM3DError
from RefSAM3DLib.overlay import (
    CANVAS_SIZE, FILL_ALPHA, _outline, display_range, ras_axes, render_overlay, write_overlay_png,
)
from RefSAM3DLib.result import LabelResult, Segment
from RefSAM3DLib.vocabulary import lookup
from RefSAM3DLib.volume import Volume

# i runs towards the patient's Left, j towards Posterior, k towards Superior (an LPS-stored file).
LPS_LIKE = np.array([[-2.0, 0, 0, 40], [0, -1.0, 0, 30], [0, 0, 3.0, -20], [0, 0, 0, 1]])
SHAPE_KJI = (10, 30, 20)


def make_result(ijk_to_ras=LPS_LIKE, modality="CT", empty=False):
    array = np.full(SHAPE_KJI, -1000, dtype=np.int16)
    array[2:8, 5:25, 3:17] = 40
    mask = np.zeros(SHAPE_KJI, dtype=np.uint8)
    if not empty:
        # Patient's right (small i), anterior (small j), superior (large k).
        mask[6:9, 2:8, 1:6] = 1
    volume = Volume(array, ijk_to_ras, modality=modality, name="synthetic.nii.gz")
    return LabelResult(volume, [Segment("right kidney", lookup("kidney_right"), mask)], "refsam3d-test", "0.0")


def coloured(layer):
    """Row and column indices of painted pixels in an RGBA overlay layer."""
    return np.nonzero(layer[..., 3] > 0)


def test_views_are_radiological_with_true_aspect():
    views = render_overlay(make_result()).views
    axial, coronal, sagittal = (views[name].layer for name in ("Axial", "Coronal", "Sagittal"))
    rows, cols = coloured(axial)
    assert cols.max() < axial.shape[1] / 2, "patient's right must be on the viewer's left"
    assert rows.max() < axial.shape[0] / 2, "anterior must be at the top of the axial view"
    rows, cols = coloured(coronal)
    assert rows.max() < coronal.shape[0] / 2, "superior must be at the top"
    assert cols.max() < coronal.shape[1] / 2
    rows, cols = coloured(sagittal)
    assert cols.max() < sagittal.shape[1] / 2, "anterior must be on the left of the sagittal view"
    # axial: I = 20 columns of 2 mm, J = 30 rows of 1 mm -> 40 mm wide, 30 mm high
    assert views["Axial"].size_mm == pytest.approx((40.0, 30.0))
    assert views["Coronal"].size_mm == pytest.approx((40.0, 30.0))  # 10 slices of 3 mm high
    left, top, right, bottom = views["Axial"].box
    assert (right - left) / (bottom - top) == pytest.approx(40.0 / 30.0, rel=0.01), "drawn at the true aspect"


def test_legend_names_volume_and_footer_says_not_for_clinical_use():
    result = make_result()
    picture = render_overlay(result)
    assert picture.legend == [f"Right kidney: {result.volume_ml(result.segments[0]):.1f} mL"]
    assert "Not for clinical use" in picture.footer and "refsam3d-test" in picture.footer


def test_oblique_volume_is_flagged():
    angle = np.deg2rad(20)
    rotation = np.array([[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0], [0, 0, 1]])
    matrix = np.eye(4)
    matrix[:3, :3] = rotation @ np.diag([2.0, 1.0, 3.0])
    assert ras_axes(LPS_LIKE)[2] is False
    perm, flipped, oblique = ras_axes(matrix)
    assert oblique and list(perm) == [0, 1, 2] and not flipped.any()
    assert "oblique" in render_overlay(make_result(matrix)).footer


def test_outline_matches_scipy_erosion():
    from scipy.ndimage import binary_erosion  # here: importing this file must not import scipy (test below)

    rng = np.random.default_rng(1)
    for shape in [(40, 30), (1, 7), (2, 2), (3, 5)]:
        mask = rng.random(shape) < 0.6
        assert np.array_equal(_outline(mask), mask & ~binary_erosion(mask)), shape


def test_permuted_axes_are_reordered():
    # i -> S, j -> R, k -> A
    matrix = np.array([[0, 1.0, 0, 0], [0, 0, 1.0, 0], [1.0, 0, 0, 0], [0, 0, 0, 1]])
    perm, flipped, oblique = ras_axes(matrix)
    assert list(perm) == [1, 2, 0] and not flipped.any() and not oblique


def test_display_range_ct_window_and_mr_percentiles():
    assert display_range(make_result().reference) == (-160.0, 240.0)
    rng = np.random.default_rng(0)
    mr = Volume(rng.uniform(100, 200, size=(8, 8, 8)).astype(np.float32), np.eye(4), modality="MR")
    low, high = display_range(mr)
    assert 100 <= low < 105 and 195 < high <= 200


def test_png_is_written_atomically_and_not_overwritten(tmp_path):
    path = tmp_path / "out.png"
    write_overlay_png(make_result(), path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(RefSAM3DError, match="already exists"):
        write_overlay_png(make_result(), path)
    first = path.stat().st_mtime_ns
    write_overlay_png(make_result(empty=True), path, overwrite=True)
    assert path.stat().st_mtime_ns >= first
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.png"]


def test_png_shows_the_segment_blended_over_the_grey(tmp_path):
    result = make_result()
    result.reference.array[...] = 40  # uniform soft tissue: grey (40 + 160) / 400 under the whole segment
    path = write_overlay_png(result, tmp_path / "out.png")
    axial = render_overlay(result).views["Axial"]
    with Image.open(path) as png:
        assert png.size == CANVAS_SIZE
        pixels = np.asarray(png.convert("RGB"), dtype=np.float64)
    rows, cols = np.nonzero(axial.layer[..., 3] == np.float32(FILL_ALPHA))
    row, col = int(round(rows.mean())), int(round(cols.mean()))
    assert axial.layer[row, col, 3] == np.float32(FILL_ALPHA), "the segment's centre is inside its fill"
    left, top, right, bottom = axial.box
    x = left + int((col + 0.5) * (right - left) / axial.layer.shape[1])
    y = top + int((row + 0.5) * (bottom - top) / axial.layer.shape[0])
    grey = 0.5 * 255
    colour = np.array(result.segments[0].color_rgb, dtype=np.float64)
    assert pixels[y, x] == pytest.approx((1 - FILL_ALPHA) * grey + FILL_ALPHA * colour, abs=1.0)
    corner_x, corner_y = left + 1, bottom - 2  # the patient's posterior right: the segment is anterior
    assert pixels[corner_y, corner_x] == pytest.approx([grey] * 3, abs=1.0)


def test_drawing_imports_neither_matplotlib_nor_scipy(tmp_path):
    # They cost about a second of a command-line run; Pillow alone draws the picture.
    code = f"""
import sys
from test_overlay import make_result
from RefSAM3DLib.overlay import write_overlay_png
write_overlay_png(make_result(), {str(tmp_path / "out.png")!r})
print(sorted({{"matplotlib", "scipy"}} & {{name.partition(".")[0] for name in sys.modules}}))
"""
    done = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).parent, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])}, check=True)
    assert done.stdout.strip() == "[]"
