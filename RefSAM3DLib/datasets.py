"""Labelled datasets, for training and evaluation alike: dataset specs -> cases with patient ids,
and the patient-level split.

Three layouts are read, each described by one entry of a training config's ``datasets`` list
(``refsam3d evaluate --data`` builds the entry from a path: :func:`cases_from_path`):

* ``layout: folder`` -- a folder of ``<case>_image.nii.gz`` + ``<case>_label.nii.gz`` pairs and a
  label-map JSON mapping each label file (``"folder/file"`` relative to the JSON, or the bare file
  name) to ``{value: name}``; the layout of ``../shared/data`` and ``RefSAM3DLib/samples``.
* ``layout: msd`` -- a Medical Segmentation Decathlon folder with ``dataset.json`` (``labels``,
  ``modality``, ``training`` list of image/label paths); a multi-channel image is read at its
  ``channel`` (default 0).
* ``layout: json_splits`` -- a BTCV-style JSON with split lists (``training``, ``validation``, ...),
  each a list of image/label paths, plus ``labels``; the JSON's ``validation`` list is honoured.

Patient identity is what the split protects: cases of one patient never land on both sides.
A case's patient id is its case id unless the spec says otherwise, either with ``patient_regex``
(the first group of a match on the case id) or with ``same_patient`` (``{case_id: patient_id}``).
"""

from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass, field
from pathlib import Path

from .errors import RefSAM3DError
from .vocabulary import lookup

IMAGE_SUFFIX = "_image.nii.gz"
LABEL_SUFFIX = "_label.nii.gz"


@dataclass(frozen=True)
class Case:
    """One labelled volume of a dataset.

    Args:
        case_id: unique name of the case, e.g. ``"btcv_0005"``.
        dataset: name of the dataset entry it came from.
        image_path: the image file.
        label_path: the label-map file (same grid as the image).
        structures: ``{label value: vocabulary key}`` of the values to train on.
        modality: ``"CT"`` or ``"MR"``; ``None`` only where the caller allowed it (then the engine
            decides from the image: ``inference.decide_modality``).
        patient_id: the subject; cases sharing it are always on the same side of a split.
        fixed_split: ``"train"``/``"validation"`` when the dataset itself assigns one, else None.
        absent: vocabulary keys of structures certainly not in this image (trained as empty targets).
        frame: the channel of a multi-channel image to read, else ``None``.
    """

    case_id: str
    dataset: str
    image_path: Path
    label_path: Path
    structures: dict[int, str]
    modality: str | None
    patient_id: str
    fixed_split: str | None = None
    absent: tuple[str, ...] = field(default_factory=tuple)
    frame: int | None = None


def load_cases(spec: dict, base_dir: Path | str = ".", require_modality: bool = True) -> list[Case]:
    """Read one dataset entry of a training config.

    Args:
        spec: the entry: ``name``, ``layout`` (``folder``/``msd``/``json_splits``), ``root``,
            ``modality`` (``CT``/``MR``; MSD/JSON layouts may take it from their JSON),
            optional ``labelmap`` (folder layout), ``json`` (json_splits layout; for msd, a
            ``dataset.json`` elsewhere than in ``root``), ``channel`` (msd),
            ``structures`` (list of label names to keep, or ``all``), ``rename`` (``{dataset name:
            vocabulary name}``), ``include``/``exclude`` (case ids), ``patient_regex``,
            ``same_patient``, ``absent`` (structures certainly not in these images).
        base_dir: folder that relative paths in ``spec`` are resolved against.
        require_modality: refuse a case whose modality neither the spec nor its JSON states
            (training must know it; evaluation lets the engine decide from the image).
    Returns:
        the cases, sorted by case id.
    """
    base_dir = Path(base_dir)
    name = spec.get("name")
    layout = spec.get("layout", "folder")
    if not name or "root" not in spec:
        raise RefSAM3DError(f"dataset entry {spec!r} needs a 'name' and a 'root'; add them to the config")
    root = (base_dir / spec["root"]).resolve()
    if not root.is_dir():
        raise RefSAM3DError(f"dataset '{name}': folder {root} does not exist; fix its 'root' in the config")
    readers = {"folder": _read_folder, "msd": _read_msd, "json_splits": _read_json_splits}
    if layout not in readers:
        raise RefSAM3DError(f"dataset '{name}': unknown layout '{layout}'; use one of {sorted(readers)}")
    raw = readers[layout](spec, root, base_dir)

    include = set(spec.get("include") or [])
    exclude = set(spec.get("exclude") or [])
    unknown = (include | exclude) - {r["case_id"] for r in raw}
    if unknown:
        raise RefSAM3DError(f"dataset '{name}': include/exclude name unknown cases {sorted(unknown)}; check the ids")
    wanted = spec.get("structures", "all")
    rename = {str(k): str(v) for k, v in (spec.get("rename") or {}).items()}
    same_patient = {str(k): str(v) for k, v in (spec.get("same_patient") or {}).items()}
    regex = re.compile(spec["patient_regex"]) if spec.get("patient_regex") else None

    cases = []
    for r in raw:
        if (include and r["case_id"] not in include) or r["case_id"] in exclude:
            continue
        names = {value: rename.get(label, label) for value, label in r["labels"].items()}
        if wanted != "all":
            names = {value: label for value, label in names.items() if label in set(wanted)}
        structures = _resolve(names, strict=wanted != "all", dataset=name)
        if not structures:
            continue
        modality = str(spec.get("modality") or r.get("modality") or "").upper() or None
        if modality not in ("CT", "MR") and (require_modality or modality is not None):
            raise RefSAM3DError(f"dataset '{name}': modality '{modality or ''}' is not CT or MR; set 'modality' in the config")
        cases.append(
            Case(
                case_id=r["case_id"],
                dataset=name,
                image_path=r["image"],
                label_path=r["label"],
                structures=structures,
                modality=modality,
                patient_id=_patient_id(r["case_id"], regex, same_patient),
                fixed_split=r.get("split"),
                absent=tuple(_resolve(dict(enumerate(spec.get("absent") or [])), True, name).values()),
                frame=r.get("frame"),
            )
        )
    if not cases:
        raise RefSAM3DError(f"dataset '{name}': no usable case under {root}; check 'root', 'structures' and 'include'")
    return sorted(cases, key=lambda c: c.case_id)


