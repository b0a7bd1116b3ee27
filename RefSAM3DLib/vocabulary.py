"""The prompt vocabulary: free text -> named, coloured, SNOMED CT-coded structures.

The text that reaches the text encoder is always the user's own words (``Prompt.text``); the
vocabulary only names, colours and codes the output (``Prompt.structure``). Text it does not know
is still sent to the model, with ``structure=None`` (the caller warns).

Coverage: every structure of the label maps in ``../shared/data`` (TotalSegmentator ``total`` v2
and ``total_mr``, BTCV's 13 organs, CHAOS, BraTS tumour sub-regions, MSD hippocampus, spinal cord,
thoracic spine), the AMOS 15 organs (AMOS' single "prostate/uterus" class is two structures here)
and the rest of TotalSegmentator's ``total`` classes except the kidney cysts (a cyst needs an
anatomic-region code that :class:`Structure` does not carry).

Codes and colours follow 3D Slicer's "General Anatomy" terminology where it lists the structure,
else SlicerTotalSegmentator's mapping of the TotalSegmentator classes (vertebrae and ribs use its
per-level palette so neighbours differ). The tumour sub-regions have no Slicer convention: both
tumour classes are coded as SCT Neoplasm and told apart by name and colour. Each structure's
``terminology_entry`` names the terminology context that lists its code: Slicer's General Anatomy
list, the DICOM master list, or, for the codes neither lists (vertebra levels, ribs, gluteal
muscles, hippocampus parts, ...), RefSAM3D's own context in :data:`TERMINOLOGY_FILE`, which the
Slicer module loads into Slicer's Terminologies module (as SlicerTotalSegmentator does; the file
is made by ``scripts/make_terminology.py``).

Parsing rules (see :func:`parse_prompts`, the one reader of prompt text for the CLI, the Slicer
panel and its Logic, and batch scripts):

* one structure per line (several texts count as several lines of one text), several per line
  separated by ``,`` ``;`` ``and`` ``&`` ``+`` ("liver, spleen and stomach"); a name that itself
  contains "and" ("portal vein and splenic vein") wins over splitting;
* filler words are ignored for matching ("perform liver segmentation", "CT images, liver
  segmentation", "segment the left kidney please"), spelling is British/American-neutral
  (tumor/tumour, oesophagus/esophagus) and plurals match the singular;
* a left/right pair named without a side ("kidneys", "both kidneys", "left and right kidney",
  "renal", "adrenal glands")
  means BOTH sides: it becomes two prompts, right then left, whose text is the structure's own
  name ("right kidney", "left kidney") because the encoder must be told which side to draw;
  "hippocampus" likewise becomes its anterior and posterior parts;
* the same structure named twice (on one line, on several, or in several texts) is kept once.
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from .errors import RefSAM3DError


@dataclass(frozen=True)
class Code:
    """A coded concept, as DICOM and Slicer terminologies store it (``SCT^10200004^Liver``)."""

    scheme: str
    value: str
    meaning: str

    def serialized(self) -> str:
        return f"{self.scheme}^{self.value}^{self.meaning}"


LEFT = Code("SCT", "7771000", "Left")
RIGHT = Code("SCT", "24028007", "Right")
ANATOMICAL_STRUCTURE = Code("SCT", "123037004", "Anatomical Structure")
ALTERED_STRUCTURE = Code("SCT", "49755003", "Morphologically Altered Structure")

_SLICER_ANATOMY_CONTEXT = "Segmentation category and type - 3D Slicer General Anatomy list"
_DICOM_CONTEXT = "Segmentation category and type - DICOM master list"
REFSAM3D_CONTEXT = "Segmentation category and type - RefSAM3D"
TERMINOLOGY_FILE = Path(__file__).resolve().parent / "terminology" / "SegmentationCategoryTypeModifier-RefSAM3D.term.json"
"""RefSAM3D's terminology context (Slicer's JSON format): the structures whose codes Slicer's own
lists lack. Load it with ``vtkSlicerTerminologiesModuleLogic.LoadTerminologyFromFile``."""
_ANATOMIC_REGION_CONTEXT = "Anatomic codes - DICOM master list"
# Type codes that Slicer's General Anatomy context lists; the others live in the DICOM master list,
# or in RefSAM3D's own context (TERMINOLOGY_FILE) when neither lists them.
_SLICER_ANATOMY_TYPES = frozenset(
    "78961009 64033007 28231008 10200004 69695003 15776009 23451007 45653009 72481006 90572001 "
    "39607008 32849002 44567001 69748006 30315005 38848004 71854001 89837001 41216001 35039007 "
    "80891009 15825003 51299004 2748008 12738006 89546000 56873002 113197003 122495006 79654002 "
    "6574001".split()
)


@dataclass(frozen=True)
class Structure:
    """One segmentable structure.

    Args:
        key: snake_case identifier, the label-map name used in ``../shared/data`` ("kidney_left").
        name: display name ("Left kidney").
        synonyms: other words for this one structure ("left renal"), lower case.
        color_rgb: recommended display colour, 0-255.
        category: SNOMED CT segmentation category (Anatomical Structure, Morphologically Altered
            Structure).
        type: SNOMED CT segmented property type (Kidney).
        modifier: type modifier: laterality (SCT 7771000 Left / 24028007 Right), or Anterior /
            Posterior for the hippocampus parts; ``None`` when the type says it all.
    """

    key: str
    name: str
    synonyms: tuple[str, ...]
    color_rgb: tuple[int, int, int]
    category: Code
    type: Code
    modifier: Code | None = None

    @property
    def one_piece(self) -> bool:
        """Whether every image shows this structure as one connected piece, so that a run keeps
        only its largest component (``RunOptions.largest_component``). Not so for altered
        structures (tumours, oedema: often multifocal) and for :data:`SEVERAL_PIECES`."""
        return self.category == ANATOMICAL_STRUCTURE and self.key not in SEVERAL_PIECES

    def terminology_entry(self) -> str:
        """Slicer's serialised TerminologyEntry (``vtkSlicerTerminologiesModuleLogic``'s format).

        ``context~category~type~modifier~regionContext~region~regionModifier``, each code as
        ``scheme^value^meaning`` (empty ``^^``).
        """
        if self.type.value in _SLICER_ANATOMY_TYPES:
            context = _SLICER_ANATOMY_CONTEXT
        elif self.type.value in _refsam3d_context_types():
            context = REFSAM3D_CONTEXT
        else:
            context = _DICOM_CONTEXT
        modifier = self.modifier.serialized() if self.modifier else "^^"
        return "~".join(
            (context, self.category.serialized(), self.type.serialized(), modifier, _ANATOMIC_REGION_CONTEXT, "^^", "^^")
        )


SEVERAL_PIECES = frozenset(
    "pulmonary_vein costal_cartilages vertebrae thoracic_spine intervertebral_discs colon small_bowel "
    "thyroid_gland skull".split()
)
"""Anatomical structures that one image may show in several pieces: groups of bones, discs or
veins; bowel that winds out of the field of view and back; the thyroid's thin isthmus and the
skull's sutures, which a 3 mm model space may not join."""


