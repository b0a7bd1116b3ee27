"""Writing a :class:`LabelResult` to files on the input's own grid, atomically; and reading a
.seg.nrrd back, whose format (segment IDs, tags, UTF-8 header) is defined here by its writer.

A label map (NIfTI, NRRD, MetaImage) comes with a sidecar JSON naming every value; a .seg.nrrd is
Slicer's segmentation file and keeps overlaps. Each output is written to a hidden temporary file in
the destination folder, then renamed over the destination (``os.replace``, atomic on one file
system), so no half-written file is ever left. Writers refuse to overwrite an existing file unless
``overwrite=True``, and always refuse to overwrite the input.
"""

from __future__ import annotations

import dataclasses
import json
import re
import tempfile
import unicodedata
from io import BytesIO
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from . import __version__
from .atomic import atomic_write, full_suffix
from .errors import RefSAM3DError
from .geometry import Grid, ijk_to_lps_from_ras, ijk_to_ras_from_lps, resample, sitk_from_array
from .result import LabelResult, Segment
from .vocabulary import lookup
from .volume import Volume
from .volume_reader import MAX_NRRD_HEADER_BYTES, check_file_name, display_name, itk_reason, nrrd_header_fields

LABELMAP_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".mha")
SEG_NRRD_SUFFIX = ".seg.nrrd"

NOT_A_MEDICAL_DEVICE = "RefSAM3D is a research tool, not a medical device; not for clinical use."

_OVERLAP_RULE = ("label map: where segments overlap, the voxel keeps the label of the EARLIER "
                 "prompt; volume_ml counts each segment's full mask; .seg.nrrd keeps overlaps")


def write_result(result: LabelResult, path, overwrite: bool = False) -> list[Path]:
    """Write ``result`` in the format its suffix names; returns the files written.

    ``.seg.nrrd`` -> :func:`write_seg_nrrd`; ``.nii.gz``, ``.nii``, ``.nrrd``, ``.mha`` ->
    :func:`write_labelmap` (label map + sidecar JSON).
    """
    if len(output_files(path)) == 1:  # output_files refuses an unsupported suffix
        return [write_seg_nrrd(result, path, overwrite)]
    return list(write_labelmap(result, path, overwrite))


def output_files(path) -> list[Path]:
    """Every file :func:`write_result` writes for ``path``, in write order (a sidecar JSON last).

    Callers check them all before any work (:func:`check_output_path`), so that a run that
    cannot write its outputs fails before inference and writes nothing.
    """
    path = Path(path)
    name = path.name.lower()
    if name.endswith(SEG_NRRD_SUFFIX):
        return [path]
    if name.endswith(LABELMAP_SUFFIXES):
        return [path, sidecar_path(path)]
    raise RefSAM3DError(
        f"{display_name(path)}: unsupported output type; use {SEG_NRRD_SUFFIX} (Slicer "
        f"segmentation) or a label map: {', '.join(LABELMAP_SUFFIXES)}."
    )


def check_output_path(path, overwrite: bool = False, inputs=()) -> None:
    """Refuse an output that cannot or must not be written, before anything is computed.

    Refused: a name that is not valid UTF-8 (ITK aborts the whole process on one), one of
    ``inputs``, a folder, an existing file unless ``overwrite``, and a destination folder that
    cannot be created or written to (probed with a temporary file, which also catches read-only
    file systems and ACLs that permission bits do not show). Creates nothing.
    """
    path = Path(path)
    check_file_name(path)
    if any(path.resolve() == Path(p).resolve() for p in inputs if p):
        raise RefSAM3DError(f"{path}: this is the input file; choose another output name.")
    if path.is_dir():
        raise RefSAM3DError(f"{path}: is a folder; give an output file name.")
    if path.exists() and not overwrite:
        raise RefSAM3DError(
            f"{path}: already exists; choose another name or allow overwriting (--overwrite)."
        )
    folder = path.parent
    while not folder.exists() and folder != folder.parent:  # the folder is created when writing
        folder = folder.parent
    if not folder.is_dir():
        raise RefSAM3DError(f"Cannot write {path}: {folder} is a file, not a folder; choose "
                            "another output folder.")
    try:
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as error:
        raise RefSAM3DError(f"Cannot write {path}: {folder} is not writable "
                            f"({error.strerror or error}); choose a writable output folder.") from None


def sidecar_path(labelmap_path) -> Path:
    """``X.nii.gz`` -> ``X.json`` (the sidecar of a label map)."""
    path = Path(labelmap_path)
    return path.with_name(path.name[: len(path.name) - len(full_suffix(path))] + ".json")


