"""The bridge between RefSAM3D's types and Slicer's data model (MRML).

This is the only code that touches Slicer nodes. It never imports Qt, and it imports ``slicer``
inside the functions, so the rest of the library (and this module's import) works without Slicer.
It works in the desktop application, in ``Slicer --no-main-window`` batch scripts and in
slicer-core (trame-slicer) headless.

Frames: a volume node stores its voxel-to-RAS matrix in its *local* frame; when the node sits under
a linear transform, the RefSAM3D :class:`~RefSAM3DLib.volume.Volume` gets the *world* matrix
(what the user sees, so the model sees the anatomy as displayed), and the segmentation is written on
the node's own voxel grid under the same transform, so it lies on the input's voxels in both frames.
"""

from __future__ import annotations

import numpy as np

from .errors import RefSAM3DError
from .result_files import tag_value
from .vocabulary import TERMINOLOGY_FILE
from .volume import MODALITIES, Volume
from .volume_reader import nrrd_header_fields

__all__ = [
    "volume_from_node",
    "dicom_modality",
    "import_segmentation_file",
    "replace_segment_from_file",
    "restore_segment",
    "segment_prompt",
    "control_points_ras",
    "roi_box_ras",
    "segment_volume_ml",
    "result_to_segmentation_node",
    "segmentation_node_to_labelmap_array",
    "load_terminology",
]


def _array_from_vtk_matrix(vtk_matrix) -> np.ndarray:
    return np.array([[vtk_matrix.GetElement(r, c) for c in range(4)] for r in range(4)])


def _vtk_matrix_from_array(matrix: np.ndarray):
    import vtk

    vtk_matrix = vtk.vtkMatrix4x4()
    for r in range(4):
        for c in range(4):
            vtk_matrix.SetElement(r, c, float(matrix[r, c]))
    return vtk_matrix


def _local_to_world(node) -> np.ndarray:
    """``(4, 4)`` matrix from ``node``'s local frame to world RAS; refuses non-linear transforms."""
    transform_node = node.GetParentTransformNode()
    if transform_node is None:
        return np.eye(4)
    if not transform_node.IsTransformToWorldLinear():
        raise RefSAM3DError(
            f"{node.GetName()}: it is under a non-linear transform ({transform_node.GetName()}); "
            "harden the transform (Data module, right-click > Harden transform) and try again."
        )
    import vtk

    matrix = vtk.vtkMatrix4x4()
    transform_node.GetMatrixTransformToWorld(matrix)
    return _array_from_vtk_matrix(matrix)


def _ijk_to_local_ras(volume_node) -> np.ndarray:
    import vtk

    matrix = vtk.vtkMatrix4x4()
    volume_node.GetIJKToRASMatrix(matrix)
    return _array_from_vtk_matrix(matrix)


def volume_from_node(volume_node, modality: str | None = None) -> Volume:
    """Copy a scalar volume node into a :class:`Volume` (world RAS geometry).

    Args:
        volume_node: a ``vtkMRMLScalarVolumeNode`` (or label map volume node) with image data.
        modality: ``"CT"`` or ``"MR"``; ``None`` takes the DICOM modality Slicer recorded for the
            volume (:func:`dicom_modality`) and otherwise leaves it unknown.

    Returns:
        ``Volume`` whose ``array`` is a copy of the voxels, shape ``(K, J, I)``, and whose
        ``ijk_to_ras`` includes the node's parent transforms (linear only).
    """
    import slicer

    if volume_node is None:
        raise RefSAM3DError("No input volume: select a volume node.")
    # Vector, tensor and diffusion volumes derive from the scalar class: compare the exact class.
    if volume_node.GetClassName() not in ("vtkMRMLScalarVolumeNode", "vtkMRMLLabelMapVolumeNode"):
        raise RefSAM3DError(
            f"{volume_node.GetName()}: a {volume_node.GetClassName()} is not a scalar volume; "
            "convert it to a scalar volume (Vector to Scalar Volume module) first."
        )
    image_data = volume_node.GetImageData()
    if image_data is None or image_data.GetNumberOfPoints() == 0:
        raise RefSAM3DError(f"{volume_node.GetName()}: the volume has no voxels; load image data first.")
    if image_data.GetNumberOfScalarComponents() != 1:
        raise RefSAM3DError(
            f"{volume_node.GetName()}: has {image_data.GetNumberOfScalarComponents()} components per "
            "voxel; use a single-channel (grey-scale) volume."
        )
    if modality is None:
        modality = dicom_modality(volume_node)
    # arrayFromVolume returns VTK-owned memory: copy it so the Volume outlives the node.
    array_kji = np.array(slicer.util.arrayFromVolume(volume_node), copy=True)
    ijk_to_ras = _local_to_world(volume_node) @ _ijk_to_local_ras(volume_node)
    return Volume(array=array_kji, ijk_to_ras=ijk_to_ras, modality=modality, name=volume_node.GetName())