@functools.cache
def _refsam3d_context_types() -> frozenset[str]:
    """The type code values that RefSAM3D's terminology file lists."""
    context = json.loads(TERMINOLOGY_FILE.read_text(encoding="utf-8"))
    return frozenset(t["CodeValue"] for category in context["SegmentationCodes"]["Category"] for t in category["Type"])


@dataclass(frozen=True)
class Prompt:
    """One structure asked for.

    Args:
        text: the user's own words for this structure; this is what the text encoder sees.
        structure: the vocabulary entry naming the output, or ``None`` for text outside it.
    """

    text: str
    structure: Structure | None


# One row per structure or per left/right pair. A pair row uses "{side}"/"{Side}" in its key, name
# and side-specific synonyms; its synonyms without "{side}" name both sides at once ("renal").
# Columns: key | display name | category (A anatomical, M morphologically altered) |
# SNOMED CT type "code meaning" [/ modifier "code meaning"] | colour R G B | synonyms ("; ").
_TABLE = """
spleen                       | Spleen                            | A | 78961009 Spleen            | 157 108 162 | splenic; lien
kidney_{side}                | {Side} kidney                     | A | 64033007 Kidney            | 185 102 83  | {side} renal; renal
gallbladder                  | Gallbladder                       | A | 28231008 Gallbladder       | 139 150 98  | gall bladder; cholecyst
liver                        | Liver                             | A | 10200004 Liver             | 221 130 101 | hepatic; hepar
stomach                      | Stomach                           | A | 69695003 Stomach           | 216 132 105 | gastric; gaster
pancreas                     | Pancreas                          | A | 15776009 Pancreas          | 249 180 111 | pancreatic
adrenal_gland_{side}         | {Side} adrenal gland              | A | 23451007 Adrenal gland     | 249 186 150 | {side} adrenal; {side} suprarenal gland; adrenal; suprarenal gland
lung_upper_lobe_{side}       | Upper lobe of {side} lung         | A | 45653009 Upper lobe of lung | 172 138 115 | {side} upper lobe; {side} upper lung lobe; {side} lung upper lobe; upper lung lobe
lung_middle_lobe_right       | Middle lobe of right lung         | A | 72481006 Middle lobe of right lung | 202 164 140 | right middle lobe; right middle lung lobe; middle lobe; rml
lung_lower_lobe_{side}       | Lower lobe of {side} lung         | A | 90572001 Lower lobe of lung | 224 186 162 | {side} lower lobe; {side} lower lung lobe; {side} lung lower lobe; lower lung lobe
lung_{side}                  | {Side} lung                       | A | 39607008 Lung              | 197 165 145 | {side} lung lobes
esophagus                    | Esophagus                         | A | 32849002 Esophagus         | 211 171 143 | esophageal; gullet
trachea                      | Trachea                           | A | 44567001 Trachea           | 182 228 255 | windpipe; tracheal
thyroid_gland                | Thyroid gland                     | A | 69748006 Thyroid           | 62 162 114  | thyroid
small_bowel                  | Small bowel                       | A | 30315005 Small Intestine   | 205 167 142 | small intestine; jejunum and ileum
duodenum                     | Duodenum                          | A | 38848004 Duodenum          | 255 253 229 | duodenal
colon                        | Colon                             | A | 71854001 Colon             | 204 168 143 | large bowel; large intestine
urinary_bladder              | Urinary bladder                   | A | 89837001 Urinary bladder   | 222 154 132 | bladder; vesica urinaria
prostate                     | Prostate                          | A | 41216001 Prostate          | 230 158 140 | prostate gland; prostatic
uterus                       | Uterus                            | A | 35039007 Uterus            | 255 181 158 | womb; uterine
heart                        | Heart                             | A | 80891009 Heart             | 206 110 84  | cardiac
aorta                        | Aorta                             | A | 15825003 Aorta             | 224 97 76   | aortic
pulmonary_vein               | Pulmonary veins                   | A | 122972007 Pulmonary vein   | 195 45 25   | pulmonary venous
brachiocephalic_trunk        | Brachiocephalic trunk             | A | 12691009 Brachiocephalic artery | 196 121 79  | brachiocephalic artery; innominate artery
subclavian_artery_{side}     | {Side} subclavian artery          | A | 29700009 Subclavian artery | 216 101 89  | subclavian artery
common_carotid_artery_{side} | {Side} common carotid artery      | A | 32062004 Common carotid artery | 0 112 165   | {side} carotid artery; carotid artery
brachiocephalic_vein_{side}  | {Side} brachiocephalic vein       | A | 8887007 Brachiocephalic vein | 0 161 196   | {side} innominate vein; innominate vein
atrial_appendage_left        | Left atrial appendage             | A | 68786006 Auricular appendage / 7771000 Left | 0 161 196   | left auricular appendage; left auricle
superior_vena_cava           | Superior vena cava                | A | 48345005 Superior vena cava | 0 141 226   | svc
inferior_vena_cava           | Inferior vena cava                | A | 64131007 Inferior vena cava | 0 151 206   | ivc; postcava; vena cava inferior
portal_vein_and_splenic_vein | Portal vein and splenic vein      | A | 110765007 Portal vein and splenic vein | 0 151 206   | portal vein; splenic vein; portal and splenic vein; portal splenic vein
iliac_artery_{side}          | {Side} common iliac artery        | A | 73634005 Common iliac artery | 216 101 79  | {side} iliac artery; iliac artery
iliac_vena_{side}            | {Side} common iliac vein          | A | 46027005 Common iliac vein | 0 151 206   | {side} iliac vein; iliac vein
humerus_{side}               | {Side} humerus                    | A | 85050009 Humerus           | 205 179 108 | {side} upper arm bone
scapula_{side}               | {Side} scapula                    | A | 79601000 Scapula           | 212 188 102 | {side} shoulder blade
clavicula_{side}             | {Side} clavicle                   | A | 51299004 Clavicle          | 205 179 108 | {side} collarbone; {side} collar bone
femur_{side}                 | {Side} femur                      | A | 71341001 Femur             | 255 238 170 | {side} thigh bone; {side} femoral bone
hip_{side}                   | {Side} hip bone                   | A | 29836001 Hip               | 212 188 102 | {side} pelvic bone; {side} os coxae; {side} innominate bone
sacrum                       | Sacrum                            | A | 54735007 Sacrum            | 212 188 102 | sacral bone; os sacrum
spinal_cord                  | Spinal cord                       | A | 2748008 Spinal cord        | 244 214 49  | medulla spinalis; cervical spinal cord
gluteus_maximus_{side}       | {Side} gluteus maximus            | A | 181674001 Gluteus maximus muscle | 192 104 88  | {side} gluteus maximus muscle
gluteus_medius_{side}        | {Side} gluteus medius             | A | 78333006 Gluteus medius muscle | 178 105 76  | {side} gluteus medius muscle
gluteus_minimus_{side}       | {Side} gluteus minimus            | A | 75297007 Gluteus minimus muscle | 178 95 86   | {side} gluteus minimus muscle
autochthon_{side}            | {Side} autochthonous back muscles | A | 244849004 Deep muscle of back | 171 85 68   | {side} erector spinae; {side} deep back muscle; {side} paraspinal muscle
iliopsoas_{side}             | {Side} iliopsoas                  | A | 68455001 Iliopsoas muscle  | 188 95 76   | {side} iliopsoas muscle; {side} psoas
brain                        | Brain                             | A | 12738006 Brain             | 250 250 225 | cerebrum; encephalon
skull                        | Skull                             | A | 89546000 Skull             | 241 213 144 | cranium
sternum                      | Sternum                           | A | 56873002 Sternum           | 244 217 154 | breastbone; breast bone
costal_cartilages            | Costal cartilages                 | A | 50016007 Costal cartilage  | 111 184 210 | rib cartilage
vertebrae                    | Vertebrae                         | A | 51282000 Vertebra          | 212 188 102 | spine; vertebral column; spinal column; backbone
thoracic_spine               | Thoracic spine                    | A | 122495006 Thoracic spine   | 226 202 134 | thoracic vertebra; thoracic spine vertebra; dorsal spine
intervertebral_discs         | Intervertebral discs              | A | 360499006 Intervertebral disc | 150 210 230 | intervertebral disc; spinal disc; disc
hippocampus_anterior         | Anterior hippocampus              | A | 5366008 Hippocampus / 255549009 Anterior | 220 216 20  | hippocampal head; hippocampus head; head of hippocampus; anterior hippocampal
hippocampus_posterior        | Posterior hippocampus             | A | 5366008 Hippocampus / 255551008 Posterior | 220 170 20  | hippocampal body and tail; hippocampus body and tail; body and tail of hippocampus; posterior hippocampal
necrosis                     | Necrosis                          | M | 6574001 Necrosis           | 216 191 216 | necrotic core; necrotic tumour; necrotic tumour core; tumour necrosis
edema                        | Peritumoral edema                 | M | 79654002 Edema             | 140 224 228 | edema; peritumoural edema; perilesional edema; brain edema
non_enhancing_tumour         | Non-enhancing tumour              | M | 108369006 Neoplasm         | 255 200 50  | non enhancing tumour core; nonenhancing tumour
enhancing_tumour             | Enhancing tumour                  | M | 108369006 Neoplasm         | 255 90 90   | contrast enhancing tumour; enhancing tumour core; enhancing lesion
"""