def write_labelmap(result: LabelResult, path, overwrite: bool = False) -> tuple[Path, Path]:
    """A label map on the input grid plus its sidecar JSON ``X.json``; returns both paths.

    Voxel values are 1..N in prompt order (0 = background), uint8 (uint16 beyond 255 prompts).
    Overlaps: a voxel claimed by several prompts goes to the one with the highest probability
    (``result.label_map``; for a result without probabilities, to the earlier prompt); each
    segment's ``volume_ml`` in the JSON counts its full mask, and a warning in the JSON says how
    many voxels went to other prompts. Use .seg.nrrd to keep overlaps.
    """
    path = Path(path)
    json_path = sidecar_path(path)
    _check_segments(result)
    for target in (path, json_path):
        check_output_path(target, overwrite, [result.reference.metadata.get("path")])
    labels, overlap_warnings = _label_array(result)
    image = sitk_from_array(labels, result.reference.ijk_to_ras)
    sidecar = _sidecar(result, path, overlap_warnings)
    # The JSON marks a complete pair: the old one goes first, the new one comes last, so a run
    # killed in between leaves a label map without JSON, never a JSON describing another image.
    with atomic_write(json_path) as json_temporary, atomic_write(path) as image_temporary:
        try:
            sitk.WriteImage(image, str(image_temporary), useCompression=True)
        except RuntimeError as error:
            raise RefSAM3DError(f"Cannot write {path}: {itk_reason(error)}.") from None
        json_temporary.write_text(json.dumps(sidecar, indent=1) + "\n", encoding="utf-8")
        json_path.unlink(missing_ok=True)
    return path, json_path


def write_seg_nrrd(result: LabelResult, path, overwrite: bool = False) -> Path:
    """A Slicer segmentation file (.seg.nrrd) on the input grid; overlapping segments are kept.

    One segment per prompt, in prompt order: ID = structure key (or ``Segment_N``), name, colour,
    ``TerminologyEntry`` tag from the vocabulary, plus tags ``RefSAM3D.Prompt`` and
    ``RefSAM3D.StructureKey``; header fields ``RefSAM3D_ModelName``/``_ModelVersion`` carry
    provenance. Segments sharing voxels go to separate layers (4D voxel array), as Slicer does.
    """
    import slicerio  # not in Slicer's Python, whose process imports this module through mrml

    path = Path(path)
    _check_segments(result)
    check_output_path(path, overwrite, [result.reference.metadata.get("path")])
    reference = result.reference
    shape_ijk = tuple(reversed(reference.shape_kji))
    segmentation = slicerio.create_segmentation(shape_ijk, ijk_to_lps_from_ras(reference.ijk_to_ras))
    voxels, placements = _layers(result)
    segmentation["voxels"] = voxels
    # Full extent for every segment: older Slicer versions cropped a shared layer to the extent of
    # its first segment (see slicerio.extract_segments).
    full_extent = [0, shape_ijk[0] - 1, 0, shape_ijk[1] - 1, 0, shape_ijk[2] - 1]
    used_ids: set[str] = set()
    for number, (segment, (layer, label_value)) in enumerate(zip(result.segments, placements), start=1):
        segment_id = segment.structure.key if segment.structure else f"Segment_{number}"
        if segment_id in used_ids:
            segment_id = f"{segment_id}_{number}"
        used_ids.add(segment_id)
        tags = {"RefSAM3D.Prompt": _ascii_marked(tag_value(segment.prompt))}
        if segment.structure is not None:
            tags["RefSAM3D.StructureKey"] = segment.structure.key
            tags["TerminologyEntry"] = segment.structure.terminology_entry()
        segmentation["segments"].append({
            "id": segment_id, "name": _ascii_marked(header_value(segment.name)),
            "color": [c / 255.0 for c in segment.color_rgb],
            "nameAutoGenerated": False, "colorAutoGenerated": False, "tags": tags,
            "labelValue": label_value, "layer": layer, "extent": full_extent,
        })
    segmentation["containedRepresentationNames"] = ["Binary labelmap"]
    segmentation["masterRepresentation"] = "Binary labelmap"
    segmentation["RefSAM3D_ModelName"] = _ascii_marked(header_value(result.model_name))
    segmentation["RefSAM3D_ModelVersion"] = _ascii_marked(header_value(result.model_version))
    # pynrrd writes an ASCII-only header; Slicer writes and reads UTF-8 there. Non-ASCII text goes
    # through pynrrd as marks, swapped for its UTF-8 bytes in the header (the bytes up to the first
    # blank line; the compressed voxels after it are left alone).
    buffer = BytesIO()
    slicerio.write_segmentation(buffer, segmentation, compression_level=1)
    data = buffer.getbuffer()
    header_end = bytes(data[:MAX_NRRD_HEADER_BYTES]).index(b"\n\n") + 2
    header = _ASCII_MARK.sub(lambda m: chr(int(m[1], 16)).encode("utf-8"), bytes(data[:header_end]))
    with atomic_write(path) as temporary, open(temporary, "wb") as file:
        file.write(header)
        file.write(data[header_end:])
    return path