def _resolve(names: dict[int, str], strict: bool, dataset: str) -> dict[int, str]:
    """Label names -> vocabulary keys; names outside the vocabulary are an error when asked for
    explicitly and are left out when the spec takes ``all`` labels."""
    keys = {}
    for value, label in names.items():
        structure = lookup(label)
        if structure is None and strict:
            raise RefSAM3DError(f"dataset '{dataset}': '{label}' is not a vocabulary structure; map it with 'rename'")
        if structure is not None:
            keys[value] = structure.key
    return keys


def _patient_id(case_id: str, regex: re.Pattern | None, same_patient: dict[str, str]) -> str:
    if case_id in same_patient:
        return same_patient[case_id]
    if regex is not None:
        match = regex.search(case_id)
        if match:
            return match.group(1) if match.groups() else match.group(0)
    return case_id


def _read_folder(spec: dict, root: Path, base_dir: Path) -> list[dict]:
    labelmap_path = (base_dir / spec["labelmap"]).resolve() if spec.get("labelmap") else root / "labelmaps.json"
    if not labelmap_path.is_file():
        raise RefSAM3DError(f"dataset '{spec['name']}': label-map JSON {labelmap_path} not found; set 'labelmap'")
    labelmaps = json.loads(labelmap_path.read_text(encoding="utf-8"))
    rows = []
    for image in sorted(root.glob("*" + IMAGE_SUFFIX)):
        case_id = image.name[: -len(IMAGE_SUFFIX)]
        label = root / (case_id + LABEL_SUFFIX)
        if not label.is_file():
            continue
        # Keys are "folder/file" relative to the JSON's folder, or the bare file name.
        key = label.relative_to(labelmap_path.parent).as_posix() if label.is_relative_to(labelmap_path.parent) else None
        table = labelmaps.get(key) if key else None
        table = table if table is not None else labelmaps.get(label.name)
        if table is None:
            raise RefSAM3DError(f"{labelmap_path} has no entry for {label.name}; add its value -> name map")
        rows.append({"case_id": case_id, "image": image, "label": label, "labels": _int_keys(table)})
    return rows


def _read_msd(spec: dict, root: Path, base_dir: Path) -> list[dict]:
    meta = _read_json((base_dir / spec["json"]).resolve() if spec.get("json") else root / "dataset.json")
    return _rows_from_lists(spec, root, meta, {"training": None})


def _read_json_splits(spec: dict, root: Path, base_dir: Path) -> list[dict]:
    if not spec.get("json"):
        raise RefSAM3DError(f"dataset '{spec['name']}': layout json_splits needs 'json' (the split-list file)")
    meta = _read_json((base_dir / spec["json"]).resolve())
    return _rows_from_lists(spec, root, meta, {"training": "train", "validation": "validation"})


