"""Reading a volume file or DICOM series into a :class:`Volume`, refusing what cannot be read.

NIfTI (.nii, .nii.gz), NRRD (.nrrd, .nhdr), MetaImage (.mha, .mhd) and a folder holding a DICOM
series, all through SimpleITK. Anything a user can get wrong (missing or damaged file, 2D or 4D
image, vector or complex voxels, NaN, impossible spacing, ambiguous DICOM folder, an image bigger
than free memory) raises a one-line :class:`RefSAM3DError` that says what is wrong and what to do.
NIfTI and NRRD headers are checked before ITK reads them: ITK reads some damaged files silently
wrong, allocates gigabytes for others and crashes on a few.
"""

from __future__ import annotations

import dataclasses
import gzip
import os
import re
import struct
import zlib
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from .errors import RefSAM3DError
from .geometry import volume_from_sitk
from .volume import Volume

VOLUME_SUFFIXES = {".nii": "NIfTI", ".nii.gz": "NIfTI", ".nrrd": "NRRD", ".nhdr": "NRRD",
                   ".mha": "MetaImage", ".mhd": "MetaImage"}

MIN_SPACING_MM = 1e-3
"""Smaller voxels than this are a broken header, not a real scan (micro-CT is ~1e-2 mm)."""
MAX_SPACING_MM = 100.0
"""Larger voxels than this are a broken header (the thickest clinical slices are ~10 mm)."""

MAX_NRRD_HEADER_BYTES = 1 << 20
"""Real NRRD headers are a few kB (Slicer's .seg.nrrd with many segments: tens of kB)."""
MAX_NRRD_LINE = 512
"""Standard NRRD fields fit in far less; teem crashes quoting an invalid line of ~900 characters."""


def read_volume(path, modality: str | None = None, frame: int | None = None,
                series_uid: str | None = None) -> Volume:
    """Read a 3D scalar volume from a file or a DICOM series folder.

    Args:
        path: a .nii, .nii.gz, .nrrd, .nhdr, .mha or .mhd file, or a folder holding one DICOM
            series (or several, with ``series_uid``).
        modality: ``"CT"`` or ``"MR"``; wins over the file's. When ``None``: the DICOM Modality
            tag if it is CT or MR, else ``None`` (the engine then decides from the intensities:
            ``inference.decide_modality``).
        frame: which time frame of a 4D image to read (0-based); required for 4D images.
        series_uid: which series of a DICOM folder holding several.

    Returns:
        Volume with ``array`` (K, J, I) in the file's own voxel type, ``ijk_to_ras`` in RAS, and
        ``metadata`` ``{"path", "format", "frame", "series_uid"}``.
    """
    path = Path(path).expanduser()
    if not path.exists():
        raise RefSAM3DError(f"{path}: no such file or folder; check the path.")
    if path.is_dir():
        image, series_uid, dicom_modality = _read_dicom_series(path, series_uid)
        file_format = "DICOM"
    else:
        check_file_name(path)
        file_format = _volume_format(path)
        if file_format == "NIfTI":
            _check_nifti_file(path)
        elif file_format == "NRRD":
            _check_nrrd_file(path)
        image = _read_image_file(path, file_format)
        dicom_modality = None
    image = _select_frame(image, frame, path.name)
    _check_geometry(image, path.name)
    volume = volume_from_sitk(image, name=path.name)
    _check_finite(volume.array, path.name)
    modality = modality or dicom_modality
    return dataclasses.replace(
        volume, modality=modality,
        metadata={"path": str(path.resolve()), "format": file_format, "frame": frame,
                  "series_uid": series_uid},
    )


def _volume_format(path: Path) -> str:
    name = path.name.lower()
    for suffix, file_format in VOLUME_SUFFIXES.items():
        if name.endswith(suffix):
            return file_format
    raise RefSAM3DError(
        f"{path.name}: unsupported file type; use {', '.join(VOLUME_SUFFIXES)} or a DICOM folder."
    )


