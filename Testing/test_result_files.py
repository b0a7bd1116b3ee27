"""Writing outputs onto the input's voxels, atomically, and reading a .seg.nrrd back."""

import json
import os
import time
from pathlib import Path

import nrrd
import numpy as np
import pytest
import SimpleITK as sitk
import slicerio
from scipy.spatial.transform import Rotation

from RefSAM3DLib.atomic import atomic_write
from RefSAM3DLib.errors import RefSAM3DError
from RefSAM3DLib.geometry import LPS_TO_RAS, ijk_to_ras_from_sitk, sitk_from_array
from RefSAM3DLib.result import LabelResult, Segment
from RefSAM3DLib.result_files import (read_seg_nrrd, sidecar_path, write_labelmap, write_result,
                                      write_seg_nrrd)
from RefSAM3DLib.vocabulary import lookup
from RefSAM3DLib.volume import Volume
from RefSAM3DLib.volume_reader import read_volume


@pytest.fixture(scope="module")
def oblique_ct(samples_dir):
    """The bundled 3-slice CT, cropped, turned oblique with one mirrored axis (anisotropic already)."""
    image = sitk.ReadImage(str(samples_dir / "ct3slice_image.nii.gz"))[150:330, 120:280, :]
    direction = Rotation.from_euler("xyz", [10, -20, 30], degrees=True).as_matrix()
    direction[:, 1] *= -1
    image.SetDirection(direction.ravel().tolist())
    return image


def write_input(image, input_format, folder, make_dicom_series):
    if input_format == "dicom":
        return make_dicom_series(image, folder / "series")
    path = folder / f"input.{input_format}"
    sitk.WriteImage(image, str(path), True)
    return path


def two_overlapping_segments(volume):
    """Liver: a disc in every slice; a prompt outside the vocabulary: a box overlapping the disc."""
    k, j, i = np.indices(volume.shape_kji)
    disc = ((j - 60) ** 2 + (i - 70) ** 2 <= 30 ** 2).astype(np.uint8)
    box = ((j >= 70) & (j < 120) & (i >= 80) & (i < 150) & (k >= 1)).astype(np.uint8)
    return LabelResult(
        reference=volume,
        segments=[Segment("perform liver segmentation", lookup("liver"), disc),
                  Segment("the blob | thing", None, box)],
        model_name="test-model", model_version="0.0", elapsed_s=1.25,
        warnings=["outside the trained vocabulary: 'the blob | thing'"],
    )


@pytest.mark.parametrize("output_name", ["out.nii.gz", "out.nrrd", "out.seg.nrrd"])
@pytest.mark.parametrize("input_format", ["nii.gz", "nrrd", "mha", "dicom"])
def test_segmentation_written_back_lies_on_input_voxels(input_format, output_name, oblique_ct,
                                                        tmp_path, make_dicom_series):
    volume = read_volume(write_input(oblique_ct, input_format, tmp_path, make_dicom_series))
    source_ijk_to_ras, source_array = ijk_to_ras_from_sitk(oblique_ct), sitk.GetArrayFromImage(oblique_ct)
    if input_format == "dicom":
        # DICOM grids are right-handed (slice normal = row x column): the reader stacks this
        # mirrored grid's slices in reverse order. Same voxels, same places.
        reverse_k = np.eye(4)
        reverse_k[2, 2], reverse_k[2, 3] = -1.0, volume.shape_kji[0] - 1
        source_ijk_to_ras, source_array = source_ijk_to_ras @ reverse_k, source_array[::-1]
    np.testing.assert_allclose(volume.ijk_to_ras, source_ijk_to_ras, atol=1e-6)
    np.testing.assert_array_equal(volume.array, source_array)
    result = two_overlapping_segments(volume)
    disc, box = (segment.mask for segment in result.segments)
    output = tmp_path / output_name

    write_result(result, output)

    if output_name.endswith(".seg.nrrd"):
        segmentation = slicerio.read_segmentation(str(output))
        np.testing.assert_allclose(segmentation["ijkToLPS"], LPS_TO_RAS @ volume.ijk_to_ras,
                                   atol=1e-6)
        assert segmentation["voxels"].shape[-3:] == tuple(reversed(volume.shape_kji))
        back = read_seg_nrrd(output, volume)
        np.testing.assert_array_equal(back.segments[0].mask, disc)
        np.testing.assert_array_equal(back.segments[1].mask, box)
    else:
        labels = read_volume(output)
        assert labels.shape_kji == volume.shape_kji
        np.testing.assert_allclose(labels.ijk_to_ras, volume.ijk_to_ras, atol=1e-6)
        np.testing.assert_array_equal(labels.array, np.where(disc > 0, 1, np.where(box > 0, 2, 0)))


