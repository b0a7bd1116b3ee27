"""The one LPS<->RAS / SimpleITK<->Volume conversion, checked against ITK's own index-to-point."""

import numpy as np
import pytest
import SimpleITK as sitk
from scipy.spatial.transform import Rotation

from RefSAM3DLib.errors import RefSAM3DError
from RefSAM3DLib.geometry import (LPS_TO_RAS, Grid, ijk_to_lps_from_ras, ijk_to_ras_from_lps, ijk_to_ras_from_sitk,
                                  resample, sitk_from_array, volume_from_sitk)


def oblique_ijk_to_ras(spacing_mm=(0.7, 1.3, 4.0), flip_axis=1):
    """An IJK-to-RAS matrix with an oblique rotation, anisotropic voxels and one mirrored axis."""
    direction = Rotation.from_euler("xyz", [20, -35, 50], degrees=True).as_matrix()
    direction[:, flip_axis] *= -1
    matrix = np.eye(4)
    matrix[:3, :3] = direction @ np.diag(spacing_mm)
    matrix[:3, 3] = (-12.5, 40.25, -101.0)
    return matrix


def test_oblique_flipped_anisotropic_round_trip_is_exact():
    ijk_to_ras = oblique_ijk_to_ras()
    assert np.linalg.det(ijk_to_ras[:3, :3]) < 0  # the flipped axis makes it left-handed
    array = np.random.default_rng(0).integers(-1000, 1000, size=(5, 6, 7)).astype(np.int16)

    volume = volume_from_sitk(sitk_from_array(array, ijk_to_ras), name="oblique", modality="CT")

    np.testing.assert_array_equal(volume.array, array)
    np.testing.assert_allclose(volume.ijk_to_ras, ijk_to_ras, atol=1e-9)
    np.testing.assert_allclose(volume.spacing_mm, (0.7, 1.3, 4.0), atol=1e-9)
    assert (volume.name, volume.modality) == ("oblique", "CT")


def test_ijk_to_ras_agrees_with_itk_physical_points_flipped_to_ras():
    image = sitk.Image(7, 6, 5, sitk.sitkInt16)
    image.SetSpacing((0.8, 1.1, 3.3))
    image.SetOrigin((100.0, -50.0, 20.0))
    direction = Rotation.from_euler("zyx", [30, 10, -25], degrees=True).as_matrix()
    direction[:, 2] *= -1
    image.SetDirection(direction.ravel().tolist())
    ijk_to_ras = ijk_to_ras_from_sitk(image)

    for index in [(0, 0, 0), (6, 0, 0), (0, 5, 0), (0, 0, 4), (3, 2, 1), (6, 5, 4)]:
        lps = image.TransformIndexToPhysicalPoint(index)
        expected_ras = (-lps[0], -lps[1], lps[2])
        np.testing.assert_allclose((ijk_to_ras @ (*index, 1.0))[:3], expected_ras, atol=1e-9)


def test_lps_to_ras_flips_x_and_y_only():
    np.testing.assert_array_equal(LPS_TO_RAS, np.diag([-1.0, -1.0, 1.0, 1.0]))
    image = sitk.Image(2, 2, 2, sitk.sitkUInt8)
    image.SetOrigin((10.0, 20.0, 30.0))
    np.testing.assert_array_equal(ijk_to_ras_from_sitk(image)[:3, 3], (-10.0, -20.0, 30.0))
    ijk_to_ras = oblique_ijk_to_ras()
    ijk_to_lps = ijk_to_lps_from_ras(ijk_to_ras)
    np.testing.assert_array_equal(ijk_to_lps[:2], -ijk_to_ras[:2])
    np.testing.assert_array_equal(ijk_to_lps[2:], ijk_to_ras[2:])
    np.testing.assert_array_equal(ijk_to_ras_from_lps(ijk_to_lps), ijk_to_ras)


@pytest.mark.parametrize("bad_matrix, problem", [
    (np.diag([1.0, 0.0, 1.0, 1.0]), "zero-length"),
    (np.array([[1.0, 0.5, 0, 0], [0, 1.0, 0, 0], [0, 0, 1.0, 0], [0, 0, 0, 1]]), "sheared"),
    (np.array([[1.0, 0, 0, 0], [0, 1.0, 0, 0], [0, 0, 1.0, 0], [0, 0, 0.1, 1]]), "affine"),
])
def test_matrices_itk_cannot_represent_are_refused(bad_matrix, problem):
    with pytest.raises(RefSAM3DError, match=problem):
        sitk_from_array(np.zeros((2, 2, 2), np.uint8), bad_matrix)


def test_grid_matches_only_the_same_voxel_positions():
    grid = Grid.from_ijk_to_ras(oblique_ijk_to_ras(), (5, 6, 7))
    assert grid.size_ijk == (7, 6, 5) and grid.shape_kji == (5, 6, 7)
    np.testing.assert_allclose(grid.ijk_to_ras, oblique_ijk_to_ras(), atol=1e-9)
    assert grid.matches(Grid.from_ijk_to_ras(oblique_ijk_to_ras(), (5, 6, 7)))
    assert not grid.matches(Grid.from_ijk_to_ras(oblique_ijk_to_ras(), (5, 6, 8)))
    shifted = oblique_ijk_to_ras()
    shifted[0, 3] += 0.01
    assert not grid.matches(Grid.from_ijk_to_ras(shifted, (5, 6, 7)))


def test_resample_onto_own_grid_is_identity():
    ijk_to_ras = oblique_ijk_to_ras()
    array = np.random.default_rng(1).random((5, 6, 7)).astype(np.float32)
    image = sitk_from_array(array, ijk_to_ras)
    same = resample(image, Grid.of_image(image), sitk.sitkLinear)
    np.testing.assert_allclose(sitk.GetArrayFromImage(same), array, atol=1e-5)
