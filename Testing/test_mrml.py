"""The MRML bridge against real Slicer core (slicer-core through trame-slicer), headless.

A real CT is loaded into volume nodes, as is and as an oblique, flipped, anisotropic copy; the
bridge must read the same voxels and geometry as ``read_volume``, and segments it writes must
export back onto the input's grid voxel for voxel.

Helpers for other tests: ``load_volume_node(app, path)``, ``segment_masks(segmentation_node,
volume_node)``; the ``slicer_app`` fixture is in conftest.py.
"""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk

from RefSAM3DLib import mrml
from RefSAM3DLib.errors import RefSAM3DError
from RefSAM3DLib.geometry import Grid, resample
from RefSAM3DLib.result import LabelResult, Segment
from RefSAM3DLib.result_files import read_seg_nrrd, write_seg_nrrd
from RefSAM3DLib.vocabulary import lookup
from RefSAM3DLib.volume_reader import read_volume

CASE = "ts_example_ct"
LIVER, SPLEEN = 5, 1  # values in the bundled label map (labelmaps.json)


def load_volume_node(app, path):
    """Load a file into a new scalar volume node (Slicer's own ITK-based reader)."""
    (node,) = app.io_manager.load_volumes(str(path))
    return node


def segment_masks(segmentation_node, volume_node) -> dict[str, np.ndarray]:
    """Each segment exported alone onto ``volume_node``'s grid, by segment name."""
    segmentation = segmentation_node.GetSegmentation()
    masks = {}
    for n in range(segmentation.GetNumberOfSegments()):
        segment_id = segmentation.GetNthSegmentID(n)
        name = segmentation.GetSegment(segment_id).GetName()
        masks[name] = mrml.segmentation_node_to_labelmap_array(segmentation_node, volume_node, [segment_id])
    return masks


def _assert_segment_carries(segment, expected) -> None:
    """A Slicer segment holds the result segment's name, colour, terminology and prompt."""
    assert segment.GetName() == expected.structure.name
    np.testing.assert_allclose(segment.GetColor(), np.array(expected.structure.color_rgb) / 255.0, atol=1e-6)
    assert _tag(segment, "TerminologyEntry") == expected.structure.terminology_entry()
    assert _tag(segment, "RefSAM3D.Prompt") == expected.prompt


def _tag(segment, name: str) -> str:
    import vtk

    value = vtk.reference("")
    assert segment.GetTag(name, value), f"segment {segment.GetName()} has no {name} tag"
    return str(value)


def _rotation(axis, degrees: float) -> np.ndarray:
    axis = np.asarray(axis, dtype=float) / np.linalg.norm(axis)
    angle = np.radians(degrees)
    cross = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    return np.eye(3) + np.sin(angle) * cross + (1 - np.cos(angle)) * cross @ cross


def _oblique_copy(image: sitk.Image) -> sitk.Image:
    """The same voxels with an oblique, left-right flipped direction and anisotropic spacing."""
    copy = sitk.Image(image)
    direction = _rotation((1, 2, 3), 25.0) @ np.diag([-1.0, 1.0, 1.0])  # det -1: a flipped axis
    copy.SetDirection(tuple(direction.ravel()))
    copy.SetSpacing((2.5, 3.0, 4.0))
    copy.SetOrigin((12.5, -40.0, 7.25))
    return copy


@pytest.fixture(scope="module", params=["axial", "oblique_flipped"])
def case_files(request, samples_dir, tmp_path_factory):
    """``(image_path, label_path)`` of the bundled CT, or of its oblique flipped copy (NRRD)."""
    image_path = samples_dir / f"{CASE}_image.nii.gz"
    label_path = samples_dir / f"{CASE}_label.nii.gz"
    if request.param == "axial":
        return image_path, label_path
    folder = tmp_path_factory.mktemp("oblique")
    paths = []
    for source, name in ((image_path, "oblique_image.nrrd"), (label_path, "oblique_label.nrrd")):
        sitk.WriteImage(_oblique_copy(sitk.ReadImage(str(source))), str(folder / name))
        paths.append(folder / name)
    return tuple(paths)


def _labels_on_grid_of(volume, label_path) -> np.ndarray:
    """The label file resampled (nearest) onto ``volume``'s grid: positions, not indices, decide.

    Needed because Slicer's reader stores a left-handed file (flipped axis) with its slice order
    reversed, so a node's voxel grid can be the file's grid traversed the other way.
    """
    grid = Grid.of_volume(volume)
    return sitk.GetArrayFromImage(resample(sitk.ReadImage(str(label_path)), grid, sitk.sitkNearestNeighbor))