def dicom_modality(volume_node) -> str | None:
    """``"CT"`` or ``"MR"`` as Slicer recorded it for a volume loaded from DICOM, else ``None``.

    Slicer's DICOM plugins store the series' Modality (0008,0060) on the volume's subject-hierarchy
    item (attribute ``DICOM.Modality``); a ``DICOM.Modality`` attribute on the node itself (set by
    scripts) is read too. Other modalities (PT, US, ...) give ``None``.
    """
    import slicer

    name = slicer.vtkMRMLSubjectHierarchyConstants.GetDICOMSeriesModalityAttributeName()
    values = []
    scene = volume_node.GetScene()
    hierarchy = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(scene) if scene is not None else None
    item = hierarchy.GetItemByDataNode(volume_node) if hierarchy is not None else 0
    if item:
        values.append(hierarchy.GetItemAttribute(item, name))
    values.append(volume_node.GetAttribute(name))
    for value in values:
        if value and value.strip().upper() in MODALITIES:
            return value.strip().upper()
    return None


def _oriented_image_from_mask(mask_kji: np.ndarray, ijk_to_segmentation: np.ndarray):
    """A ``vtkOrientedImageData`` holding ``mask_kji`` (uint8 0/1) with its voxel-to-frame matrix."""
    import slicer
    import vtk
    from vtk.util import numpy_support

    k, j, i = mask_kji.shape
    image = slicer.vtkOrientedImageData()
    image.SetDimensions(i, j, k)
    # vtk_to_numpy/numpy_to_vtk keep x (i) fastest, matching the C-ordered (K, J, I) array.
    scalars = numpy_support.numpy_to_vtk(
        np.ascontiguousarray(mask_kji, dtype=np.uint8).ravel(), deep=True, array_type=vtk.VTK_UNSIGNED_CHAR
    )
    image.GetPointData().SetScalars(scalars)
    image.SetImageToWorldMatrix(_vtk_matrix_from_array(ijk_to_segmentation))
    return image


def _unique_segment_name(segmentation, name: str) -> str:
    existing = {segmentation.GetNthSegment(n).GetName() for n in range(segmentation.GetNumberOfSegments())}
    if name not in existing:
        return name
    suffix = 2
    while f"{name} ({suffix})" in existing:
        suffix += 1
    return f"{name} ({suffix})"


def _place_next_to(node, reference_node) -> None:
    """Put ``node`` under ``reference_node``'s parent (its study) in the subject hierarchy."""
    import slicer

    hierarchy = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(node.GetScene())
    reference_item = hierarchy.GetItemByDataNode(reference_node) if hierarchy is not None else 0
    if not reference_item:
        return
    parent_item = hierarchy.GetItemParent(reference_item)
    item = hierarchy.GetItemByDataNode(node)
    if item:
        hierarchy.SetItemParent(item, parent_item)
    else:
        # The desktop application creates items for new nodes; bare slicer-core does not.
        hierarchy.CreateItem(parent_item, node)


