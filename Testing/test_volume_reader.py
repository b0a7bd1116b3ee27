"""Reading every supported input, and refusing bad ones with one clear error before ITK can fail."""

import gzip
import os
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from RefSAM3DLib.errors import RefSAM3DError
from RefSAM3DLib.geometry import ijk_to_ras_from_sitk
from RefSAM3DLib.volume_reader import read_volume

SERIES_A = "1.2.826.0.1.3680043.2.1125.7.1"
SERIES_B = "1.2.826.0.1.3680043.2.1125.7.2"


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
    monkeypatch.setattr("RefSAM3DLib.volume_reader.available_memory_bytes", lambda: 2**19)
    with pytest.raises(RefSAM3DError, match="64 x 64 x 64 image needs about 0.0 GiB to read"):
        read_volume(path)
    monkeypatch.setattr("RefSAM3DLib.volume_reader.available_memory_bytes", lambda: 2**30)
    assert read_volume(path).shape_kji == (64, 64, 64)


def _read_in_child(path):
    """read_volume in a child process: on a regression ITK kills that process, not the test run."""
    script = ("import sys\nfrom RefSAM3DLib.errors import RefSAM3DError\nfrom RefSAM3DLib.volume_reader import read_volume\n"
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