# Vertebra level -> SNOMED CT code and colour (SlicerTotalSegmentator's per-level palette; the
# rib of number n takes the colour of vertebra Tn, as there).
_VERTEBRAE = """
C1 14806007 255 186 107 | C2 39976000 193 99 36 | C3 113205007 167 117 152 | C4 5329002 250 14 116
C5 36978003 118 40 9 | C6 36054005 253 134 125 | C7 87391001 255 0 0
T1 64864005 0 2 145 | T2 53733008 141 186 216 | T3 1626008 30 128 188 | T4 73071006 73 228 202
T5 56401006 8 82 73 | T6 45296009 88 119 255 | T7 62487009 109 0 145 | T8 11068009 164 216 199
T9 82687006 96 188 62 | T10 7610001 26 97 228 | T11 12989004 16 164 144 | T12 23215003 166 89 255
L1 66794005 255 255 1 | L2 14293000 255 144 32 | L3 36470004 157 126 0 | L4 11994002 255 255 128
L5 49668003 117 78 55 | S1 65985001 212 208 122
"""
_RIB_CODES = "48535007 78247007 25888004 25523003 15339008 59558009 24915002 5953002 22565002 77644006 58830002 43993008"
_ORDINALS = "first second third fourth fifth sixth seventh eighth ninth tenth eleventh twelfth".split()
_REGIONS = {"C": "cervical", "T": "thoracic", "L": "lumbar", "S": "sacral"}

