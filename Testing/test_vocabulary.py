"""The prompt vocabulary: free text -> structures with names, colours and SNOMED CT codes."""

import json
import re
from pathlib import Path

import pytest

from RefSAM3DLib.errors import RefSAM3DError
from RefSAM3DLib.vocabulary import (
    STRUCTURES,
    lookup,
    parse_prompts,
    training_phrasings,
)

SAMPLES = Path(__file__).resolve().parents[1] / "RefSAM3DLib" / "samples"

# Label names used by ../shared/data/labelmaps.json that the bundled samples do not carry
# (BraTS, hippocampus, spine, MR-only classes): the vocabulary must know them too.
SHARED_ONLY_LABEL_NAMES = [
    "esophagus", "lung_right", "vertebrae", "intervertebral_discs", "spinal_cord", "thoracic_spine (vertebra)",
    "necrosis", "edema", "peritumoral edema", "non-enhancing tumour", "enhancing tumour",
    "hippocampus_anterior", "hippocampus_posterior", "lung_middle_lobe_right",
]
BTCV_13 = ["spleen", "right kidney", "left kidney", "gallbladder", "esophagus", "liver", "stomach", "aorta",
           "inferior vena cava", "portal vein and splenic vein", "pancreas", "right adrenal gland", "left adrenal gland"]
AMOS_15 = ["spleen", "right kidney", "left kidney", "gallbladder", "esophagus", "liver", "stomach", "aorta",
           "postcava", "pancreas", "right adrenal gland", "left adrenal gland", "duodenum", "bladder", "prostate", "uterus"]


def keys(prompts):
    return [p.structure.key if p.structure else None for p in prompts]


def test_every_bundled_and_shared_label_name_is_known():
    maps = json.loads((SAMPLES / "labelmaps.json").read_text())
    names = {name for labels in maps.values() for name in labels.values()} | set(SHARED_ONLY_LABEL_NAMES)
    unknown = sorted(n for n in names if lookup(n) is None)
    assert unknown == []


@pytest.mark.parametrize("name", sorted(set(BTCV_13 + AMOS_15)))
def test_btcv_and_amos_organs_are_known(name):
    assert lookup(name) is not None


def test_label_map_names_resolve_to_their_own_key():
    for key, structure in STRUCTURES.items():
        assert lookup(key) is structure
        assert re.fullmatch(r"[a-z0-9_]+|vertebrae_[CTLS]\d+", key), key


@pytest.mark.parametrize(
    "text, expected",
    [
        ("perform liver segmentation", ["liver"]),
        ("liver", ["liver"]),
        ("Liver", ["liver"]),
        ("LIVER.", ["liver"]),
        ("the left kidney", ["kidney_left"]),
        ("segment the left kidney please", ["kidney_left"]),
        ("kidney on the left", ["kidney_left"]),
        ("hepatic", ["liver"]),
        ("CT images, liver segmentation", ["liver"]),
        ("T1 MRI, spleen segmentation", ["spleen"]),
        ("liver, spleen and stomach", ["liver", "spleen", "stomach"]),
        ("liver; spleen & stomach", ["liver", "spleen", "stomach"]),
        ("portal vein and splenic vein", ["portal_vein_and_splenic_vein"]),
        ("oesophagus", ["esophagus"]),
        ("non-enhancing tumor", ["non_enhancing_tumour"]),
        ("thoracic_spine (vertebra)", ["thoracic_spine"]),
        ("L1 vertebra", ["vertebrae_L1"]),
        ("T1 vertebra", ["vertebrae_T1"]),
        ("7th left rib", ["rib_left_7"]),
        ("IVC", ["inferior_vena_cava"]),
    ],
)
def test_parse_prompts_finds_the_structures(text, expected):
    assert keys(parse_prompts(text)) == expected


def test_each_part_keeps_the_users_own_words():
    prompts = parse_prompts("the liver, spleen and Stomach")
    assert [p.text for p in prompts] == ["the liver", "spleen", "Stomach"]
    assert parse_prompts("perform liver segmentation")[0].text == "perform liver segmentation"


def test_one_structure_per_line():
    assert keys(parse_prompts("liver\n\n  spleen  \naorta")) == ["liver", "spleen", "aorta"]


def test_a_pair_without_a_side_means_both_sides_right_then_left():
    for text in ("kidneys", "both kidneys", "renal", "Kidney", "left and right kidney"):
        prompts = parse_prompts(text)
        assert keys(prompts) == ["kidney_right", "kidney_left"]
        assert [p.text for p in prompts] == ["right kidney", "left kidney"]
    assert keys(parse_prompts("adrenal glands")) == ["adrenal_gland_right", "adrenal_gland_left"]
    assert lookup("kidneys") is None