def _assert_same_image(a, b) -> None:
    """Two Volumes hold the same value at every physical voxel position (grids may be re-indexed)."""
    a_to_b = np.linalg.inv(b.ijk_to_ras) @ a.ijk_to_ras
    assert np.allclose(a_to_b, np.round(a_to_b), atol=1e-3), "voxel grids are not the same points"
    k, j, i = np.indices(a.shape_kji).reshape(3, -1)
    ib, jb, kb, _ = np.round(a_to_b @ np.stack([i, j, k, np.ones_like(i)])).astype(int)
    assert np.array_equal(a.array[k, j, i], b.array[kb, jb, ib])


def _reference_result(volume, label_path) -> LabelResult:
    labels = _labels_on_grid_of(volume, label_path)
    segments = [
        Segment(prompt="perform liver segmentation", structure=lookup("liver"), mask=(labels == LIVER).astype(np.uint8)),
        Segment(prompt="spleen", structure=lookup("spleen"), mask=(labels == SPLEEN).astype(np.uint8)),
    ]
    return LabelResult(reference=volume, segments=segments, model_name="reference-label", model_version="0")


def test_volume_from_node_reads_what_io_reads(slicer_app, case_files):
    image_path, _ = case_files
    node = load_volume_node(slicer_app, image_path)

    from_node = mrml.volume_from_node(node, modality="CT")
    from_file = read_volume(image_path)

    _assert_same_image(from_node, from_file)
    if case_files[0].name.endswith(".nii.gz"):  # right-handed file: Slicer keeps the file's grid
        assert np.array_equal(from_node.array, from_file.array)
        np.testing.assert_allclose(from_node.ijk_to_ras, from_file.ijk_to_ras, atol=1e-4)
    assert from_node.modality == "CT"
    assert from_node.name == node.GetName()


def test_segments_are_named_coloured_coded_and_lie_on_the_input_voxels(slicer_app, case_files):
    image_path, label_path = case_files
    node = load_volume_node(slicer_app, image_path)
    result = _reference_result(mrml.volume_from_node(node), label_path)

    segmentation_node = mrml.result_to_segmentation_node(result, node)

    segmentation = segmentation_node.GetSegmentation()
    assert segmentation.GetNumberOfSegments() == 2
    for n, expected in enumerate(result.segments):
        _assert_segment_carries(segmentation.GetNthSegment(n), expected)
    masks = segment_masks(segmentation_node, node)
    for expected in result.segments:
        assert expected.mask.sum() > 1000  # the reference label really has this organ
        assert np.array_equal(masks[expected.name], expected.mask)
    labelmap = mrml.segmentation_node_to_labelmap_array(segmentation_node, node)
    assert np.array_equal(labelmap, result.segments[0].mask + 2 * result.segments[1].mask)


def test_seg_nrrd_saved_by_slicer_reads_back_on_the_input_grid(slicer_app, case_files, tmp_path):
    import slicer

    image_path, label_path = case_files
    node = load_volume_node(slicer_app, image_path)
    volume = mrml.volume_from_node(node)
    result = _reference_result(volume, label_path)
    segmentation_node = mrml.result_to_segmentation_node(result, node)

    storage = slicer.vtkMRMLSegmentationStorageNode()
    storage.SetFileName(str(tmp_path / "saved.seg.nrrd"))
    assert storage.WriteData(segmentation_node)

    read_back = read_seg_nrrd(tmp_path / "saved.seg.nrrd", reference=volume)
    assert [s.name for s in read_back.segments] == [s.name for s in result.segments]
    for got, expected in zip(read_back.segments, result.segments):
        assert np.array_equal(got.mask, expected.mask)


def test_transformed_volume_gives_world_geometry_and_segments_follow_the_transform(slicer_app, samples_dir):
    import slicer

    node = load_volume_node(slicer_app, samples_dir / f"{CASE}_image.nii.gz")
    local = mrml.volume_from_node(node)
    to_world = np.eye(4)
    to_world[:3, :3] = _rotation((0, 0, 1), 30.0)
    to_world[:3, 3] = (10.0, -5.0, 20.0)
    transform_node = slicer_app.scene.AddNewNodeByClass("vtkMRMLLinearTransformNode")
    transform_node.SetMatrixTransformToParent(slicer.util.vtkMatrixFromArray(to_world))
    node.SetAndObserveTransformNodeID(transform_node.GetID())

    world = mrml.volume_from_node(node)
    np.testing.assert_allclose(world.ijk_to_ras, to_world @ local.ijk_to_ras, atol=1e-9)

    result = _reference_result(world, samples_dir / f"{CASE}_label.nii.gz")
    segmentation_node = mrml.result_to_segmentation_node(result, node)
    assert segmentation_node.GetTransformNodeID() == transform_node.GetID()
    masks = segment_masks(segmentation_node, node)
    for expected in result.segments:
        assert np.array_equal(masks[expected.name], expected.mask)


