"""The PNG overlay: radiological orientation, true aspect, legend, atomic writing."""

import numpy as np
import pytest

from RefSAM3DLib.errors import RefSAM3DError
from RefSAM3DLib.overlay import display_range, overlay_figure, ras_axes, write_overlay_png
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
    figure = overlay_figure(make_result())
    axial, coronal, sagittal = (ax.images for ax in figure.axes[:3])
    rows, cols = coloured(axial[1].get_array())
    width = axial[1].get_array().shape[1]
    height = axial[1].get_array().shape[0]
    assert cols.max() < width / 2, "patient's right must be on the viewer's left"
    assert rows.max() < height / 2, "anterior must be at the top of the axial view"
    rows, cols = coloured(coronal[1].get_array())
    assert rows.max() < coronal[1].get_array().shape[0] / 2, "superior must be at the top"
    assert cols.max() < coronal[1].get_array().shape[1] / 2
    rows, cols = coloured(sagittal[1].get_array())
    assert cols.max() < sagittal[1].get_array().shape[1] / 2, "anterior must be on the left of the sagittal view"
    # axial: I = 20 columns of 2 mm, J = 30 rows of 1 mm -> 40 mm wide, 30 mm high
    left, right, bottom, top = axial[0].get_extent()
    assert (right - left, bottom - top) == pytest.approx((40.0, 30.0))
    left, right, bottom, top = coronal[0].get_extent()
    assert (right - left, bottom - top) == pytest.approx((40.0, 30.0))  # 10 slices of 3 mm high


def test_legend_names_volume_and_footer_says_not_for_clinical_use():
    result = make_result()
    texts = [t.get_text() for t in overlay_figure(result).legends[0].get_texts()]
    assert texts == [f"Right kidney: {result.volume_ml(result.segments[0]):.1f} mL"]
    figure_texts = " ".join(t.get_text() for t in overlay_figure(result).texts)
    assert "Not for clinical use" in figure_texts and "refsam3d-test" in figure_texts


def test_oblique_volume_is_flagged():
    angle = np.deg2rad(20)
    rotation = np.array([[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0], [0, 0, 1]])
    matrix = np.eye(4)
    matrix[:3, :3] = rotation @ np.diag([2.0, 1.0, 3.0])
    assert ras_axes(LPS_LIKE)[2] is False
    perm, flipped, oblique = ras_axes(matrix)
    assert oblique and list(perm) == [0, 1, 2] and not flipped.any()
    footer = " ".join(t.get_text() for t in overlay_figure(make_result(matrix)).texts)
    assert "oblique" in footer


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
