"""Write RefSAM3D's terminology context: the vocabulary structures whose codes Slicer's lists lack.

    python scripts/make_terminology.py [SLICER_TERMINOLOGY_FOLDER]

Slicer's Terminologies module ships two segmentation contexts: "3D Slicer General Anatomy list"
and "DICOM master list". A segment whose TerminologyEntry names a type (or a type modifier) that
its context does not list cannot be found by Slicer's terminology selector. This script reads
those two files (by default the copies in slicer-core's ``trame_slicer/resources/terminologies``,
the same files Slicer ships), finds every vocabulary structure they lack, and writes
``RefSAM3DLib/terminology/SegmentationCategoryTypeModifier-RefSAM3D.term.json`` in Slicer's
format (as SlicerTotalSegmentator ships its own). The vocabulary codes those structures in this
context; ``Testing/test_terminology.py`` checks that every structure resolves in Slicer's
``vtkSlicerTerminologiesModuleLogic`` once the file is loaded.

Run it again after adding structures to the vocabulary.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from RefSAM3DLib.vocabulary import _DICOM_CONTEXT, _SLICER_ANATOMY_CONTEXT, _SLICER_ANATOMY_TYPES, REFSAM3D_CONTEXT, STRUCTURES, TERMINOLOGY_FILE

SLICER_FILES = {
    _SLICER_ANATOMY_CONTEXT: "SegmentationCategoryTypeModifier-SlicerGeneralAnatomy.term.json",
    _DICOM_CONTEXT: "SegmentationCategoryTypeModifier-DICOM-Master.term.json",
}
SCHEMA = "https://raw.githubusercontent.com/qiicr/dcmqi/master/doc/segment-context-schema.json#"


def default_folder() -> Path:
    from trame_slicer.resources import resources_path

    return Path(resources_path()) / "terminologies"


def listed_codes(path: Path) -> set[tuple[str, str, str]]:
    """``(category, type, modifier)`` code values a Slicer context file lists (modifier ``""`` for the type alone)."""
    context = json.loads(path.read_text(encoding="utf-8"))
    codes = set()
    for category in context["SegmentationCodes"]["Category"]:
        for entry in category.get("Type", []):
            codes.add((category["CodeValue"], entry["CodeValue"], ""))
            codes.update((category["CodeValue"], entry["CodeValue"], m["CodeValue"]) for m in entry.get("Modifier", []))
    return codes


def code_fields(code) -> dict:
    return {"CodeMeaning": code.meaning, "CodingSchemeDesignator": code.scheme, "CodeValue": code.value}


def missing_structures(folder: Path) -> list:
    """Vocabulary structures that Slicer's own context for them does not list."""
    listed = {name: listed_codes(folder / file) for name, file in SLICER_FILES.items()}
    missing = []
    for structure in STRUCTURES.values():
        context = _SLICER_ANATOMY_CONTEXT if structure.type.value in _SLICER_ANATOMY_TYPES else _DICOM_CONTEXT
        code = (structure.category.value, structure.type.value, structure.modifier.value if structure.modifier else "")
        if code not in listed[context]:
            missing.append(structure)
    return missing


def terminology(structures) -> dict:
    """Slicer's context JSON for ``structures``: one category per category code, one type per type
    code, modifiers (sides, hippocampus parts) under their type; colours and labels from the vocabulary."""
    categories: dict[str, dict] = {}
    for structure in structures:
        category = categories.setdefault(structure.category.value, {**code_fields(structure.category), "showAnatomy": False, "Type": []})
        entry = next((t for t in category["Type"] if t["CodeValue"] == structure.type.value), None)
        if entry is None:
            entry = code_fields(structure.type)
            category["Type"].append(entry)
        shown = {"recommendedDisplayRGBValue": list(structure.color_rgb), "3dSlicerLabel": structure.name.lower()}
        if structure.modifier is None:
            entry.update(shown)
        else:
            entry.setdefault("Modifier", []).append({**code_fields(structure.modifier), **shown})
    return {
        "SegmentationCategoryTypeContextName": REFSAM3D_CONTEXT,
        "@schema": SCHEMA,
        "SegmentationCodes": {"Category": list(categories.values())},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder", nargs="?", type=Path, help="folder holding Slicer's .term.json files (default: slicer-core's)")
    args = parser.parse_args()
    structures = missing_structures(args.folder or default_folder())
    TERMINOLOGY_FILE.parent.mkdir(parents=True, exist_ok=True)
    TERMINOLOGY_FILE.write_text(json.dumps(terminology(structures), indent=1) + "\n", encoding="utf-8")
    print(f"{len(structures)} of {len(STRUCTURES)} structures are missing from Slicer's lists; written to {TERMINOLOGY_FILE}")


if __name__ == "__main__":
    main()
