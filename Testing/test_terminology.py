"""Every vocabulary structure resolves in Slicer's own terminology logic (slicer-core's
``vtkSlicerTerminologiesModuleLogic`` with the terminology files Slicer ships), once RefSAM3D's
terminology file is loaded as the Slicer module loads it at startup."""

from __future__ import annotations

import json

from conftest import load_script

from RefSAM3DLib import mrml
from RefSAM3DLib.vocabulary import REFSAM3D_CONTEXT, STRUCTURES, TERMINOLOGY_FILE


def _script():
    return load_script("make_terminology")


def test_every_vocabulary_structure_resolves_in_slicers_terminology_logic(slicer_app, terminology_problem):
    assert mrml.load_terminology(slicer_app.terminologies_logic) == REFSAM3D_CONTEXT
    problems = {key: terminology_problem(structure.terminology_entry()) for key, structure in STRUCTURES.items()}
    assert not {key: problem for key, problem in problems.items() if problem}
    assert len(STRUCTURES) >= 127


def test_the_shipped_file_holds_exactly_what_slicers_lists_lack_with_the_vocabularys_names_and_colours():
    script = _script()
    missing = script.missing_structures(script.default_folder())
    assert 60 <= len(missing) < len(STRUCTURES)  # vertebrae, ribs, gluteal muscles, hippocampus parts, ...
    assert json.loads(TERMINOLOGY_FILE.read_text(encoding="utf-8")) == script.terminology(missing), (
        "RefSAM3DLib/terminology is stale: run python scripts/make_terminology.py")
    in_file = {s.key for s in missing}
    for key, structure in STRUCTURES.items():
        assert (structure.terminology_entry().split("~")[0] == REFSAM3D_CONTEXT) == (key in in_file), key