def itk_reason(error: Exception) -> str:
    """The last line of an ITK exception, which names the actual problem."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return lines[-1][:160] if lines else type(error).__name__


def _read_image_file(path: Path, file_format: str) -> sitk.Image:
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
    except RuntimeError as error:
        raise RefSAM3DError(
            f"{path.name}: not a readable {file_format} image ({itk_reason(error)}); "
            "check the file, or re-export it."
        ) from None
    # The header as written: ITK later turns a negative spacing into a positive one (mirroring
    # the image) and refuses a zero spacing with a deep error.
    _check_spacing(reader.GetSpacing()[:3], path.name)
    _check_pixel_type(reader.GetNumberOfComponents(), reader.GetPixelID(), path.name)
    _check_memory_to_read(reader.GetSize(), reader.GetPixelID(), path.name)
    try:
        return reader.Execute()
    except RuntimeError as error:
        raise RefSAM3DError(
            f"{path.name}: the {file_format} file is corrupt or truncated ({itk_reason(error)}); "
            "copy or export it again."
        ) from None


_PIXEL_BYTES = {sitk.sitkUInt8: 1, sitk.sitkInt8: 1, sitk.sitkUInt16: 2, sitk.sitkInt16: 2,
                sitk.sitkUInt32: 4, sitk.sitkInt32: 4, sitk.sitkFloat32: 4}


def _check_memory_to_read(size, pixel_id: int, name: str) -> None:
    """Refuse, before ITK allocates it, an image whose voxels cannot fit in memory."""
    needed = 2 * int(np.prod(size, dtype=object)) * _PIXEL_BYTES.get(pixel_id, 8)  # ITK's buffer + numpy's copy
    available = available_memory_bytes()
    if available is not None and needed > available:
        raise RefSAM3DError(
            f"{name}: a {' x '.join(map(str, size))} image needs about {needed / 2**30:.1f} GiB to read and "
            f"{available / 2**30:.1f} GiB is free; crop or downsample it first."
        )


def available_memory_bytes() -> int | None:
    """Memory the process can still take (psutil's ``available``: free plus reclaimable cache)."""
    try:
        import psutil

        return int(psutil.virtual_memory().available)
    except ImportError:  # psutil is optional in Slicer's Python; free pages are a lower bound
        try:
            return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError, AttributeError):
            return None


def _read_dicom_series(folder: Path, series_uid: str | None) -> tuple[sitk.Image, str, str | None]:
    series_uids = list(sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder)))
    if not series_uids:
        raise RefSAM3DError(
            f"{folder}: no DICOM series found in this folder; pass a folder holding the .dcm "
            "files of one series, or an image file."
        )
    if series_uid is None:
        if len(series_uids) > 1:
            raise RefSAM3DError(
                f"{folder}: {len(series_uids)} DICOM series in one folder "
                f"({', '.join(series_uids)}); choose one with --series-uid UID (series_uid= in "
                "Python), or move each series to its own folder."
            )
        series_uid = series_uids[0]
    elif series_uid not in series_uids:
        raise RefSAM3DError(
            f"{folder}: no DICOM series {series_uid}; the folder holds {', '.join(series_uids)}."
        )
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), series_uid))
    reader.MetaDataDictionaryArrayUpdateOn()
    try:
        image = reader.Execute()
    except RuntimeError as error:
        raise RefSAM3DError(
            f"{folder}: cannot read DICOM series {series_uid} ({itk_reason(error)}); check that "
            "all its files are complete."
        ) from None
    _check_pixel_type(image.GetNumberOfComponentsPerPixel(), image.GetPixelID(), folder.name)
    _check_spacing(image.GetSpacing(), folder.name)
    tag = "0008|0060"
    dicom_modality = reader.GetMetaData(0, tag).strip() if reader.HasMetaDataKey(0, tag) else None
    return image, series_uid, dicom_modality if dicom_modality in ("CT", "MR") else None


def _select_frame(image: sitk.Image, frame: int | None, name: str) -> sitk.Image:
    """The 3D image itself, or one frame of a 4D image."""
    dimension, size = image.GetDimension(), image.GetSize()
    if dimension == 2 or (dimension == 3 and min(size) == 1):
        raise RefSAM3DError(
            f"{name}: a 2D image (size {' x '.join(map(str, size))}); RefSAM3D segments 3D "
            "volumes: pass the whole series or volume, not one slice."
        )
    if dimension == 3:
        if frame not in (None, 0):
            raise RefSAM3DError(f"{name}: a 3D image has no frame {frame}; leave --frame out.")
        return image
    if dimension != 4:
        raise RefSAM3DError(f"{name}: a {dimension}D image; RefSAM3D needs a 3D volume.")
    frames = size[3]
    if frame is None:
        raise RefSAM3DError(
            f"{name}: a 4D image with {frames} frames; choose one with --frame N "
            f"(frame=N in Python), 0 <= N < {frames}."
        )
    if not 0 <= frame < frames:
        raise RefSAM3DError(f"{name}: frame {frame} is out of range; use 0 <= N < {frames}.")
    extractor = sitk.ExtractImageFilter()
    extractor.SetSize([size[0], size[1], size[2], 0])
    extractor.SetIndex([0, 0, 0, int(frame)])
    extractor.SetDirectionCollapseToStrategy(extractor.DIRECTIONCOLLAPSETOSUBMATRIX)
    return extractor.Execute(image)