# Named groups that are not left/right pairs.
_GROUPS = {"hippocampus": ("hippocampus_anterior", "hippocampus_posterior")}


def _nth(n: int) -> str:
    return f"{n}{'st' if n == 1 else 'nd' if n == 2 else 'rd' if n == 3 else 'th'}"


def _rows():
    """Yield (key, name, category, type, modifier, rgb, synonyms) templates from the tables."""
    for line in _TABLE.strip().splitlines():
        key, name, category, codes, rgb, synonyms = (c.strip() for c in line.split("|"))
        type_text, _, modifier_text = (c.strip() for c in codes.partition(" / "))
        yield key, name, category, type_text, modifier_text, rgb, [s.strip() for s in synonyms.split(";") if s.strip()]
    levels = [text.split() for text in re.split(r"[|\n]", _VERTEBRAE) if text.strip()]
    for level, code, *rgb in levels:
        region, n = _REGIONS[level[0]], int(level[1:])
        synonyms = [f"vertebra {level}", f"{level} vertebral body", f"{_ORDINALS[n - 1]} {region} vertebra",
                    f"{region} vertebra {n}", f"{_nth(n)} {region} vertebra"]
        yield f"vertebrae_{level}", f"{level} vertebra", "A", f"{code} {level} vertebra", "", " ".join(rgb), synonyms
    palette = {level: rgb for level, _, *rgb in levels}
    ordinal_meanings = [o.capitalize() for o in _ORDINALS]
    for n, code in enumerate(_RIB_CODES.split(), start=1):
        ordinal = _ORDINALS[n - 1]
        synonyms = [f"{{side}} {ordinal} rib", f"{{side}} rib {n}", f"{_nth(n)} {{side}} rib", f"{ordinal} {{side}} rib",
                    f"{ordinal} rib", f"rib {n}"]
        yield (f"rib_{{side}}_{n}", f"{{Side}} {_nth(n)} rib", "A", f"{code} {ordinal_meanings[n - 1]} rib", "",
               " ".join(palette[f"T{n}"]), synonyms)