def test_existing_segments_are_kept_and_new_names_get_a_suffix(slicer_app, samples_dir):
    node = load_volume_node(slicer_app, samples_dir / f"{CASE}_image.nii.gz")
    result = _reference_result(mrml.volume_from_node(node), samples_dir / f"{CASE}_label.nii.gz")
    segmentation_node = mrml.result_to_segmentation_node(result, node)
    before = segment_masks(segmentation_node, node)

    same_node = mrml.result_to_segmentation_node(result, node, segmentation_node)

    assert same_node is segmentation_node
    liver, spleen = (s.name for s in result.segments)
    after = segment_masks(segmentation_node, node)
    assert list(after) == [liver, spleen, f"{liver} (2)", f"{spleen} (2)"]
    for name in (liver, spleen):
        assert np.array_equal(after[name], before[name])
        assert np.array_equal(after[f"{name} (2)"], before[name])


def test_new_segmentation_is_placed_in_the_input_study(slicer_app, samples_dir):
    import slicer

    node = load_volume_node(slicer_app, samples_dir / f"{CASE}_image.nii.gz")
    hierarchy = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(slicer_app.scene)
    patient = hierarchy.CreateSubjectItem(hierarchy.GetSceneItemID(), "Patient 1")
    study = hierarchy.CreateStudyItem(patient, "CT study")
    hierarchy.CreateItem(study, node)
    result = _reference_result(mrml.volume_from_node(node), samples_dir / f"{CASE}_label.nii.gz")

    segmentation_node = mrml.result_to_segmentation_node(result, node)

    assert hierarchy.GetItemParent(hierarchy.GetItemByDataNode(segmentation_node)) == study
    assert segmentation_node.GetName().startswith(node.GetName())


def test_mask_from_another_grid_is_refused(slicer_app, samples_dir):
    node = load_volume_node(slicer_app, samples_dir / f"{CASE}_image.nii.gz")
    volume = mrml.volume_from_node(node)
    wrong = Segment(prompt="liver", structure=lookup("liver"), mask=np.zeros((3, 4, 5), np.uint8))
    result = LabelResult(reference=volume, segments=[wrong], model_name="m", model_version="0")
    segmentations_before = slicer_app.scene.GetNumberOfNodesByClass("vtkMRMLSegmentationNode")

    with pytest.raises(RefSAM3DError, match="shape"):
        mrml.result_to_segmentation_node(result, node)
    assert slicer_app.scene.GetNumberOfNodesByClass("vtkMRMLSegmentationNode") == segmentations_before


def test_volume_under_a_non_linear_transform_is_refused(slicer_app, samples_dir):
    import vtk

    node = load_volume_node(slicer_app, samples_dir / f"{CASE}_image.nii.gz")
    warp = vtk.vtkThinPlateSplineTransform()
    points = vtk.vtkPoints()
    for point in ((0, 0, 0), (100, 0, 0), (0, 100, 0), (0, 0, 100)):
        points.InsertNextPoint(point)
    warp.SetSourceLandmarks(points)
    warp.SetTargetLandmarks(points)
    transform_node = slicer_app.scene.AddNewNodeByClass("vtkMRMLTransformNode")
    transform_node.SetAndObserveTransformToParent(warp)
    node.SetAndObserveTransformNodeID(transform_node.GetID())

    with pytest.raises(RefSAM3DError, match="Harden|harden"):
        mrml.volume_from_node(node)


def test_vector_volume_is_refused(slicer_app):
    node = slicer_app.scene.AddNewNodeByClass("vtkMRMLVectorVolumeNode", "rgb")
    with pytest.raises(RefSAM3DError, match="scalar"):
        mrml.volume_from_node(node)


