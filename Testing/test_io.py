"""Reading every supported input, refusing bad ones, and writing outputs onto the input's voxels."""

import gzip
import json
import os
import struct
import subprocess
import sys
import time
from pathlib import Path

import nrrd
import numpy as np
import pytest
import SimpleITK as sitk
import slicerio
from scipy.spatial.transform import Rotation

from RefSAM3DLib.errors import RefSAM3DError
from RefSAM3DLib.geometry import LPS_TO_RAS, ijk_to_ras_from_sitk, sitk_from_array
from RefSAM3DLib.io import (atomic_write, read_seg_nrrd, read_volume, sidecar_path,
                            write_labelmap, write_result, write_seg_nrrd)
from RefSAM3DLib.result import LabelResult, Segment
from RefSAM3DLib.vocabulary import lookup
from RefSAM3DLib.volume import Volume

SERIES_A = "1.2.826.0.1.3680043.2.1125.7.1"
SERIES_B = "1.2.826.0.1.3680043.2.1125.7.2"


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


def test_reading_matches_simpleitk_with_ras_geometry_and_provenance(samples_dir):
    path = samples_dir / "msd_spleen_2_crop_image.nii.gz"
    image = sitk.ReadImage(str(path))
    volume = read_volume(path)
    np.testing.assert_array_equal(volume.array, sitk.GetArrayFromImage(image))
    assert volume.array.shape == tuple(reversed(image.GetSize()))
    np.testing.assert_allclose(volume.ijk_to_ras, ijk_to_ras_from_sitk(image))
    # This file's direction is diag(-1, -1, 1) in LPS: its i axis points to RAS +x.
    assert volume.ijk_to_ras[0, 0] > 0 and volume.ijk_to_ras[1, 1] > 0
    assert volume.name == path.name
    assert volume.metadata["path"] == str(path.resolve()) and volume.metadata["format"] == "NIfTI"


def test_modality_explicit_wins_then_dicom_tag_else_unknown(samples_dir, tmp_path, make_dicom_series):
    ct, mr = samples_dir / "ts_example_ct_image.nii.gz", samples_dir / "ts_example_mr_sm_image.nii.gz"
    assert read_volume(ct).modality is None and read_volume(mr).modality is None  # the engine decides
    assert read_volume(ct, modality="MR").modality == "MR"
    image = sitk.ReadImage(str(samples_dir / "ct3slice_image.nii.gz"))[:64, :64, :]
    folder = make_dicom_series(image, tmp_path / "mr", modality="MR")
    assert read_volume(folder).modality == "MR"


def test_4d_image_frame_selects_that_frame(tmp_path):
    frames = [sitk.Image(6, 5, 4, sitk.sitkInt16) + value for value in (10, 20, 30)]
    path = tmp_path / "dynamic.nii.gz"
    sitk.WriteImage(sitk.JoinSeries(frames), str(path))
    volume = read_volume(path, frame=1)
    assert volume.shape_kji == (4, 5, 6) and np.all(volume.array == 20)


def test_dicom_folder_with_two_series_reads_the_one_asked_for(samples_dir, tmp_path,
                                                              make_dicom_series):
    image = sitk.ReadImage(str(samples_dir / "ct3slice_image.nii.gz"))[:64, :64, :]
    make_dicom_series(image, tmp_path / "mixed", SERIES_A)
    make_dicom_series(image + 7, tmp_path / "mixed_b", SERIES_B)
    for dicom_file in (tmp_path / "mixed_b").iterdir():
        dicom_file.rename(tmp_path / "mixed" / f"b_{dicom_file.name}")
    volume = read_volume(tmp_path / "mixed", series_uid=SERIES_B)
    np.testing.assert_array_equal(volume.array, sitk.GetArrayFromImage(image) + 7)
    assert volume.metadata["series_uid"] == SERIES_B


# ---- bad input: one clear RefSAM3DError per class -------------------------------------------


def _mha(path, spacing="1 1 1", element_type="MET_SHORT", data=None):
    data = np.zeros((4, 5, 6), np.int16).tobytes() if data is None else data
    header = (f"ObjectType = Image\nNDims = 3\nBinaryData = True\nBinaryDataByteOrderMSB = False\n"
              f"ElementSpacing = {spacing}\nDimSize = 6 5 4\nElementType = {element_type}\n"
              "ElementDataFile = LOCAL\n")
    path.write_bytes(header.encode() + data)
    return path