def _code(text: str) -> Code:
    value, meaning = text.split(" ", 1)
    return Code("SCT", value, meaning)


def _build() -> tuple[dict[str, Structure], dict[str, tuple[str, ...]]]:
    """The structures, and every template phrase -> the structure keys it names."""
    structures: dict[str, Structure] = {}
    phrases: dict[str, tuple[str, ...]] = {}
    for key, name, category, type_text, modifier_text, rgb, synonyms in _rows():
        common = dict(
            color_rgb=tuple(int(v) for v in rgb.split()),
            category=ANATOMICAL_STRUCTURE if category == "A" else ALTERED_STRUCTURE,
            type=_code(type_text),
        )
        if "{side}" not in key:
            structures[key] = Structure(key, name, tuple(synonyms), modifier=_code(modifier_text) if modifier_text else None, **common)
            phrases.update({p: (key,) for p in (key, name, *synonyms)})
            continue
        sided = [s for s in synonyms if "{side}" in s]
        pair = []
        for side, modifier in (("right", RIGHT), ("left", LEFT)):
            side_key = key.format(side=side)
            side_synonyms = tuple(s.format(side=side) for s in sided)
            structures[side_key] = Structure(side_key, name.format(side=side, Side=side.capitalize()), side_synonyms, modifier=modifier, **common)
            pair.append(side_key)
        # A pair named without a side: the name/key/synonym templates with the side left out.
        unsided = [t.replace("{side}", "").replace("{Side}", "") for t in (key, name, *sided)]
        phrases.update({p: tuple(pair) for p in unsided + [s for s in synonyms if "{side}" not in s]})
    phrases.update(_GROUPS)
    for structure in structures.values():
        phrases.update({p: (structure.key,) for p in (structure.key, structure.name, *structure.synonyms)})
    return structures, phrases