@pytest.mark.parametrize("recorded, expected", [("CT", "CT"), ("MR", "MR"), ("PT", None), (None, None)])
def test_modality_comes_from_the_dicom_series_item_in_the_subject_hierarchy(slicer_app, samples_dir, recorded, expected):
    """Slicer's DICOM plugins record Modality (0008,0060) on the volume's subject-hierarchy item."""
    import slicer

    node = load_volume_node(slicer_app, samples_dir / f"{CASE}_image.nii.gz")
    hierarchy = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(slicer_app.scene)
    study = hierarchy.CreateStudyItem(hierarchy.CreateSubjectItem(hierarchy.GetSceneItemID(), "Patient"), "Study")
    series = hierarchy.CreateItem(study, node)
    if recorded:
        hierarchy.SetItemAttribute(series, slicer.vtkMRMLSubjectHierarchyConstants.GetDICOMSeriesModalityAttributeName(), recorded)

    assert mrml.dicom_modality(node) == expected
    assert mrml.volume_from_node(node).modality == expected
    assert mrml.volume_from_node(node, modality="MR").modality == "MR"  # an explicit choice wins


def test_worker_file_imports_with_slicers_reader_onto_the_input_voxels(slicer_app, case_files, tmp_path):
    """The Slicer module's path: the worker's .seg.nrrd (world geometry), read by Slicer's own reader."""
    image_path, label_path = case_files
    node = load_volume_node(slicer_app, image_path)
    result = _reference_result(mrml.volume_from_node(node), label_path)
    write_seg_nrrd(result, tmp_path / "worker.seg.nrrd")
    nodes_before = slicer_app.scene.GetNumberOfNodes()

    segmentation_node, segment_ids = mrml.import_segmentation_file(tmp_path / "worker.seg.nrrd", node)

    # one segmentation node (and its display node) more, named after the input
    assert slicer_app.scene.GetNumberOfNodes() == nodes_before + 2
    assert segmentation_node.GetName().startswith(node.GetName())
    segmentation = segmentation_node.GetSegmentation()
    assert segment_ids == [segmentation.GetNthSegmentID(n) for n in range(2)] == ["liver", "spleen"]
    for segment_id, expected in zip(segment_ids, result.segments):
        _assert_segment_carries(segmentation.GetSegment(segment_id), expected)
    masks = segment_masks(segmentation_node, node)
    for expected in result.segments:
        assert np.array_equal(masks[expected.name], expected.mask)
        spacing_ml = np.prod(node.GetSpacing()) / 1000.0
        segment_id = segment_ids[result.segments.index(expected)]
        assert mrml.segment_volume_ml(segmentation_node, segment_id) == pytest.approx(expected.mask.sum() * spacing_ml)


def test_imported_segments_follow_the_transform_and_clashing_names_get_a_suffix(slicer_app, samples_dir, tmp_path):
    import slicer

    node = load_volume_node(slicer_app, samples_dir / f"{CASE}_image.nii.gz")
    to_world = np.eye(4)
    to_world[:3, :3] = _rotation((1, 0, 1), 20.0)
    to_world[:3, 3] = (-7.0, 12.0, 3.0)
    transform_node = slicer_app.scene.AddNewNodeByClass("vtkMRMLLinearTransformNode")
    transform_node.SetMatrixTransformToParent(slicer.util.vtkMatrixFromArray(to_world))
    node.SetAndObserveTransformNodeID(transform_node.GetID())
    result = _reference_result(mrml.volume_from_node(node), samples_dir / f"{CASE}_label.nii.gz")
    write_seg_nrrd(result, tmp_path / "worker.seg.nrrd")

    segmentation_node, first = mrml.import_segmentation_file(tmp_path / "worker.seg.nrrd", node)
    nodes_before = slicer_app.scene.GetNumberOfNodes()
    same_node, second = mrml.import_segmentation_file(tmp_path / "worker.seg.nrrd", node, segmentation_node)
    assert slicer_app.scene.GetNumberOfNodes() == nodes_before  # the reading node is gone

    assert same_node is segmentation_node and segmentation_node.GetTransformNodeID() == transform_node.GetID()
    assert len(set(first + second)) == 4
    liver, spleen = (s.name for s in result.segments)
    masks = segment_masks(segmentation_node, node)
    assert list(masks) == [liver, spleen, f"{liver} (2)", f"{spleen} (2)"]
    for expected in result.segments:
        assert np.array_equal(masks[expected.name], expected.mask)
        assert np.array_equal(masks[f"{expected.name} (2)"], expected.mask)


def test_an_unreadable_worker_file_adds_nothing(slicer_app, samples_dir, tmp_path):
    node = load_volume_node(slicer_app, samples_dir / f"{CASE}_image.nii.gz")
    (tmp_path / "broken.seg.nrrd").write_bytes(b"NRRD0004\nnot really\n")
    nodes_before = slicer_app.scene.GetNumberOfNodes()
    with pytest.raises(RefSAM3DError, match="could not read"):
        mrml.import_segmentation_file(tmp_path / "broken.seg.nrrd", node)
    assert slicer_app.scene.GetNumberOfNodes() == nodes_before