def _truncated(samples_dir, tmp_path, suffix, compress=True):
    path = tmp_path / f"cut{suffix}"
    sitk.WriteImage(sitk.ReadImage(str(samples_dir / "ts_example_mr_sm_image.nii.gz")), str(path),
                    compress)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) * 6 // 10])
    return path


def _image(tmp_path, name, image):
    path = tmp_path / name
    sitk.WriteImage(image, str(path))
    return path


def _float_volume_with(value):
    array = np.zeros((4, 5, 6), np.float32)
    array[2, 2, 2] = value
    return sitk.GetImageFromArray(array)


def _nifti_with_zero_pixdim(tmp_path):
    path = _image(tmp_path, "flat.nii", sitk.Image(6, 5, 4, sitk.sitkInt16))
    header = bytearray(path.read_bytes())
    struct.pack_into("<f", header, 76 + 3 * 4, 0.0)  # pixdim[3]
    path.write_bytes(bytes(header))
    return path


def _dicom_two_series(samples_dir, tmp_path, make_dicom_series):
    image = sitk.ReadImage(str(samples_dir / "ct3slice_image.nii.gz"))[:32, :32, :]
    make_dicom_series(image, tmp_path / "two", SERIES_A)
    make_dicom_series(image, tmp_path / "other", SERIES_B)
    for dicom_file in (tmp_path / "other").iterdir():
        dicom_file.rename(tmp_path / "two" / f"b_{dicom_file.name}")
    return tmp_path / "two"


def _empty_folder(tmp_path):
    (tmp_path / "empty").mkdir()
    return tmp_path / "empty"


def _text_file(tmp_path, name):
    path = tmp_path / name
    path.write_text("<html>404 Not Found</html>\n")
    return path


BAD_INPUTS = {
    "missing file": (lambda s, t, d: t / "nope.nii.gz", {}, "no such file"),
    "unsupported type": (lambda s, t, d: _text_file(t, "scan.png"), {}, "unsupported file type"),
    "text file named .nii.gz": (lambda s, t, d: _text_file(t, "scan.nii.gz"), {}, "not gzip"),
    "text file named .nii": (lambda s, t, d: _text_file(t, "scan.nii"), {}, "not a NIfTI"),
    "text file named .nrrd": (lambda s, t, d: _text_file(t, "scan.nrrd"), {}, "not a readable"),
    "truncated .nii.gz": (lambda s, t, d: _truncated(s, t, ".nii.gz"), {}, "truncated"),
    "truncated .nii": (lambda s, t, d: _truncated(s, t, ".nii", False), {}, "truncated"),
    "truncated .nrrd": (lambda s, t, d: _truncated(s, t, ".nrrd"), {}, "truncated"),
    "truncated .mha": (lambda s, t, d: _truncated(s, t, ".mha", False), {}, "truncated"),
    "corrupt .mha": (lambda s, t, d: _mha(t / "bad.mha", data=b"\x00" * 10), {}, "truncated"),
    "2D image": (lambda s, t, d: _image(t, "slice.nii.gz", sitk.Image(6, 5, sitk.sitkInt16)),
                 {}, "2D image"),
    "single-slice 3D image": (lambda s, t, d: _image(t, "one.mha", sitk.Image(6, 5, 1, sitk.sitkInt16)),
                              {}, "2D image"),
    "4D image without frame": (
        lambda s, t, d: _image(t, "dyn.nii.gz", sitk.JoinSeries([sitk.Image(6, 5, 4, sitk.sitkInt16)] * 3)),
        {}, "4D image with 3 frames; choose one with --frame"),
    "4D frame out of range": (
        lambda s, t, d: _image(t, "dyn.nii.gz", sitk.JoinSeries([sitk.Image(6, 5, 4, sitk.sitkInt16)] * 3)),
        {"frame": 3}, "out of range"),
    "colour (vector) pixels": (
        lambda s, t, d: _image(t, "rgb.nii.gz", sitk.Image([6, 5, 4], sitk.sitkVectorUInt8, 3)),
        {}, "3 values per voxel"),
    "complex pixels": (
        lambda s, t, d: _image(t, "complex.mha", sitk.Image([6, 5, 4], sitk.sitkComplexFloat32)),
        {}, "complex"),
    "NaN voxels": (lambda s, t, d: _image(t, "nan.mha", _float_volume_with(np.nan)), {}, "NaN"),
    "infinite voxels": (lambda s, t, d: _image(t, "inf.nrrd", _float_volume_with(np.inf)), {},
                        "infinite"),
    "zero spacing": (lambda s, t, d: _mha(t / "zero.mha", spacing="1 1 0"), {}, "spacing"),
    "negative spacing": (lambda s, t, d: _mha(t / "neg.mha", spacing="1 -1 2"), {}, "spacing"),
    "absurd spacing": (lambda s, t, d: _mha(t / "huge.mha", spacing="1 1 1e6"), {}, "spacing"),
    "zero NIfTI pixdim": (lambda s, t, d: _nifti_with_zero_pixdim(t), {}, "spacing"),
    "empty DICOM folder": (lambda s, t, d: _empty_folder(t), {}, "no DICOM series"),
    "mixed DICOM series": (lambda s, t, d: _dicom_two_series(s, t, d), {},
                           f"{SERIES_A}, {SERIES_B}.*series_uid"),
    "unknown DICOM series": (lambda s, t, d: _dicom_two_series(s, t, d),
                             {"series_uid": "1.2.3"}, "no DICOM series 1.2.3"),
}


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_bad_input_gives_one_line_error(case, samples_dir, tmp_path, make_dicom_series):
    make_path, kwargs, message = BAD_INPUTS[case]
    path = make_path(samples_dir, tmp_path, make_dicom_series)
    with pytest.raises(RefSAM3DError, match=message) as error:
        read_volume(path, **kwargs)
    assert "\n" not in str(error.value)


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