# ---- matching -------------------------------------------------------------------------------------

_SPELLING = {
    "tumor": "tumour", "tumors": "tumour", "oesophagus": "esophagus", "oesophageal": "esophageal",
    "oedema": "edema", "peritumoural": "peritumoral", "disk": "disc", "disks": "disc", "lt": "left",
    "rt": "right", "vertebrae": "vertebra", "femora": "femur", "hippocampi": "hippocampus",
    "nonenhancing": "non enhancing",
}
_FILLER = frozenset(
    "perform performing segment segmentation segmenting segmented delineate delineation outline contour "
    "contouring label labeling labelling mask find show identify locate extract get give please the a an "
    "of in on at from for to me my i want would like can could you this that ct cect cta mri mr image "
    "scan volume organ structure region both with using sided side whole entire all abdominal abdomen "
    "do".split()
)
_SINGULAR_KEEP = ("ss", "us", "is", "as", "os")


def _singular(word: str) -> str:
    if word.endswith("ies") and len(word) > 4:
        return word[:-3] + "y"
    if word.endswith("s") and len(word) > 3 and not word.endswith(_SINGULAR_KEEP):
        return word[:-1]
    return word


_BOTH_SIDES = re.compile(r"\b(?:left and right|right and left|bilateral)\b")


def _canonical(text: str) -> str:
    """Lower case, punctuation and filler words out, one spelling, singular: the matching form.

    "left and right kidney" loses its sides, so that it names the pair like "kidneys".
    """
    text = _BOTH_SIDES.sub(" ", re.sub(r"[^a-z0-9]+", " ", text.lower()))
    words = " ".join(_SPELLING.get(w, w) for w in text.split()).split()
    return " ".join(w for w in (_singular(w) for w in words) if w not in _FILLER)


STRUCTURES, _PHRASE_TEMPLATES = _build()
_INDEX: dict[str, tuple[str, ...]] = {}
for _phrase, _keys in _PHRASE_TEMPLATES.items():
    _canon = _canonical(_phrase)
    if _INDEX.get(_canon, _keys) != _keys:
        raise AssertionError(f"vocabulary phrase {_phrase!r} names both {_INDEX[_canon]} and {_keys}")
    _INDEX[_canon] = _keys


# MR sequence names are context, not anatomy ("T1 MRI, liver"), unless the whole phrase is a
# structure ("T1 vertebra"): they are dropped only when that makes the phrase match.
_SEQUENCES = frozenset("t1 t2 t1w t2w t1c t1ce flair spir dwi adc pd weighted contrast enhanced sequence".split())


def _without_sequences(canonical: str) -> str:
    return " ".join(w for w in canonical.split() if w not in _SEQUENCES)


def _resolve(text: str) -> tuple[Structure, ...]:
    canonical = _canonical(text)
    keys = _INDEX.get(canonical) or _INDEX.get(_without_sequences(canonical), ())
    return tuple(STRUCTURES[k] for k in keys)