def _check_pixel_type(components: int, pixel_id: int, name: str) -> None:
    complex_ids = {sitk.sitkComplexFloat32, sitk.sitkComplexFloat64}
    if components != 1 or pixel_id in complex_ids:
        raise RefSAM3DError(
            f"{name}: {components} values per voxel (colour, vector or complex data); RefSAM3D "
            "needs a scalar grey-value image such as a CT or MR volume."
        )


def _check_spacing(spacing_mm, name: str) -> None:
    spacing = np.asarray(spacing_mm, dtype=np.float64)
    if not np.all(np.isfinite(spacing)) or np.any(spacing < MIN_SPACING_MM) \
            or np.any(spacing > MAX_SPACING_MM):
        raise RefSAM3DError(
            f"{name}: impossible voxel spacing {tuple(float(s) for s in spacing)} mm (must be "
            f"between {MIN_SPACING_MM} and {MAX_SPACING_MM} mm); fix the file's header."
        )


def _check_geometry(image: sitk.Image, name: str) -> None:
    _check_spacing(image.GetSpacing(), name)
    if abs(np.linalg.det(np.reshape(image.GetDirection(), (3, 3)))) < 1e-3:
        raise RefSAM3DError(f"{name}: degenerate orientation matrix; fix the file's header.")


def _check_finite(array: np.ndarray, name: str) -> None:
    if np.issubdtype(array.dtype, np.floating):
        bad = array.size - int(np.count_nonzero(np.isfinite(array)))
        if bad:
            raise RefSAM3DError(
                f"{name}: {bad} voxels are NaN or infinite; replace them (e.g. with the background "
                "value) before segmenting."
            )


def _check_nifti_file(path: Path) -> None:
    """Catch what ITK lets through silently: a truncated NIfTI reads as zeros, a zero pixdim as 1 mm.

    Reads the header and counts the data bytes (decompressing a .nii.gz once more).
    """
    compressed = path.name.lower().endswith(".gz")
    with open(path, "rb") as raw:
        magic = raw.read(2)
    if compressed and magic != b"\x1f\x8b":
        raise RefSAM3DError(
            f"{path.name}: not gzip-compressed although named .nii.gz (a text or HTML file, or a "
            "failed download?); get the image again."
        )
    try:
        with (gzip.open(path, "rb") if compressed else open(path, "rb")) as stream:
            header = stream.read(540)
            layout = _nifti_layout(header)
            if layout is None:
                raise RefSAM3DError(f"{path.name}: not a NIfTI file (no valid header); check it.")
            dims, bitpix, pixdim, vox_offset, single_file = layout
            size = len(header)
            while chunk := stream.read(1 << 22):
                size += len(chunk)
    except (OSError, EOFError, zlib.error):
        raise RefSAM3DError(
            f"{path.name}: the compressed NIfTI file is truncated or corrupt; copy or export it again."
        ) from None
    if any(s == 0 or not np.isfinite(s) for s in pixdim[: min(len(dims), 3)]):
        raise RefSAM3DError(
            f"{path.name}: voxel spacing (pixdim) {tuple(pixdim[:3])} contains 0; fix the header."
        )
    expected = int(vox_offset) + int(np.prod(dims, dtype=np.int64)) * bitpix // 8
    if single_file and size < expected:
        raise RefSAM3DError(
            f"{path.name}: truncated NIfTI file ({size} of {expected} bytes); copy or export it again."
        )


