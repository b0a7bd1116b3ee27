"""Model-space preprocessing: orientation, spacing, intensity, and the way back to input voxels."""

import numpy as np
import pytest
import torch
from monai.inferers import sliding_window_inference
from scipy.spatial.transform import Rotation

from RefSAM3DLib.errors import RefSAM3DError
from RefSAM3DLib.geometry import LPS_TO_RAS
from RefSAM3DLib.volume_reader import read_volume
from RefSAM3DLib.preprocess import (BODY_MARGIN_VOX, BODY_THRESHOLD, COVERAGE_LEVELS, IntensitySettings,
                                    from_model_space, label_coverage_in_model_space, labels_to_model_space,
                                    model_grid, to_model_space)
from RefSAM3DLib.volume import Volume

CT = IntensitySettings("CT", ct_window_hu=(-160.0, 240.0), mr_percentiles=(0.5, 99.5))
MR = IntensitySettings("MR", ct_window_hu=(-160.0, 240.0), mr_percentiles=(0.5, 99.5))


def oblique_ijk_to_ras(spacing_mm=(0.9, 1.2, 3.0)):
    direction = Rotation.from_euler("xyz", [15, -25, 40], degrees=True).as_matrix()
    direction[:, 0] *= -1  # a mirrored axis as well
    matrix = np.eye(4)
    matrix[:3, :3] = direction @ np.diag(spacing_mm)
    matrix[:3, 3] = (30.0, -20.0, 55.0)
    return matrix


def ellipsoid_volume(shape_kji=(24, 64, 72), radii_mm=(18.0, 14.0, 22.0)):
    """An oblique anisotropic CT-like volume: an ellipsoid of 60 HU in -1000 HU air."""
    ijk_to_ras = oblique_ijk_to_ras()
    k, j, i = np.meshgrid(*(np.arange(n) for n in shape_kji), indexing="ij")
    points = np.stack([i, j, k, np.ones_like(i)], axis=-1).reshape(-1, 4).T.astype(float)
    centre = ijk_to_ras @ np.array([(shape_kji[2] - 1) / 2, (shape_kji[1] - 1) / 2,
                                    (shape_kji[0] - 1) / 2, 1.0])
    offset = (ijk_to_ras @ points)[:3] - centre[:3, None]
    inside = (((offset / np.array(radii_mm)[:, None]) ** 2).sum(axis=0) <= 1.0).reshape(shape_kji)
    array = np.where(inside, 60, -1000).astype(np.int16)
    return Volume(array, ijk_to_ras, modality="CT", name="ellipsoid"), inside.astype(np.uint8)


def dice(a, b):
    a, b = a > 0, b > 0
    return 2.0 * np.count_nonzero(a & b) / (np.count_nonzero(a) + np.count_nonzero(b))


def test_label_round_trip_recovers_blob_on_oblique_anisotropic_volume():
    volume, blob = ellipsoid_volume()
    grid = model_grid(volume, (1.5, 1.5, 1.5))
    label_volume = Volume(blob, volume.ijk_to_ras)

    labels_dhw = labels_to_model_space(label_volume, grid)
    back = from_model_space(labels_dhw.astype(np.float32), grid, "linear")

    assert labels_dhw.dtype == np.uint8 and labels_dhw.shape == grid.shape_dhw
    assert back.dtype == np.float32 and back.shape == volume.shape_kji
    assert dice(back >= 0.5, blob) > 0.9


@pytest.mark.parametrize("ijk_to_ras", [np.diag([1.0, 1.0, 1.0, 1.0]), np.diag([-1.0, -1.0, 1.0, 1.0])],
                         ids=["RAS", "LPS"])