# ---- writers ---------------------------------------------------------------------------------


@pytest.fixture()
def small_result(samples_dir):
    image = sitk.ReadImage(str(samples_dir / "ct3slice_image.nii.gz"))[200:360, 180:330, :]
    volume = Volume(sitk.GetArrayFromImage(image), ijk_to_ras_from_sitk(image), "CT", "crop",
                    metadata={"path": "/data/crop.nii.gz"})
    return two_overlapping_segments(volume)


def test_labelmap_sidecar_names_every_value_with_codes_volume_and_provenance(small_result, tmp_path):
    labelmap, sidecar = write_labelmap(small_result, tmp_path / "case.nii.gz")
    assert sidecar == tmp_path / "case.json" == sidecar_path(labelmap)
    record = json.loads(sidecar.read_text())
    liver, blob = record["labels"]["1"], record["labels"]["2"]
    voxel_ml = small_result.reference.voxel_volume_ml
    assert liver["key"] == "liver" and liver["name"] == "Liver"
    assert liver["color_rgb"] == list(lookup("liver").color_rgb)
    assert liver["snomed"]["type"] == {"scheme": "SCT", "value": "10200004", "meaning": "Liver"}
    assert liver["terminology_entry"] == lookup("liver").terminology_entry()
    assert liver["prompt"] == "perform liver segmentation"
    assert liver["volume_ml"] == pytest.approx(small_result.segments[0].mask.sum() * voxel_ml,
                                               abs=1e-3)
    assert blob["key"] is None and blob["name"] == blob["prompt"] == "the blob | thing"
    assert blob["volume_ml"] == pytest.approx(small_result.segments[1].mask.sum() * voxel_ml,
                                              abs=1e-3)
    assert record["model"] == {"name": "test-model", "version": "0.0"}
    assert record["input"]["file"] == "/data/crop.nii.gz" and record["elapsed_s"] == 1.25
    assert record["warnings"][0] == small_result.warnings[0]
    assert "overlap earlier prompts" in record["warnings"][1]
    assert "not a medical device" in record["note"]


def test_seg_nrrd_keeps_names_colours_terminology_and_overlaps(small_result, tmp_path):
    path = write_seg_nrrd(small_result, tmp_path / "case.seg.nrrd")
    disc, box = (segment.mask for segment in small_result.segments)
    assert np.any(disc & box)

    segmentation = slicerio.read_segmentation(str(path))
    assert slicerio.segment_names(segmentation) == ["Liver", "the blob | thing"]
    liver, blob = segmentation["segments"]
    np.testing.assert_allclose(liver["color"], np.array(lookup("liver").color_rgb) / 255, atol=1e-6)
    assert liver["terminology"]["type"] == ["SCT", "10200004", "Liver"]
    assert blob["tags"]["RefSAM3D.Prompt"] == "the blob / thing"
    np.testing.assert_array_equal(slicerio.segment_mask(segmentation, "Liver").T, disc > 0)
    np.testing.assert_array_equal(slicerio.segment_mask(segmentation, "the blob | thing").T, box > 0)

    header = nrrd.read_header(str(path))
    assert header["kinds"] == ["list", "domain", "domain", "domain"]  # overlap -> two layers
    for field in ("ID", "Name", "Color", "LabelValue", "Layer", "Extent", "Tags"):
        assert f"Segment0_{field}" in header and f"Segment1_{field}" in header
    assert header["Segment0_ID"] == "liver"
    assert "TerminologyEntry:" + lookup("liver").terminology_entry() in header["Segment0_Tags"]

    back = read_seg_nrrd(path, small_result.reference)
    assert [s.structure for s in back.segments] == [lookup("liver"), None]
    assert [s.prompt for s in back.segments] == ["perform liver segmentation", "the blob / thing"]
    assert (back.model_name, back.model_version) == ("test-model", "0.0")