def _new_segmentation_node(reference_volume_node, scene):
    """An empty segmentation node named after the input, under the input's parent transform."""
    segmentation_node = scene.AddNewNodeByClass(
        "vtkMRMLSegmentationNode", scene.GenerateUniqueName(f"{reference_volume_node.GetName()} segmentation")
    )
    segmentation_node.CreateDefaultDisplayNodes()
    transform_node = reference_volume_node.GetParentTransformNode()
    segmentation_node.SetAndObserveTransformNodeID(transform_node.GetID() if transform_node else None)
    return segmentation_node


def result_to_segmentation_node(result, reference_volume_node, segmentation_node=None, scene=None):
    """Add one segment per :class:`~RefSAM3DLib.result.Segment` to a segmentation node.

    Args:
        result: a :class:`~RefSAM3DLib.result.LabelResult` whose masks, ``(K, J, I)`` uint8, lie on
            ``reference_volume_node``'s voxel grid (the grid ``volume_from_node`` read).
        reference_volume_node: the input volume node; it sets the segmentation's reference geometry,
            its parent transform and its place in the subject hierarchy.
        segmentation_node: an existing ``vtkMRMLSegmentationNode`` to add to, or ``None`` to create
            one named after the input. Existing segments are never replaced: a clashing name gets a
            suffix (``"Liver (2)"``).
        scene: the MRML scene for a new node (default: the reference node's scene).

    Returns:
        The segmentation node. Segments are named, coloured and coded from the vocabulary
        (``structure.terminology_entry()``); they may overlap.
    """
    import slicer

    expected_shape = tuple(int(n) for n in reversed(reference_volume_node.GetImageData().GetDimensions()))
    for segment in result.segments:
        if tuple(segment.mask.shape) != expected_shape:
            raise RefSAM3DError(
                f"Segment {segment.name!r} has shape {tuple(segment.mask.shape)} but the reference volume "
                f"{reference_volume_node.GetName()} has {expected_shape}; segment the same volume you pass as reference."
            )

    scene = scene or reference_volume_node.GetScene()
    created = segmentation_node is None
    if created:
        segmentation_node = _new_segmentation_node(reference_volume_node, scene)
    if segmentation_node.GetSegmentation().GetNumberOfSegments() == 0:
        segmentation_node.SetReferenceImageGeometryParameterFromVolumeNode(reference_volume_node)

    # Masks are on the reference node's local voxel grid; express that grid in the segmentation's
    # frame (identity when both share a parent transform, as for a new node).
    reference_to_segmentation = np.linalg.inv(_local_to_world(segmentation_node)) @ _local_to_world(reference_volume_node)
    ijk_to_segmentation = reference_to_segmentation @ _ijk_to_local_ras(reference_volume_node)

    segmentation = segmentation_node.GetSegmentation()
    logic = slicer.vtkSlicerSegmentationsModuleLogic
    was_modifying = segmentation_node.StartModify()
    try:
        for segment in result.segments:
            name = _unique_segment_name(segmentation, segment.name)
            # The same IDs and tags as result_files.write_seg_nrrd, so files saved from Slicer read back alike.
            preferred_id = segment.structure.key if segment.structure is not None else name
            segment_id = segmentation.AddEmptySegment(segmentation.GenerateUniqueSegmentID(preferred_id), name)
            vtk_segment = segmentation.GetSegment(segment_id)
            vtk_segment.SetColor(*(channel / 255.0 for channel in segment.color_rgb))
            vtk_segment.SetNameAutoGenerated(False)
            vtk_segment.SetColorAutoGenerated(False)
            if segment.structure is not None:
                vtk_segment.SetTag(slicer.vtkSegment.GetTerminologyEntryTagName(), segment.structure.terminology_entry())
                vtk_segment.SetTag("RefSAM3D.StructureKey", segment.structure.key)
            vtk_segment.SetTag("RefSAM3D.Prompt", tag_value(segment.prompt))
            image = _oriented_image_from_mask(segment.mask, ijk_to_segmentation)
            if not logic.SetBinaryLabelmapToSegment(image, segmentation_node, segment_id, logic.MODE_REPLACE):
                raise RefSAM3DError(f"Slicer could not store segment {name!r}; check the reference volume geometry.")
    finally:
        segmentation_node.EndModify(was_modifying)

    if created:
        _place_next_to(segmentation_node, reference_volume_node)
    return segmentation_node