def _layers(result: LabelResult) -> tuple[np.ndarray, list[tuple[int, int]]]:
    """The segments packed into layers as Slicer stores them (and ``slicerio.add_segment`` does):
    each in the first layer it does not overlap, with that layer's next label value.

    Done here, on the masks' own ``(K, J, I)`` layout, because ``slicerio.add_segment`` on
    ``(I, J, K)`` arrays, and pynrrd's Fortran-order copy of its layers, took 21 s for 8 segments
    of a 512 x 512 x 300 CT (this: about 2 s, the same file).

    Returns:
        the voxel array for ``slicerio.write_segmentation``, ``(I, J, K)`` or ``(L, I, J, K)`` and
        Fortran-contiguous (so the NRRD writer's copy is a plain one), and ``(layer, label value)``
        per segment.
    """
    layers: list[np.ndarray] = []
    next_value: list[int] = []
    placements = []
    for segment in result.segments:
        mask = segment.mask > 0
        for layer, voxels in enumerate(layers):
            if next_value[layer] <= np.iinfo(np.uint8).max and not voxels[mask].any():
                break
        else:
            layers.append(np.zeros(result.reference.shape_kji, dtype=np.uint8))
            next_value.append(1)
            layer = len(layers) - 1
        layers[layer][mask] = next_value[layer]
        placements.append((layer, next_value[layer]))
        next_value[layer] += 1
    if not layers:
        return np.zeros(result.reference.shape_kji, dtype=np.uint8).T, placements
    if len(layers) == 1:
        return layers[0].T, placements
    return np.stack(layers, axis=-1).T, placements


def read_seg_nrrd(path, reference: Volume) -> LabelResult:
    """Read a .seg.nrrd (ours or Slicer's) back as a LabelResult on ``reference``'s grid.

    This is how the Slicer module takes a worker's output: masks come back ``(K, J, I)`` uint8 on
    the reference volume's voxels (resampled nearest-neighbour when the file's grid differs, e.g. a
    Slicer file cropped to the segments' extent). ``Segment.prompt`` is the ``RefSAM3D.Prompt`` tag
    (else the segment name); ``Segment.structure`` is the vocabulary entry named by the
    ``RefSAM3D.StructureKey`` tag, or ``None``.
    """
    import slicerio  # not in Slicer's Python, whose process imports this module through mrml

    path = Path(path)
    if not path.is_file():
        raise RefSAM3DError(f"{path}: no such segmentation file; check the path.")
    try:
        segmentation = slicerio.read_segmentation(str(path))
    except Exception as error:  # pynrrd and slicerio raise many types for a damaged file
        raise RefSAM3DError(
            f"{path.name}: not a readable segmentation file ({error}); write it again."
        ) from None
    file_ijk_to_ras = ijk_to_ras_from_lps(segmentation["ijkToLPS"])
    shape_kji = tuple(reversed(segmentation["voxels"].shape[-3:]))
    source_grid = Grid.from_ijk_to_ras(file_ijk_to_ras, shape_kji)
    reference_grid = Grid.of_volume(reference)
    # Names and tags as UTF-8 (Slicer writes them so); pynrrd drops every non-ASCII byte. slicerio
    # lists segments in the order of their SegmentN_ numbers.
    text = nrrd_header_fields(path)
    numbers = sorted({int(m[1]) for key in text if (m := re.fullmatch(r"Segment(\d+)_.+", key))})
    segments = []
    for number, fields in zip(numbers, segmentation["segments"]):
        mask = np.ascontiguousarray(
            slicerio.segment_mask(segmentation, fields).transpose(2, 1, 0), dtype=np.uint8)
        if not source_grid.matches(reference_grid):
            mask = sitk.GetArrayFromImage(resample(
                sitk_from_array(mask, file_ijk_to_ras), reference_grid, sitk.sitkNearestNeighbor))
        tags = dict(item.split(":", 1) for item in text.get(f"Segment{number}_Tags", "").split("|")
                    if ":" in item)
        key = tags.get("RefSAM3D.StructureKey")
        structure = lookup(key) if key else None
        prompt = tags.get("RefSAM3D.Prompt", text.get(f"Segment{number}_Name", fields["id"]))
        segments.append(Segment(prompt=prompt, structure=structure, mask=mask))
    return LabelResult(
        reference=reference, segments=segments,
        model_name=text.get("RefSAM3D_ModelName", ""),
        model_version=text.get("RefSAM3D_ModelVersion", ""),
    )