# ---- issue 13: files that bloat or crash ITK are refused before ITK sees them -----------------


def _nrrd(header_lines, data):
    return ("NRRD0004\n" + "".join(line + "\n" for line in header_lines) + "\n").encode() + data


@pytest.mark.parametrize("encoding, data", [("raw", b"\0" * 128), ("gzip", gzip.compress(b"\0" * 128))])
def test_nrrd_declaring_more_voxels_than_it_holds_is_refused_before_allocating(encoding, data, tmp_path,
                                                                              monkeypatch):
    path = tmp_path / "bomb.nrrd"
    path.write_bytes(_nrrd(["type: short", "dimension: 3", "sizes: 1100 1100 1100", "endian: little",
                            f"encoding: {encoding}"], data))

    def no_allocation(self):
        raise AssertionError("ITK allocated the declared voxels")

    monkeypatch.setattr(sitk.ImageFileReader, "Execute", no_allocation)
    with pytest.raises(RefSAM3DError, match="declares 1100 1100 1100 voxels but the file holds only"):
        read_volume(path)


def test_image_bigger_than_free_memory_is_refused_before_reading(tmp_path, monkeypatch):
    path = tmp_path / "big.nrrd"
    sitk.WriteImage(sitk.Image(64, 64, 64, sitk.sitkInt16), str(path), True)  # 0.5 MiB of voxels, compressed
    monkeypatch.setattr("RefSAM3DLib.io.available_memory_bytes", lambda: 2**19)
    with pytest.raises(RefSAM3DError, match="64 x 64 x 64 image needs about 0.0 GiB to read"):
        read_volume(path)
    monkeypatch.setattr("RefSAM3DLib.io.available_memory_bytes", lambda: 2**30)
    assert read_volume(path).shape_kji == (64, 64, 64)


def _read_in_child(path):
    """read_volume in a child process: on a regression ITK kills that process, not the test run."""
    script = ("import sys\nfrom RefSAM3DLib.errors import RefSAM3DError\nfrom RefSAM3DLib.io import read_volume\n"
              "try:\n    read_volume(sys.argv[1])\nexcept RefSAM3DError as error:\n    print(error)\n    sys.exit(2)\n")
    child = subprocess.run([sys.executable, "-c", script, path], capture_output=True, encoding="utf-8", timeout=120)
    return child.returncode, child.stdout.strip()


@pytest.mark.parametrize("line", ["x" * 1000, "space units: " + '"x" ' * 300])
def test_nrrd_header_line_that_crashes_itk_is_a_clear_error(line, tmp_path):
    path = tmp_path / "junk.nrrd"
    path.write_bytes(_nrrd(["type: short", "dimension: 3", "sizes: 4 4 4", "endian: little", line,
                            "encoding: raw"], b"\0" * 128))
    code, message = _read_in_child(path)
    assert code == 2 and "line 6 of the NRRD header is" in message, (code, message)


def test_file_name_that_is_not_utf8_is_a_clear_error(samples_dir, tmp_path):
    path = Path(os.fsdecode(os.path.join(os.fsencode(tmp_path), b"ct\xff.nii.gz")))
    path.write_bytes((samples_dir / "ct3slice_image.nii.gz").read_bytes())
    code, message = _read_in_child(path)
    assert code == 2 and "ct\\xff.nii.gz: the file name is not valid UTF-8" in message, (code, message)