def _remove_node(node) -> None:
    """Remove a helper node the bridge added to the scene, with its display node."""
    scene = node.GetScene()
    display_node = node.GetDisplayNode()
    if display_node is not None:
        scene.RemoveNode(display_node)
    scene.RemoveNode(node)


def _read_segmentation_file(path, segmentation_node, frame_node) -> None:
    """Slicer's own .seg.nrrd reader (C++), into ``segmentation_node`` (in a scene), its segments
    then moved from the file's world RAS into ``frame_node``'s local frame (where they will live).

    teem aborts the whole process on some malformed headers, so a file that is not a segmentation
    NRRD is refused first (the worker writes a good one; this guards Slicer against anything else).
    """
    import slicer

    if "Segment0_ID" not in nrrd_header_fields(path):
        raise RefSAM3DError(f"Slicer could not read the segmentation file {path}: it holds no segments.")
    storage = slicer.vtkMRMLSegmentationStorageNode()
    storage.SetFileName(str(path))
    if not storage.ReadData(segmentation_node):
        raise RefSAM3DError(f"Slicer could not read the segmentation file {path}; see the log.")
    world_to_local = np.linalg.inv(_local_to_world(frame_node))
    if not np.allclose(world_to_local, np.eye(4)):
        segmentation_node.ApplyTransformMatrix(_vtk_matrix_from_array(world_to_local))


def import_segmentation_file(path, reference_volume_node, segmentation_node=None, scene=None):
    """Read a .seg.nrrd with Slicer's own reader and add its segments to a segmentation node.

    This is how the Slicer module takes the worker's result: Slicer's C++ reader
    (``vtkMRMLSegmentationStorageNode``) keeps the file's shared label-map layers and no mask
    passes through Python. A new node is read into directly; adding to an existing node copies
    the segments over. Names, colours and tags (terminology, ``RefSAM3D.Prompt``,
    ``RefSAM3D.StructureKey``) come from the file.

    Args:
        path: the .seg.nrrd; its geometry is world RAS (the frame :func:`volume_from_node` hands
            the worker).
        reference_volume_node: the segmented volume: a new node takes its geometry, its parent
            transform and its place in the subject hierarchy.
        segmentation_node: an existing node to add to, or ``None`` for a new one named after the
            input. Existing segments are never replaced: a clashing name gets a suffix ("Liver (2)").
        scene: the scene for a new node (default: the reference node's).

    Returns:
        ``(segmentation_node, segment_ids)``: the node and the IDs of the added segments, in the
        file's order. Nothing is added when reading fails.
    """
    scene = scene or reference_volume_node.GetScene()
    created = segmentation_node is None
    target_node = _new_segmentation_node(reference_volume_node, scene) if created else segmentation_node
    # A new node reads the file itself; an existing one gets the segments of a reading node.
    loaded = target_node if created else scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "__refsam3d_import__")
    target = target_node.GetSegmentation()
    added = []
    was_modifying = target_node.StartModify()
    try:
        _read_segmentation_file(path, loaded, frame_node=target_node)
        source = loaded.GetSegmentation()
        file_ids = [source.GetNthSegmentID(n) for n in range(source.GetNumberOfSegments())]
        if created:
            added = file_ids
        else:
            for segment_id in file_ids:
                segment = source.GetSegment(segment_id)
                segment.SetName(_unique_segment_name(target, segment.GetName()))
                before = {target.GetNthSegmentID(n) for n in range(target.GetNumberOfSegments())}
                if not target.CopySegmentFromSegmentation(source, segment_id):
                    raise RefSAM3DError(f"Slicer could not add segment {segment.GetName()!r} to {target_node.GetName()}.")
                added += [target.GetNthSegmentID(n) for n in range(target.GetNumberOfSegments())
                          if target.GetNthSegmentID(n) not in before]
        if created or len(added) == target.GetNumberOfSegments():
            target_node.SetReferenceImageGeometryParameterFromVolumeNode(reference_volume_node)
    except BaseException:
        if created:
            scene.RemoveNode(target_node)
        else:
            for segment_id in added:  # all or nothing
                target.RemoveSegment(segment_id)
        raise
    finally:
        target_node.EndModify(was_modifying)
        if not created:
            _remove_node(loaded)
    if created:
        _place_next_to(target_node, reference_volume_node)
    return target_node, added


