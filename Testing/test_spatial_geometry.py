"""Spatial prompts' coordinate contract: RAS mm -> the input's voxel -> model space -> window."""

import itertools

import numpy as np
import pytest
import SimpleITK as sitk
from scipy.spatial.transform import Rotation

from RefSAM3DLib import preprocess
from RefSAM3DLib.errors import RefSAM3DError
from RefSAM3DLib.geometry import (box_in_window, box_ras_to_dhw, nearest_voxel_kji, points_in_window,
                                  ras_points_to_dhw, volume_from_sitk, window_holds_box)
from RefSAM3DLib.volume import Volume

STORED = {
    "LPS": np.eye(3),  # ITK's default: i -> L, j -> P, k -> S
    "RAS": np.diag([-1.0, -1.0, 1.0]),  # i -> R, j -> A stored in LPS terms
    "oblique": Rotation.from_euler("xyz", [20, -35, 50], degrees=True).as_matrix() @ np.diag([1.0, -1.0, 1.0]),
}


def stored_image(direction_lps: np.ndarray) -> sitk.Image:
    image = sitk.Image(13, 11, 9, sitk.sitkInt16)
    image.SetSpacing((0.9, 1.7, 3.1))
    image.SetOrigin((-20.0, 35.0, -60.0))
    image.SetDirection(direction_lps.ravel().tolist())
    return image


def ras_of_index(image: sitk.Image, index_ijk, offset_voxels=(0.0, 0.0, 0.0)) -> np.ndarray:
    """RAS mm of a (sub-)voxel position by ITK's own index-to-point, flipped from LPS by hand."""
    lps = image.TransformContinuousIndexToPhysicalPoint([float(a + b) for a, b in zip(index_ijk, offset_voxels)])
    return np.array([-lps[0], -lps[1], lps[2]])


@pytest.mark.parametrize("stored", sorted(STORED))
def test_ras_point_lands_on_its_voxel_for_lps_ras_and_oblique_volumes(stored):
    image = stored_image(STORED[stored])
    volume = volume_from_sitk(image, name=stored)
    for index in [(0, 0, 0), (12, 10, 8), (5, 3, 7), (9, 1, 2)]:
        for offset in [(0.0, 0.0, 0.0), (0.45, -0.45, 0.3), (-0.3, 0.4, -0.45)]:
            ras = ras_of_index(image, index, offset)
            assert nearest_voxel_kji(ras, volume) == tuple(reversed(index))


@pytest.mark.parametrize("stored", sorted(STORED))
def test_ras_point_lands_on_the_model_space_voxel_that_holds_its_input_voxel(stored):
    image = stored_image(STORED[stored])
    volume = volume_from_sitk(image, name=stored)
    labels = np.zeros(volume.shape_kji, np.uint8)
    index = (6, 4, 3)
    labels[tuple(reversed(index))] = 7
    grid = preprocess.model_grid(volume, (0.5, 0.5, 0.5))
    labels_dhw = preprocess.labels_to_model_space(Volume(labels, volume.ijk_to_ras), grid)

    dhw = ras_points_to_dhw([ras_of_index(image, index)], volume, grid.model)[0]

    assert labels_dhw[tuple(int(v) for v in np.floor(dhw + 0.5))] == 7


def test_box_with_corners_in_any_order_is_the_same_box():
    image = stored_image(STORED["oblique"])
    volume = volume_from_sitk(image)
    grid = preprocess.model_grid(volume, (2.0, 2.0, 2.0))
    low, high = ras_of_index(image, (3, 3, 2)), ras_of_index(image, (9, 8, 6))
    expected = box_ras_to_dhw(np.concatenate([low, high]), volume, grid.model)
    assert np.all(expected[:3] <= expected[3:])
    for picks in itertools.product((0, 1), repeat=3):  # per axis: which corner gives the first value
        first = [(low, high)[p][axis] for axis, p in enumerate(picks)]
        second = [(high, low)[p][axis] for axis, p in enumerate(picks)]
        np.testing.assert_allclose(box_ras_to_dhw(first + second, volume, grid.model), expected)


@pytest.mark.parametrize("stored", sorted(STORED))
def test_point_outside_the_volume_is_a_clear_error(stored):
    image = stored_image(STORED[stored])
    volume = volume_from_sitk(image, name="ct.nii.gz")
    grid = preprocess.model_grid(volume, (2.0, 2.0, 2.0))
    outside = ras_of_index(image, (13, 5, 4))  # one voxel past the last column
    with pytest.raises(RefSAM3DError, match=r"outside ct.nii.gz; place points on the image"):
        ras_points_to_dhw([ras_of_index(image, (1, 1, 1)), outside], volume, grid.model)
    with pytest.raises(RefSAM3DError, match="outside"):
        nearest_voxel_kji(outside, volume)


def test_box_outside_the_volume_or_malformed_is_a_clear_error():
    image = stored_image(STORED["LPS"])
    volume = volume_from_sitk(image, name="ct.nii.gz")
    grid = preprocess.model_grid(volume, (2.0, 2.0, 2.0))
    far = ras_of_index(image, (40, 5, 4))
    with pytest.raises(RefSAM3DError, match=r"box .* lies outside ct.nii.gz"):
        box_ras_to_dhw(np.concatenate([far, far + 5.0]), volume, grid.model)
    with pytest.raises(RefSAM3DError, match="6 numbers"):
        box_ras_to_dhw([1.0, 2.0, 3.0, 4.0], volume, grid.model)


def test_box_partly_outside_is_clipped_to_the_model_grid():
    image = stored_image(STORED["LPS"])
    volume = volume_from_sitk(image)
    grid = preprocess.model_grid(volume, (1.0, 1.0, 1.0))
    box = box_ras_to_dhw(np.concatenate([ras_of_index(image, (-30, 2, 2)), ras_of_index(image, (6, 8, 6))]),
                         volume, grid.model)
    assert box.min() >= 0 and np.all(box[3:] <= np.array(grid.shape_dhw) - 1)
    assert box[2] == 0  # the i (w) axis ran out of the volume and was cut at its first voxel


def test_window_keeps_its_points_and_clips_the_box():
    points = np.array([[10.0, 10.0, 10.0], [50.0, 10.0, 10.0]])
    np.testing.assert_array_equal(points_in_window(points, (0, 0, 0), 32), [True, False])
    np.testing.assert_array_equal(points_in_window(points, (40, 0, 0), 32), [False, True])
    np.testing.assert_allclose(box_in_window(np.array([20.0, 5, 5, 60, 25, 25]), (40, 0, 0), 32),
                               [0, 5, 5, 20, 25, 25])
    assert box_in_window(np.array([0.0, 0, 0, 5, 5, 5]), (40, 0, 0), 32) is None


def test_a_window_holds_a_box_only_whole():
    assert window_holds_box(np.array([40.0, 0, 0, 71, 31, 31]), (40, 0, 0), 32)  # its first to last voxel
    assert not window_holds_box(np.array([40.0, 0, 0, 72, 31, 31]), (40, 0, 0), 32)  # one voxel beyond
    assert not window_holds_box(np.array([39.0, 0, 0, 50, 10, 10]), (40, 0, 0), 32)  # one before
    assert not window_holds_box(np.array([20.0, 5, 5, 60, 25, 25]), (40, 0, 0), 32)  # clipped, not held