def test_the_same_structure_twice_is_kept_once():
    assert keys(parse_prompts("liver, Liver\nhepatic")) == ["liver"]


def test_several_texts_read_as_lines_of_one_and_repeats_across_them_collapse():
    assert keys(parse_prompts(["liver, spleen", "hepatic", "kidneys"])) == ["liver", "spleen", "kidney_right", "kidney_left"]
    assert keys(parse_prompts("liver\nliver")) == ["liver"]
    with pytest.raises(RefSAM3DError, match="Empty prompt"):
        parse_prompts(["", "  "])


def test_a_sentence_with_a_comma_is_one_structure():
    """The phrasing the model was trained on: "CT images" is context, not a second structure."""
    prompts = parse_prompts("CT images, liver segmentation")
    assert keys(prompts) == ["liver"] and prompts[0].text == "CT images, liver segmentation"
    assert keys(parse_prompts("MRI images, left kidney segmentation\nCT images, spleen segmentation")) == ["kidney_left", "spleen"]


@pytest.mark.parametrize("text", [
    "CT images, liver segmentation", "liver, spleen and stomach", "kidneys", "both adrenal glands", "hippocampus",
    "liver and tumour", "head and neck", "CT images, foo", "T1 MRI, liver", "portal vein and splenic vein, aorta",
    "left and right kidney\nliver, Liver", "segment the left kidney please; spleen",
])
def test_the_texts_of_parsed_prompts_parse_back_to_the_same_prompts(text):
    """The Slicer Logic hands the worker ``[p.text for p in parse_prompts(text)]``; the worker's
    reading of those must be the Logic's."""
    prompts = parse_prompts(text)
    assert parse_prompts([p.text for p in prompts]) == prompts


def test_unknown_text_is_kept_without_a_structure():
    prompts = parse_prompts("liver and tumour")
    assert keys(prompts) == ["liver", None]
    assert prompts[1].text == "tumour"
    assert keys(parse_prompts("head and neck")) == [None]
    assert parse_prompts("head and neck")[0].text == "head and neck"


@pytest.mark.parametrize("text", ["", "   ", "\n\t\n", None])
def test_empty_prompt_is_an_error(text):
    with pytest.raises(RefSAM3DError, match="Empty prompt"):
        parse_prompts(text)


def test_every_training_phrasing_parses_back_to_its_structure():
    for structure in STRUCTURES.values():
        phrasings = training_phrasings(structure)
        assert len(phrasings) >= 5
        for phrasing in phrasings:
            assert [p.structure for p in parse_prompts(phrasing)] == [structure], phrasing


def test_training_phrasings_include_sentence_templates():
    liver = lookup("liver")
    phrasings = training_phrasings(liver, modality="CT")
    assert {"Liver", "perform liver segmentation", "CT images, liver segmentation", "segment the liver", "hepatic"} <= set(phrasings)
    assert not any("MRI" in p for p in phrasings)


def test_terminology_entry_follows_slicers_serialisation():
    entry = lookup("left kidney").terminology_entry()
    assert entry == (
        "Segmentation category and type - 3D Slicer General Anatomy list~SCT^123037004^Anatomical Structure"
        "~SCT^64033007^Kidney~SCT^7771000^Left~Anatomic codes - DICOM master list~^^~^^"
    )
    assert "~SCT^10200004^Liver~^^~" in lookup("liver").terminology_entry()
    # structures Slicer's General Anatomy list lacks are coded in the DICOM master list context,
    # and those both lack in RefSAM3D's own context (RefSAM3DLib/terminology, test_terminology.py)
    assert lookup("inferior vena cava").terminology_entry().startswith("Segmentation category and type - DICOM master list~")
    assert lookup("L1 vertebra").terminology_entry().startswith("Segmentation category and type - RefSAM3D~")
    assert lookup("anterior hippocampus").terminology_entry().startswith("Segmentation category and type - RefSAM3D~")
    for structure in STRUCTURES.values():
        fields = structure.terminology_entry().split("~")
        assert len(fields) == 7 and all(len(f.split("^")) == 3 for f in fields[1:4])


def test_codes_colours_and_laterality_are_consistent():
    assert lookup("spleen").type.value == "78961009"
    assert lookup("aorta").type.value == "15825003"
    for structure in STRUCTURES.values():
        assert structure.type.scheme == "SCT" and structure.type.value.isdigit()
        assert len(structure.color_rgb) == 3 and all(0 <= c <= 255 for c in structure.color_rgb)
        side = {"7771000": "left", "24028007": "right"}.get(structure.modifier.value if structure.modifier else "")
        if side:
            assert side in structure.key.split("_") and side in structure.name.lower()