def replace_segment_from_file(path, segmentation_node, segment_id):
    """Replace one segment's voxels with the single segment of a worker's .seg.nrrd (a refinement).

    The segment keeps its ID, name, colour, tags and place in the list; only its mask changes.

    Args:
        path: the .seg.nrrd (world RAS, as :func:`import_segmentation_file` reads it).
        segmentation_node: the node holding the segment.
        segment_id: the segment to replace.
    Returns:
        the segment's previous binary label map (``vtkOrientedImageData``), for
        :func:`restore_segment` (undo).
    """
    import slicer

    if segmentation_node.GetSegmentation().GetSegment(segment_id) is None:
        raise RefSAM3DError(f"{segmentation_node.GetName()} has no segment {segment_id!r} any more; select a segment.")
    scene = segmentation_node.GetScene()
    loaded = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "__refsam3d_import__")
    try:
        _read_segmentation_file(path, loaded, frame_node=segmentation_node)
        source = loaded.GetSegmentation()
        if source.GetNumberOfSegments() != 1:
            raise RefSAM3DError(f"A refinement gives one segment, but {path} holds {source.GetNumberOfSegments()}.")
        mask = slicer.vtkOrientedImageData()
        loaded.GetBinaryLabelmapRepresentation(source.GetNthSegmentID(0), mask)
        previous = slicer.vtkOrientedImageData()
        segmentation_node.GetBinaryLabelmapRepresentation(segment_id, previous)
        _set_segment_mask(segmentation_node, segment_id, mask)
    finally:
        _remove_node(loaded)
    return previous


def restore_segment(segmentation_node, segment_id, previous) -> bool:
    """Put back a mask :func:`replace_segment_from_file` returned; False if the segment is gone."""
    if segmentation_node.GetScene() is None or segmentation_node.GetSegmentation().GetSegment(segment_id) is None:
        return False
    _set_segment_mask(segmentation_node, segment_id, previous)
    return True


def _set_segment_mask(segmentation_node, segment_id, mask) -> None:
    import slicer

    logic = slicer.vtkSlicerSegmentationsModuleLogic
    if not logic.SetBinaryLabelmapToSegment(mask, segmentation_node, segment_id, logic.MODE_REPLACE):
        raise RefSAM3DError(f"Slicer could not replace segment {segment_id!r} of {segmentation_node.GetName()}.")


def segment_prompt(segmentation_node, segment_id) -> str:
    """The text that made a segment (its ``RefSAM3D.Prompt`` tag), else its name."""
    import vtk

    segment = segmentation_node.GetSegmentation().GetSegment(segment_id)
    if segment is None:
        raise RefSAM3DError(f"{segmentation_node.GetName()} has no segment {segment_id!r}; select a segment.")
    prompt = vtk.reference("")
    if segment.GetTag("RefSAM3D.Prompt", prompt) and str(prompt).strip():
        return str(prompt)
    return segment.GetName()