def test_read_seg_nrrd_resamples_a_cropped_file_onto_the_reference(small_result, tmp_path):
    reference = small_result.reference
    disc = small_result.segments[0].mask
    # Slicer may save only the segments' extent: a sub-grid shifted by an index offset.
    crop = disc[:, 20:100, 30:110]
    offset = np.eye(4)
    offset[:3, 3] = (30, 20, 0)
    segmentation = slicerio.create_segmentation(crop.shape[::-1],
                                                LPS_TO_RAS @ reference.ijk_to_ras @ offset)
    slicerio.add_segment(segmentation, crop.T > 0, {"id": "s", "name": "liver part"})
    slicerio.write_segmentation(str(tmp_path / "crop.seg.nrrd"), segmentation)

    back = read_seg_nrrd(tmp_path / "crop.seg.nrrd", reference)

    expected = np.zeros_like(disc)
    expected[:, 20:100, 30:110] = crop
    np.testing.assert_array_equal(back.segments[0].mask, expected)
    assert back.segments[0].prompt == "liver part" and back.segments[0].structure is None


def test_existing_output_is_kept_unless_overwrite(small_result, tmp_path):
    target = tmp_path / "case.seg.nrrd"
    target.write_bytes(b"old")
    with pytest.raises(RefSAM3DError, match="already exists"):
        write_result(small_result, target)
    assert target.read_bytes() == b"old"
    write_result(small_result, target, overwrite=True)
    assert slicerio.segment_names(slicerio.read_segmentation(str(target)))[0] == "Liver"

    (tmp_path / "labels.json").write_text("{}")  # the sidecar of labels.nii.gz
    with pytest.raises(RefSAM3DError, match="labels.json: already exists"):
        write_labelmap(small_result, tmp_path / "labels.nii.gz")
    assert not (tmp_path / "labels.nii.gz").exists()


def test_input_is_never_overwritten(oblique_ct, tmp_path):
    path = tmp_path / "input.nrrd"
    sitk.WriteImage(oblique_ct, str(path))
    before = path.read_bytes()
    result = two_overlapping_segments(read_volume(path))
    with pytest.raises(RefSAM3DError, match="input file"):
        write_result(result, tmp_path / "." / "input.nrrd", overwrite=True)
    assert path.read_bytes() == before


def test_failed_write_leaves_existing_file_intact_and_no_partial_file(small_result, tmp_path):
    target = tmp_path / "case.nii.gz"
    target.write_bytes(b"previous result")
    with pytest.raises(RuntimeError, match="disk full"):
        with atomic_write(target) as temporary:
            image = sitk_from_array(small_result.segments[0].mask, small_result.reference.ijk_to_ras)
            sitk.WriteImage(image, str(temporary))
            assert temporary.parent == tmp_path and temporary.name.endswith(".nii.gz")
            raise RuntimeError("disk full")
    assert target.read_bytes() == b"previous result"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["case.nii.gz"]


def test_unwritable_output_folder_is_a_clear_error(small_result, tmp_path):
    (tmp_path / "a_file").write_text("")
    with pytest.raises(RefSAM3DError, match="Cannot write"):
        write_result(small_result, tmp_path / "a_file" / "out.seg.nrrd")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file"]


def test_unsupported_output_type_and_mismatched_masks_are_refused(small_result, tmp_path):
    with pytest.raises(RefSAM3DError, match="unsupported output type"):
        write_result(small_result, tmp_path / "out.png")
    small_result.segments[1].mask = small_result.segments[1].mask[:, :-1]
    with pytest.raises(RefSAM3DError, match="mask shape"):
        write_result(small_result, tmp_path / "out.nii.gz")
    assert list(tmp_path.iterdir()) == []


def test_seg_nrrd_is_read_by_slicer_segmentation_storage_node(small_result, tmp_path):
    """Slicer's own reader (slicer-core) gets the names, colours, terminology, layers and voxels."""
    import slicer
    import vtk
    from vtk.util import numpy_support

    path = write_seg_nrrd(small_result, tmp_path / "case.seg.nrrd")
    scene = slicer.vtkMRMLScene()
    node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode")
    storage = slicer.vtkMRMLSegmentationStorageNode()
    storage.SetFileName(str(path))
    assert storage.ReadData(node)

    segmentation = node.GetSegmentation()
    assert segmentation.GetNumberOfSegments() == 2 and segmentation.GetNumberOfLayers() == 2
    for n, expected in enumerate(small_result.segments):
        segment = segmentation.GetNthSegment(n)
        assert segment.GetName() == expected.name
        np.testing.assert_allclose(segment.GetColor(), np.array(expected.color_rgb) / 255, atol=1e-6)
        if expected.structure is not None:  # (Slicer gives the others its default, "Tissue")
            terminology = vtk.reference("")
            assert segment.GetTag("TerminologyEntry", terminology)
            assert str(terminology) == expected.structure.terminology_entry()
        labelmap = segment.GetRepresentation("Binary labelmap")
        image_to_world = vtk.vtkMatrix4x4()
        labelmap.GetImageToWorldMatrix(image_to_world)
        matrix = np.array([[image_to_world.GetElement(r, c) for c in range(4)] for r in range(4)])
        np.testing.assert_allclose(matrix, small_result.reference.ijk_to_ras, atol=1e-6)
        assert labelmap.GetExtent()[::2] == (0, 0, 0)
        voxels = numpy_support.vtk_to_numpy(labelmap.GetPointData().GetScalars())
        mask = voxels.reshape(small_result.reference.shape_kji) == segment.GetLabelValue()
        np.testing.assert_array_equal(mask, expected.mask > 0)