def lookup(key_or_text: str) -> Structure | None:
    """The structure a key, label-map name or phrase names; ``None`` if unknown or if it names
    several (a pair without a side: use :func:`parse_prompts` for those)."""
    if key_or_text in STRUCTURES:
        return STRUCTURES[key_or_text]
    found = _resolve(key_or_text)
    return found[0] if len(found) == 1 else None


# ---- prompts --------------------------------------------------------------------------------------

_LIST_SEPARATORS = re.compile(r"[,;]")
_AND = re.compile(r"\s+(?:and|&|\+|plus)\s+|\s*[&+]\s*", re.IGNORECASE)


def _prompts_for(words: str, found: tuple[Structure, ...]) -> list[Prompt]:
    if len(found) == 1:
        return [Prompt(words, found[0])]
    return [Prompt(s.name.lower(), s) for s in found]


def _parse_part(part: str, words: str) -> list[Prompt]:
    """One comma-separated part; ``words`` is the text to keep when it names one thing."""
    found = _resolve(part)
    if found:
        return _prompts_for(words, found)
    pieces = [p.strip() for p in _AND.split(part) if p.strip()]
    if len(pieces) > 1 and any(_resolve(p) for p in pieces):
        return [q for p in pieces if _without_sequences(_canonical(p)) for q in _parse_part(p, p)]
    return [Prompt(words, None)]


def _parse_line(line: str) -> list[Prompt]:
    found = _resolve(line)
    if found:
        return _prompts_for(line, found)
    # Parts made only of filler ("CT images") are context, not structures.
    parts = [p.strip() for p in _LIST_SEPARATORS.split(line) if _without_sequences(_canonical(p))]
    if len(parts) == 1:
        return _parse_part(parts[0], line)
    return [q for p in parts for q in _parse_part(p, p)] or [Prompt(line, None)]


def parse_prompts(text: str | Sequence[str]) -> list[Prompt]:
    """Free text (one structure per line, or several separated by commas/"and") -> prompts.

    ``text`` is one text or several (each ``--prompt``, list item or line is read alike); a
    structure named more than once comes back once. Raises ``RefSAM3DError`` when nothing is
    named. Unknown text comes back with ``structure=None``; the module docstring lists the rules.

    The texts of the prompts it returns parse back to the same prompts, so a caller may hand
    ``[p.text for p in prompts]`` on (the Slicer module gives them to its worker so).
    """
    texts = [text] if text is None or isinstance(text, str) else list(text)
    lines = [line for item in texts if item is not None for line in str(item).splitlines() if line.strip()]
    if not lines:
        raise RefSAM3DError("Empty prompt: name the structure to segment, e.g. 'liver'.")
    prompts: list[Prompt] = []
    seen: set[str] = set()
    for line in lines:
        for prompt in _parse_line(line.strip()):
            identity = prompt.structure.key if prompt.structure else "?" + _canonical(prompt.text)
            if identity not in seen:
                seen.add(identity)
                prompts.append(prompt)
    return prompts


_TEMPLATES = ("{x}", "perform {x} segmentation", "segment the {x}", "{x} segmentation", "{m} images, {x} segmentation",
              "{x} in {m}", "delineate the {x} on this {m} scan")
_MODALITY_WORDS = {"CT": ("CT",), "MR": ("MRI",), None: ("CT", "MRI")}


def training_phrasings(structure: Structure, modality: str | None = None) -> list[str]:
    """Phrasings of ``structure`` to sample during training, so that free text works at inference.

    The name, each synonym and the key in words, plain and inside sentence templates ("perform
    liver segmentation", "CT images, liver segmentation"). ``modality`` ("CT", "MR" or ``None``
    for both) picks the word used in the templates. Every phrasing parses back to ``structure``.
    """
    names = dict.fromkeys([structure.name.lower(), *structure.synonyms, structure.key.replace("_", " ").lower()])
    phrasings = [structure.name]
    for x in names:
        for template in _TEMPLATES:
            for m in _MODALITY_WORDS[modality] if "{m}" in template else ("",):
                phrasings.append(template.format(x=x, m=m))
    return list(dict.fromkeys(phrasings))