def _rows_from_lists(spec: dict, root: Path, meta: dict, lists: dict[str, str | None]) -> list[dict]:
    labels = {v: n for v, n in _int_keys(meta.get("labels", {})).items() if v != 0}
    channel = spec.get("channel", 0)
    modality = _modality_from_json(meta.get("modality"), channel)
    frame = channel if isinstance(meta.get("modality"), dict) and len(meta["modality"]) > 1 else None
    rows = []
    for list_name, split in lists.items():
        for item in meta.get(list_name) or []:
            if not isinstance(item, dict) or "image" not in item or "label" not in item:
                continue
            image, label = (root / item["image"]).resolve(), (root / item["label"]).resolve()
            for path in (image, label):
                if not path.is_file():
                    raise RefSAM3DError(f"dataset '{spec['name']}': listed file {path} is missing; fix the JSON or 'root'")
            case_id = _strip_nifti(label.name)
            rows.append({"case_id": case_id, "image": image, "label": label, "labels": labels,
                         "modality": modality, "split": split, "frame": frame})
    return rows


def _modality_from_json(modality, channel: int) -> str | None:
    if isinstance(modality, dict):
        modality = modality.get(str(channel))
    if not modality:
        return None
    text = str(modality).upper()
    return "CT" if text.startswith("CT") else "MR"


def _read_json(path: Path) -> dict:
    if not path.is_file():
        raise RefSAM3DError(f"{path} not found; point the dataset's 'root'/'json' at the folder that holds it")
    return json.loads(path.read_text(encoding="utf-8"))


def _int_keys(table: dict) -> dict[int, str]:
    return {int(value): str(name) for value, name in table.items()}


def _strip_nifti(name: str) -> str:
    for suffix in (".nii.gz", ".nii", ".nrrd", ".mha"):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def cases_from_path(data: Path | str) -> list[Case]:
    """The cases of ``refsam3d evaluate --data``: an MSD ``dataset.json`` (or a folder holding
    one), or a folder of ``*_image``/``*_label`` pairs with a ``labelmaps.json`` in it or in its
    parent (``../shared/data`` keeps one above its dataset folders). Labels outside the vocabulary
    are left out (no prompt names them); a modality no JSON states is decided from the image by the engine."""
    data = Path(data)
    if data.is_dir() and (data / "dataset.json").is_file() and not (data / "labelmaps.json").is_file():
        data = data / "dataset.json"
    if data.is_file() and data.suffix == ".json":
        spec = {"name": data.parent.name, "layout": "msd", "root": str(data.parent), "json": str(data)}
    elif data.is_dir():
        candidates = [data / "labelmaps.json", data.parent / "labelmaps.json"]
        labelmap = next((c for c in candidates if c.is_file()), candidates[0])
        spec = {"name": data.name, "layout": "folder", "root": str(data), "labelmap": str(labelmap)}
    else:
        raise RefSAM3DError(f"{data}: not a folder or a dataset.json; give a data folder with labelmaps.json or an MSD dataset.json.")
    return load_cases(spec, require_modality=False)


def split_by_patient(
    cases: list[Case],
    validation: list[str] | None = None,
    validation_fraction: float = 0.0,
    seed: int = 0,
) -> tuple[list[Case], list[Case]]:
    """Split cases into train and validation so that no patient is on both sides.

    Args:
        cases: all cases.
        validation: case ids or patient ids to validate on (all cases of their patients go too).
        validation_fraction: when ``validation`` is empty, the fraction of patients drawn at random
            (seeded) for validation; datasets' own fixed splits are honoured first.
        seed: seed of that draw.
    Returns:
        ``(train_cases, validation_cases)``.
    """
    ids = {c.case_id for c in cases} | {c.patient_id for c in cases}
    missing = set(validation or []) - ids
    if missing:
        raise RefSAM3DError(f"validation names unknown cases {sorted(missing)}; use case or patient ids of the config's data")
    if len({c.case_id for c in cases}) != len(cases):
        raise RefSAM3DError("two datasets share case ids; give them distinct 'include' lists or rename the files")

    val_patients = {c.patient_id for c in cases if c.case_id in set(validation or []) or c.patient_id in set(validation or [])}
    val_patients |= {c.patient_id for c in cases if c.fixed_split == "validation"}
    train_fixed = {c.patient_id for c in cases if c.fixed_split == "train"}
    if not validation and validation_fraction > 0:
        free = sorted({c.patient_id for c in cases} - val_patients - train_fixed)
        count = round(validation_fraction * len({c.patient_id for c in cases})) - len(val_patients)
        val_patients |= set(random.Random(seed).sample(free, max(0, min(count, len(free)))))
    clash = val_patients & train_fixed
    if clash:
        raise RefSAM3DError(f"patients {sorted(clash)} are fixed to training but asked for validation; fix the split")
    train = [c for c in cases if c.patient_id not in val_patients]
    val = [c for c in cases if c.patient_id in val_patients]
    return train, val