# ---- issue 13: the label map and its JSON as a pair; no leftovers of killed writers ------------


def test_labelmap_pair_is_written_image_first_and_json_last(small_result, tmp_path, monkeypatch):
    """A writer killed between the two renames must not leave a new JSON beside the old image."""
    image, sidecar = tmp_path / "case.nii.gz", tmp_path / "case.json"
    image.write_bytes(b"old image")
    sidecar.write_text('{"old": true}')
    real_replace, renamed = os.replace, []

    def killed_after_first_rename(source, destination):
        if renamed:
            raise KeyboardInterrupt  # the process dies here
        renamed.append(Path(destination).name)
        real_replace(source, destination)

    monkeypatch.setattr("RefSAM3DLib.atomic.os.replace", killed_after_first_rename)
    with pytest.raises(KeyboardInterrupt):
        write_labelmap(small_result, image, overwrite=True)
    assert renamed == ["case.nii.gz"]
    assert not sidecar.exists()  # the old JSON no longer claims to describe the image
    assert sitk.ReadImage(str(image)).GetSize() == small_result.reference.shape_kji[::-1]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["case.nii.gz"]  # no partial left either

    monkeypatch.setattr("RefSAM3DLib.atomic.os.replace", real_replace)
    write_labelmap(small_result, image, overwrite=True)
    assert json.loads(sidecar.read_text())["labelmap"] == "case.nii.gz"


def test_stale_partials_of_a_killed_writer_are_removed(small_result, tmp_path):
    hour_ago = time.time() - 3600
    stale = [tmp_path / ".case.0123abcd.partial.nii.gz", tmp_path / ".case.4567cdef.partial.json"]
    kept = [tmp_path / ".case.89abcdef.partial.nii.gz",  # fresh: a writer still at work
            tmp_path / ".other.0123abcd.partial.nii.gz",  # another output's
            tmp_path / ".case.notours.partial.nii.gz"]  # not a name atomic_write makes
    for path in stale + kept:
        path.write_bytes(b"partial")
    for path in stale + kept[1:]:
        os.utime(path, (hour_ago, hour_ago))
    write_labelmap(small_result, tmp_path / "case.nii.gz")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["case.nii.gz", "case.json"] + [p.name for p in kept])


# ---- issue 13: segment names in any language survive into .seg.nrrd (Slicer stores UTF-8) -----


@pytest.mark.parametrize("prompt, name", [
    ("pancréas", "pancréas"),
    ("肝臓", "肝臓"),
    ("le\u200bfoie", "le\u200bfoie"),  # a zero-width space pasted with the text
    ("Niere |\nlinks\x07", "Niere | links"),  # a newline would end the header line; a bell is no text
])
def test_non_ascii_segment_names_survive_into_seg_nrrd(prompt, name, small_result, tmp_path):
    import slicer

    small_result.segments[1] = Segment(prompt, None, small_result.segments[1].mask)
    small_result.model_name, small_result.model_version = "modèle\nx", "β 2"
    path = write_seg_nrrd(small_result, tmp_path / "case.seg.nrrd")

    back = read_seg_nrrd(path, small_result.reference)
    assert [s.name for s in back.segments] == ["Liver", name.replace("|", "/")]  # named by the prompt tag
    assert (back.model_name, back.model_version) == ("modèle x", "β 2")
    np.testing.assert_array_equal(back.segments[1].mask, small_result.segments[1].mask)

    scene = slicer.vtkMRMLScene()  # Slicer's own reader shows the name as typed
    node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode")
    storage = slicer.vtkMRMLSegmentationStorageNode()
    storage.SetFileName(str(path))
    assert storage.ReadData(node)
    assert node.GetSegmentation().GetNthSegment(1).GetName() == name