def test_coverage_counts_the_part_of_each_model_voxel_inside_a_label(ijk_to_ras):
    # A 1 mm label whose slab of value 2 ends 1 mm into a 3 mm model voxel: that voxel is a third
    # inside, which a nearest-neighbour label on the model grid cannot say.
    labels = np.zeros((30, 30, 30), dtype=np.uint8)
    labels[:, :, :] = 1
    labels[:, :, :13] = 2  # i < 13
    volume = Volume(labels, ijk_to_ras)
    grid = model_grid(volume, (3.0, 3.0, 3.0))
    coverage = label_coverage_in_model_space(volume, grid, [2, 1, 7])
    nearest = labels_to_model_space(volume, grid)

    assert coverage.shape == (3, *grid.shape_dhw) and coverage.dtype == np.uint8
    assert np.all(coverage[0] + coverage[1] == COVERAGE_LEVELS) and not coverage[2].any()
    # Each (d, h) row holds 13 mm of value 2 along i, whichever way the file stores its axes.
    assert np.all(coverage[0].sum(axis=2) == 13 * COVERAGE_LEVELS // 3)
    partial = np.unique(coverage[0][(coverage[0] > 0) & (coverage[0] < COVERAGE_LEVELS)])
    assert partial.tolist() == [COVERAGE_LEVELS // 3]
    # A voxel whose centre is inside is at least half inside: the majority agrees with the labels.
    assert np.array_equal(coverage[0] > COVERAGE_LEVELS // 2, nearest == 2)


def test_coverage_of_an_oblique_volume_measures_its_label_volume():
    volume, blob = ellipsoid_volume()
    grid = model_grid(volume, (3.0, 3.0, 3.0))
    coverage = label_coverage_in_model_space(Volume(blob, volume.ijk_to_ras), grid, [1])[0]
    ellipsoid_ml = 4.0 / 3.0 * np.pi * 18.0 * 14.0 * 22.0 / 1000.0
    assert abs(coverage.sum() / COVERAGE_LEVELS * 27.0 / 1000.0 - ellipsoid_ml) < 0.03 * ellipsoid_ml
    assert ((coverage > 0) & (coverage < COVERAGE_LEVELS)).any()


def test_image_round_trip_recovers_blob_from_normalised_intensities():
    volume, blob = ellipsoid_volume()
    image_dhw, grid = to_model_space(volume, (1.5, 1.5, 1.5), CT)
    back = from_model_space(image_dhw, grid)
    # 60 HU in a (-160, 240) window is 0.55; air is 0: threshold half way.
    assert dice(back >= 0.275, blob) > 0.9


def test_model_space_is_cropped_to_the_body_with_a_margin_of_air():
    volume, blob = ellipsoid_volume()
    whole = model_grid(volume, (1.5, 1.5, 1.5))
    image, grid = to_model_space(volume, (1.5, 1.5, 1.5), CT)
    assert image.shape == grid.shape_dhw
    assert all(cropped < full for cropped, full in zip(grid.shape_dhw, whole.shape_dhw))
    body = image > BODY_THRESHOLD
    for axis in range(3):
        hits = np.flatnonzero(body.any(axis=tuple(a for a in range(3) if a != axis)))
        assert hits[0] == BODY_MARGIN_VOX and hits[-1] == image.shape[axis] - 1 - BODY_MARGIN_VOX
    # The crop is a part of the whole grid: same spacing and axes, the origin on its voxels.
    offset = (np.array(grid.model.origin_lps) - np.array(whole.model.origin_lps)) / 1.5
    assert grid.model.direction == whole.model.direction and np.allclose(offset, np.round(offset))
    # Outside the crop the way back gives 0 (air), and the body lands where it was.
    back = from_model_space(image, grid)
    assert dice(back >= 0.275, blob) > 0.9 and back[blob == 0].max() < 0.275


def test_an_image_with_no_body_keeps_its_whole_grid():
    volume = Volume(np.full((10, 12, 14), -1000, np.int16), np.eye(4), modality="CT")
    image, grid = to_model_space(volume, (1.0, 1.0, 1.0), CT)
    assert grid.model.matches(model_grid(volume, (1.0, 1.0, 1.0)).model) and image.shape == (10, 12, 14)


def test_model_grid_is_axis_aligned_lps_and_covers_the_input():
    volume, _ = ellipsoid_volume()
    grid = model_grid(volume, (1.5, 2.0, 2.5))
    assert grid.model.direction == (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)
    assert grid.model.spacing_mm == (1.5, 2.0, 2.5)
    assert grid.shape_dhw == grid.model.shape_kji
    k, j, i = volume.shape_kji
    corners = np.array([[a, b, c, 1.0] for a in (-0.5, i - 0.5) for b in (-0.5, j - 0.5)
                        for c in (-0.5, k - 0.5)]).T
    corners_lps = (LPS_TO_RAS @ volume.ijk_to_ras @ corners)[:3]
    spacing, origin = np.array(grid.model.spacing_mm), np.array(grid.model.origin_lps)
    first_face = origin - spacing / 2
    last_face = first_face + np.array(grid.model.size_ijk) * spacing
    assert np.all(corners_lps.min(axis=1) >= first_face - 1e-6)
    assert np.all(corners_lps.max(axis=1) <= last_face + 1e-6)
    assert np.all(last_face - first_face - (corners_lps.max(axis=1) - corners_lps.min(axis=1))
                  < spacing + 1e-6)


def test_same_anatomy_stored_mirrored_gives_the_same_model_image():
    volume, _ = ellipsoid_volume()
    # The same voxels stored with the i axis reversed: voxel i of the copy is voxel I-1-i.
    mirror = np.eye(4)
    mirror[0, 0], mirror[0, 3] = -1.0, volume.shape_kji[2] - 1
    mirrored = Volume(volume.array[:, :, ::-1].copy(), volume.ijk_to_ras @ mirror, modality="CT")

    image, grid = to_model_space(volume, (1.5, 1.5, 1.5), CT)
    image_mirrored, grid_mirrored = to_model_space(mirrored, (1.5, 1.5, 1.5), CT)

    assert grid.model.matches(grid_mirrored.model)
    np.testing.assert_allclose(image_mirrored, image, atol=1e-4)


def test_ct_window_clips_and_scales_to_unit_range():
    array = np.full((4, 4, 4), -1000, np.int16)
    array[1:3, 1:3, 1:3] = [[[40, 240], [1000, -160]], [[40, 40], [40, 40]]]
    # Voxel axes along L, P, S: the model grid's own axes, so the arrays line up voxel for voxel.
    volume = Volume(array, LPS_TO_RAS, modality="CT")
    image, grid = to_model_space(volume, (1.0, 1.0, 1.0), CT)
    assert grid.shape_dhw == (4, 4, 4)
    np.testing.assert_allclose(image[1:3, 1:3, 1:3],
                               [[[0.5, 1.0], [1.0, 0.0]], [[0.5, 0.5], [0.5, 0.5]]], atol=1e-6)
    assert image[0, 0, 0] == 0.0 and image.dtype == np.float32
    # Voxel axes along R, A, S: the model (LPS) sees i and j reversed.
    image_ras, _ = to_model_space(Volume(array, np.eye(4), modality="CT"), (1.0, 1.0, 1.0), CT)
    np.testing.assert_allclose(image_ras, image[:, ::-1, ::-1], atol=1e-6)


def test_mr_percentiles_of_nonzero_voxels_map_to_unit_range(samples_dir):
    volume = read_volume(samples_dir / "ts_example_mr_sm_image.nii.gz", modality="MR")
    image, _ = to_model_space(volume, (3.0, 3.0, 3.0), MR)
    assert image.min() == 0.0 and image.max() == 1.0
    nonzero = image[image > 0]
    # 0.5 % of the non-zero voxels lie below the low percentile and 0.5 % above the high one.
    assert 0.002 < np.mean(nonzero >= 1.0) < 0.02
    assert 0.1 < float(np.median(nonzero)) < 0.9


def test_volume_smaller_than_one_window_is_padded_by_sliding_windows(samples_dir):
    volume = read_volume(samples_dir / "ct3slice_image.nii.gz")
    image, grid = to_model_space(volume, (4.0, 4.0, 4.0), CT)
    assert grid.shape_dhw[0] < 96
    tensor = torch.from_numpy(image)[None, None]
    output = sliding_window_inference(tensor, roi_size=(96, 96, 96), sw_batch_size=1,
                                      predictor=lambda window: window * 2.0)
    assert output.shape == tensor.shape
    np.testing.assert_allclose(output[0, 0].numpy(), image * 2.0, atol=1e-5)


def test_bad_arguments_are_refused():
    volume, _ = ellipsoid_volume()
    grid = model_grid(volume, (2.0, 2.0, 2.0))
    with pytest.raises(RefSAM3DError, match="shape"):
        from_model_space(np.zeros((2, 2, 2), np.float32), grid)
    with pytest.raises(RefSAM3DError, match="interpolation"):
        from_model_space(np.zeros(grid.shape_dhw, np.float32), grid, "cubic")
    with pytest.raises(RefSAM3DError, match="0..255"):
        labels_to_model_space(Volume(np.full((2, 2, 2), 300, np.int16), np.eye(4)), grid)
    with pytest.raises(RefSAM3DError, match="modality"):
        IntensitySettings("PET", (-160.0, 240.0), (0.5, 99.5))
    with pytest.raises(RefSAM3DError, match="spacing"):
        model_grid(volume, (0.0, 1.0, 1.0))