def control_points_ras(markups_node) -> list:
    """World RAS (mm) of a markups node's placed control points (none for ``None``)."""
    if markups_node is None:
        return []
    points = []
    for index in range(markups_node.GetNumberOfControlPoints()):
        if markups_node.GetNthControlPointPositionStatus(index) != markups_node.PositionDefined:
            continue
        position = [0.0, 0.0, 0.0]
        markups_node.GetNthControlPointPositionWorld(index, position)
        points.append(tuple(position))
    return points


def roi_box_ras(roi_node):
    """``(R1, A1, S1, R2, A2, S2)``: the world RAS box around an ROI (None without one)."""
    if roi_node is None or roi_node.GetNumberOfControlPoints() == 0:
        return None
    bounds = [0.0] * 6
    roi_node.GetRASBounds(bounds)
    if not bounds[0] <= bounds[1] or not bounds[2] <= bounds[3] or not bounds[4] <= bounds[5]:
        return None
    return (bounds[0], bounds[2], bounds[4], bounds[1], bounds[3], bounds[5])


def segment_volume_ml(segmentation_node, segment_id) -> float:
    """A segment's volume in mL, counted on its own binary label map (no Python copy of it)."""
    import slicer
    import vtk
    from vtk.util import numpy_support

    image = slicer.vtkOrientedImageData()
    segmentation_node.GetBinaryLabelmapRepresentation(segment_id, image)
    scalars = image.GetPointData().GetScalars()
    if scalars is None:
        return 0.0
    matrix = vtk.vtkMatrix4x4()
    image.GetImageToWorldMatrix(matrix)
    voxel_mm3 = abs(np.linalg.det(_array_from_vtk_matrix(matrix)[:3, :3]))
    return float(np.count_nonzero(numpy_support.vtk_to_numpy(scalars))) * voxel_mm3 / 1000.0


def load_terminology(terminologies_logic) -> str:
    """Load RefSAM3D's terminology context (the structures whose codes Slicer's lists lack) into
    Slicer's Terminologies module logic; returns the context's name. Loading it twice is harmless.

    In Slicer: ``load_terminology(slicer.modules.terminologies.logic())``.
    """
    name = terminologies_logic.LoadTerminologyFromFile(str(TERMINOLOGY_FILE))
    if not name:
        raise RefSAM3DError(f"Slicer could not load the terminology file {TERMINOLOGY_FILE}; reinstall RefSAM3D.")
    return name


def segmentation_node_to_labelmap_array(segmentation_node, reference_volume_node, segment_ids=None) -> np.ndarray:
    """Export segments onto ``reference_volume_node``'s voxel grid (for tests, export and metrics).

    Args:
        segmentation_node: the ``vtkMRMLSegmentationNode`` to read.
        reference_volume_node: the volume whose grid (and parent transform) the output follows.
        segment_ids: which segments, in label order; ``None`` means all, in the node's order.

    Returns:
        ``(K, J, I)`` uint8 (uint16 above 255 segments) label map, value ``n + 1`` for
        ``segment_ids[n]``; where segments overlap, the later one wins (Slicer's export rule).
        With a single id this is that segment's binary mask.
    """
    import slicer

    segmentation = segmentation_node.GetSegmentation()
    if segment_ids is None:
        segment_ids = [segmentation.GetNthSegmentID(n) for n in range(segmentation.GetNumberOfSegments())]
    scene = segmentation_node.GetScene()
    labelmap_node = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "__refsam3d_export__")
    try:
        ok = slicer.vtkSlicerSegmentationsModuleLogic.ExportSegmentsToLabelmapNode(
            segmentation_node, list(segment_ids), labelmap_node, reference_volume_node
        )
        if not ok:
            raise RefSAM3DError(f"Slicer could not export {segmentation_node.GetName()} onto {reference_volume_node.GetName()}.")
        labels = np.array(slicer.util.arrayFromVolume(labelmap_node), copy=True)
    finally:
        _remove_node(labelmap_node)
    return labels.astype(np.uint8 if len(segment_ids) <= 255 else np.uint16)