def _nifti_layout(header: bytes):
    """(dims, bitpix, pixdim, vox_offset, single_file) from a NIfTI-1 or NIfTI-2 header, or None."""
    for endian in "<>":
        if len(header) >= 348 and struct.unpack(endian + "i", header[:4])[0] == 348:
            dim = struct.unpack(endian + "8h", header[40:56])
            bitpix = struct.unpack(endian + "h", header[72:74])[0]
            pixdim = struct.unpack(endian + "8f", header[76:108])
            vox_offset = struct.unpack(endian + "f", header[108:112])[0]
            single_file = header[344:348] == b"n+1\x00"
            break
        if len(header) >= 540 and struct.unpack(endian + "i", header[:4])[0] == 540:
            bitpix = struct.unpack(endian + "h", header[14:16])[0]
            dim = struct.unpack(endian + "8q", header[16:80])
            pixdim = struct.unpack(endian + "8d", header[104:168])
            vox_offset = struct.unpack(endian + "q", header[168:176])[0]
            single_file = header[4:8] == b"n+2\x00"
            break
    else:
        return None
    if not 1 <= dim[0] <= 7 or any(n < 1 for n in dim[1: dim[0] + 1]):
        return None
    return dim[1: dim[0] + 1], bitpix, pixdim[1: dim[0] + 1], vox_offset, single_file


def check_file_name(path) -> None:
    """Refuse a file name that is not valid UTF-8: SimpleITK aborts the process (no exception)."""
    try:
        str(path).encode("utf-8")
    except UnicodeEncodeError:
        raise RefSAM3DError(
            f"{display_name(path)}: the file name is not valid UTF-8; rename the file or folder."
        ) from None


def display_name(path) -> str:
    """``path`` printable whatever bytes its name holds (undecodable bytes shown as \\xNN)."""
    return str(path).encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def nrrd_header_fields(path) -> dict[str, str]:
    """The ``key: value`` and ``key:=value`` fields of an NRRD header, decoded as UTF-8."""
    return _nrrd_fields(_nrrd_header(path)[0])


def _nrrd_header(path) -> tuple[list[str], int]:
    """The lines of an NRRD header (UTF-8) and the offset of the data after it.

    Reads at most MAX_NRRD_HEADER_BYTES. The header ends at the first blank line, or at the end
    of a detached header (.nhdr) file.
    """
    with open(path, "rb") as file:
        header = file.read(MAX_NRRD_HEADER_BYTES)
    blank = re.search(rb"\r?\n\r?\n", header)
    if not header.startswith(b"NRRD") or (blank is None and len(header) == MAX_NRRD_HEADER_BYTES):
        raise RefSAM3DError(f"{display_name(Path(path).name)}: not a readable NRRD file (no header "
                            "ending within 1 MB); check the file, or re-export it.")
    end = blank.start() if blank else len(header)
    return header[:end].decode("utf-8", "replace").splitlines(), blank.end() if blank else len(header)


def _nrrd_fields(lines: list[str]) -> dict[str, str]:
    fields = {}
    for line in lines[1:]:
        if not line.startswith("#") and ":" in line:
            key, _, value = line.partition(":")
            fields[key.strip()] = value.removeprefix("=").strip()
    return fields


def _check_nrrd_file(path: Path) -> None:
    """Catch what ITK's NRRD reader does not survive, or survives at great cost.

    A header line that is no field, or a field with a long invalid value, makes teem overflow while
    quoting it in its error message (the process dies with SIGSEGV); and ITK allocates the
    declared sizes before it notices that the file is too short to hold them (a 213-byte file
    declaring 1100^3 voxels costs gigabytes).
    """
    lines, data_offset = _nrrd_header(path)
    for number, line in enumerate(lines[1:], start=2):
        if len(line) > MAX_NRRD_LINE and not line.startswith(("#", "content:")) and ":=" not in line:
            raise RefSAM3DError(
                f"{display_name(path.name)}: line {number} of the NRRD header is {len(line)} characters "
                "long and no valid field; the file is damaged, export it again."
            )
    fields = _nrrd_fields(lines)
    try:
        voxels = int(np.prod([int(size) for size in fields.get("sizes", "").split()], dtype=object))
    except ValueError:
        return  # a malformed sizes field: ITK says so itself
    # At least one byte per voxel on disk, at most 1032 voxels per byte gzip-compressed (deflate's
    # limit); bzip2 has no useful bound and detached data lies in another file.
    ratio = {"raw": 1, "gzip": 1032, "gz": 1032}.get(fields.get("encoding", "").lower())
    data_bytes = path.stat().st_size - data_offset
    if ratio and not ({"data file", "datafile"} & set(fields)) and voxels > data_bytes * ratio:
        raise RefSAM3DError(
            f"{display_name(path.name)}: the header declares {fields['sizes']} voxels but the file holds "
            f"only {data_bytes:,} bytes of data (truncated or damaged); copy or export it again."
        )