def header_value(text: str) -> str:
    """``text`` fit for one header line: whitespace runs (newlines too) become one space, control
    characters go; everything else, any language, zero-width characters included, stays."""
    return "".join(c for c in " ".join(str(text).split()) if unicodedata.category(c) != "Cc")


_ASCII_MARK = re.compile(rb"\x01([0-9a-f]+)\x02")


def _ascii_marked(text: str) -> str:
    """Non-ASCII characters as ``\\x01<hex>\\x02`` marks (control characters, never in a header_value)."""
    return "".join(c if c.isascii() else f"\x01{ord(c):x}\x02" for c in text)


def tag_value(text: str) -> str:
    # '|' separates Slicer segment tags and a newline would end the NRRD header field.
    return header_value(text.replace("|", "/"))


def _check_segments(result: LabelResult) -> None:
    for segment in result.segments:
        if segment.mask.shape != result.reference.shape_kji:
            raise RefSAM3DError(
                f"Segment {segment.name!r}: mask shape {segment.mask.shape} is not the reference "
                f"volume's {result.reference.shape_kji}."
            )


def _label_array(result: LabelResult) -> tuple[np.ndarray, list[str]]:
    """``(K, J, I)`` labels 1..N in prompt order and a warning per segment that lost voxels.

    The engine's ``label_map`` (most probable prompt wins) when the result has one; otherwise
    overlaps go to the earlier prompt.
    """
    labels = result.label_map
    if labels is None:
        labels = np.zeros(result.reference.shape_kji, dtype=np.uint8 if len(result.segments) < 256 else np.uint16)
        for value, segment in reversed(list(enumerate(result.segments, start=1))):
            labels[segment.mask > 0] = value
    warnings = []
    for value, segment in enumerate(result.segments, start=1):
        lost = int(np.count_nonzero((segment.mask > 0) & (labels != value)))
        if lost:
            warnings.append(
                f"{lost} voxels of '{segment.name}' (label {value}) overlap other prompts and went to "
                "the more probable one; write .seg.nrrd to keep overlaps."
                if result.label_map is not None else
                f"{lost} voxels of '{segment.name}' (label {value}) overlap earlier prompts and "
                "keep their label; write .seg.nrrd to keep overlaps."
            )
    return labels, warnings


def _code_record(code):
    if code is None:
        return None
    return dataclasses.asdict(code) if dataclasses.is_dataclass(code) else str(code)


def _sidecar(result: LabelResult, path: Path, overlap_warnings: list[str]) -> dict:
    reference = result.reference
    labels = {}
    for value, segment in enumerate(result.segments, start=1):
        structure = segment.structure
        labels[str(value)] = {
            "key": structure.key if structure else None,
            "name": segment.name,
            "color_rgb": [int(c) for c in segment.color_rgb],
            "snomed": None if structure is None else {
                "category": _code_record(structure.category),
                "type": _code_record(structure.type),
                "modifier": _code_record(structure.modifier),
            },
            "terminology_entry": structure.terminology_entry() if structure else None,
            "volume_ml": round(result.volume_ml(segment), 3),
            "prompt": segment.prompt,
        }
    return {
        "labelmap": path.name,
        "labels": labels,
        "overlaps": _OVERLAP_RULE,
        "model": {"name": result.model_name, "version": result.model_version},
        "refsam3d_version": __version__,
        "input": {
            "file": reference.metadata.get("path") or reference.name,
            "shape_kji": list(reference.shape_kji),
            "spacing_mm": list(reference.spacing_mm),
            "ijk_to_ras": reference.ijk_to_ras.tolist(),
            "modality": reference.modality,
        },
        "elapsed_s": round(float(result.elapsed_s), 3),
        "warnings": list(result.warnings) + overlap_warnings,
        "note": NOT_A_MEDICAL_DEVICE,
    }
