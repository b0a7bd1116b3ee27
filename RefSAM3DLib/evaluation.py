"""Evaluation: Dice, normalised surface Dice and HD95 per case and structure, with MONAI's metrics.

Empty masks follow MONAI's documented behaviour, reported as such (``EMPTY_MASK_POLICY``):

* Dice (``compute_dice``, ``ignore_empty=False``): 1 when prediction and reference are both empty,
  0 when exactly one of them is empty.
* NSD (``compute_surface_dice``): NaN when both are empty, 0 when exactly one is empty.
* HD95 (``compute_hausdorff_distance``, ``percentile=95``): NaN when either mask is empty (MONAI
  warns "this may result in nan/inf distance"; it returns NaN).

Means leave NaN out and the report counts how many values were undefined.
"""

from __future__ import annotations

import csv
import datetime
import math
import warnings
from dataclasses import replace
from pathlib import Path
from typing import Callable, Iterable, Sequence

import monai
import numpy as np
import torch
from monai.metrics import compute_dice, compute_hausdorff_distance, compute_surface_dice

from .atomic import atomic_write
from .datasets import Case, cases_from_path
from .errors import RefSAM3DError
from .inference import model_name, model_version, run_model, segment
from .overlay import write_overlay_png
from .result import LabelResult, Segment
from .run_options import RunOptions
from .vocabulary import lookup
from .volume_reader import read_volume

EMPTY_MASK_POLICY = (
    "Empty masks follow MONAI's documented behaviour: Dice (compute_dice, ignore_empty=False) is 1 "
    "when prediction and reference are both empty and 0 when only one is empty; NSD "
    "(compute_surface_dice) is NaN when both are empty and 0 when only one is empty; HD95 "
    "(compute_hausdorff_distance, percentile 95) is NaN when either is empty. Means leave NaN out; "
    "the 'undefined' columns count them."
)
CSV_COLUMNS = ("case", "structure", "name", "modality", "dice", "nsd", "hd95_mm",
               "reference_ml", "predicted_ml", "prompt")


def case_metrics(prediction: np.ndarray, reference: np.ndarray, spacing_mm: Sequence[float],
                 tolerance_mm: float = 2.0) -> dict[str, float]:
    """Dice, NSD at ``tolerance_mm`` and HD95 in mm of one binary prediction against its reference.

    Args:
        prediction: binary mask, any shape (``(K, J, I)`` for our volumes).
        reference: binary mask of the same shape.
        spacing_mm: voxel size along each array axis, in the array's axis order (for a ``(K, J, I)``
            array that is ``volume.spacing_mm[::-1]``).
        tolerance_mm: NSD boundary tolerance in mm.

    Returns:
        ``{"dice", "nsd", "hd95_mm"}`` as floats; see the module docstring for empty masks.
    """
    prediction = np.asarray(prediction)
    reference = np.asarray(reference)
    if prediction.shape != reference.shape:
        raise RefSAM3DError(
            f"Prediction shape {prediction.shape} differs from reference shape {reference.shape}; "
            "a label must lie on its image's grid."
        )
    spacing = tuple(float(s) for s in spacing_mm)
    if len(spacing) != prediction.ndim or not all(s > 0 and math.isfinite(s) for s in spacing):
        raise RefSAM3DError(f"spacing_mm must give one positive size per array axis, got {spacing_mm}.")
    # (B, C, *spatial) with the structure as the only channel, so include_background=True.
    y_pred = torch.from_numpy(np.ascontiguousarray(prediction > 0, dtype=np.uint8))[None, None]
    y = torch.from_numpy(np.ascontiguousarray(reference > 0, dtype=np.uint8))[None, None]
    with warnings.catch_warnings():
        # MONAI warns for empty masks; the policy above is documented and stated in every report.
        warnings.filterwarnings("ignore", message=".*(is all 0|nan/inf distance).*")
        # MONAI 1.5+ calls its own deprecated get_mask_edges argument; nothing a user can act on.
        warnings.filterwarnings("ignore", message=".*always_return_as_numpy.*", category=FutureWarning)
        dice = compute_dice(y_pred, y, include_background=True, ignore_empty=False)
        nsd = compute_surface_dice(y_pred, y, class_thresholds=[float(tolerance_mm)], include_background=True,
                                   spacing=spacing)
        hd95 = compute_hausdorff_distance(y_pred, y, include_background=True, percentile=95, spacing=spacing)
    return {"dice": float(dice.item()), "nsd": float(nsd.item()), "hd95_mm": float(hd95.item())}


# ---- running ----------------------------------------------------------------------------------------


def default_prompt(structure_key: str) -> str:
    """The prompt used for a structure when none is given: its display name ("Left kidney")."""
    structure = lookup(structure_key)
    return structure.name if structure is not None else structure_key.replace("_", " ")


def _find_segment(result, key: str, prompt: str) -> int | None:
    """The label value (1-based segment number) that answers structure ``key``."""
    for number, answer in enumerate(result.segments, start=1):
        if (answer.structure is not None and answer.structure.key == key) or answer.prompt == prompt:
            return number
    return None


def evaluate(model, dataset_cases: Iterable[Case], output_dir,
             prompts_by_structure: dict[str, str] | None = None, options: RunOptions = RunOptions(),
             progress: Callable[[float, str], None] | None = None, tolerance_mm: float = 2.0,
             worst_cases: int = 3) -> list[dict]:
    """Segment every case, score every labelled structure, write the report and worst-case overlays.

    Each case is ONE ``segment`` run prompting all its labelled structures, and the run's label map
    is scored (each voxel belongs to the most probable prompt), as ``refsam3d segment`` writes it.

    Args:
        model: a loaded RefSAM3D model, or ``None`` for ``options.model``.
        dataset_cases: the cases (:class:`RefSAM3DLib.datasets.Case`).
        output_dir: report folder (``report.csv``, ``report.md``, ``worst_*.png``).
        prompts_by_structure: structure key -> prompt text; default the structure's name.
        options: the segmentation runs' options (device, overlap, threshold, clean-up).
        progress: called with (fraction in [0, 1], message).
        tolerance_mm: NSD tolerance.
        worst_cases: how many cases (lowest mean Dice) get overlay PNGs.

    Returns:
        The report rows (one per case and structure, columns ``CSV_COLUMNS``).
    """
    cases = list(dataset_cases)
    if not cases:
        raise RefSAM3DError("No cases to evaluate; check --data (and --cases).")
    model = run_model(options, model)
    model_label = f"{model_name(model)} {model_version(model)}"
    prompts_by_structure = dict(prompts_by_structure or {})
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    rows: list[dict] = []
    kept: list[tuple[float, str, object, object]] = []  # (mean Dice, case, prediction, reference)

    for index, case in enumerate(cases):
        if progress:
            progress(index / len(cases), f"Case {index + 1}/{len(cases)}: {case.case_id}")
        image = read_volume(case.image_path, modality=case.modality, frame=case.frame)
        label = read_volume(case.label_path)
        if label.shape_kji != image.shape_kji or not np.allclose(label.ijk_to_ras, image.ijk_to_ras, atol=1e-3):
            raise RefSAM3DError(f"{case.case_id}: the label's grid differs from the image's; labels must lie on the image grid.")
        prompts = {key: prompts_by_structure.get(key, default_prompt(key)) for key in case.structures.values()}
        result = segment(image, list(prompts.values()), model=model, options=options)
        spacing_kji = image.spacing_mm[::-1]
        reference_segments = []
        case_rows = []
        for value, key in case.structures.items():
            reference = label.array == value
            # Scored as a user gets it: the run's label map, where overlapping prompts were resolved.
            number = _find_segment(result, key, prompts[key])
            mask = result.label_map == number if number is not None else np.zeros(reference.shape, bool)
            metrics = case_metrics(mask, reference, spacing_kji, tolerance_mm)
            structure = lookup(key)
            case_rows.append({
                "case": case.case_id, "structure": key, "name": structure.name if structure else key,
                "modality": result.reference.modality, **metrics,
                "reference_ml": float(reference.sum()) * image.voxel_volume_ml,
                "predicted_ml": float(np.count_nonzero(mask)) * image.voxel_volume_ml, "prompt": prompts[key],
            })
            reference_segments.append(Segment(key, structure, reference.astype(np.uint8)))
        rows.extend(case_rows)
        mean_dice = float(np.mean([r["dice"] for r in case_rows])) if case_rows else 1.0
        reference_result = LabelResult(image, reference_segments, "reference", case.label_path.name)
        kept = sorted(kept + [(mean_dice, case.case_id, result, reference_result)], key=lambda k: k[0])[:worst_cases]

    worst = []
    for rank, (mean_dice, name, result, reference_result) in enumerate(kept, start=1):
        predicted_png = write_overlay_png(result, output_dir / f"worst_{rank}_{name}.png", overwrite=True)
        reference_png = write_overlay_png(reference_result, output_dir / f"worst_{rank}_{name}_reference.png", overwrite=True)
        worst.append((name, mean_dice, predicted_png.name, reference_png.name))
    write_report(rows, output_dir, tolerance_mm, model_name=model_label, worst=worst)
    if progress:
        progress(1.0, "Evaluation done")
    return rows


def select_cases(data, case_names: Sequence[str] | None = None, modality: str | None = None) -> list[Case]:
    """The cases of the dataset at ``data`` (:func:`datasets.cases_from_path`), only ``case_names``
    when given (RefSAM3DError naming any the data lacks).

    ``modality`` applies to every case that does not state its own (a windowed CT such as the BTCV
    copies has no air voxels, so its modality cannot be guessed from intensities).
    """
    cases = [c if c.modality or not modality else replace(c, modality=modality) for c in cases_from_path(data)]
    if case_names:
        missing = sorted(set(case_names) - {c.case_id for c in cases})
        if missing:
            raise RefSAM3DError(f"Unknown case(s) {', '.join(missing)}; the data holds {', '.join(c.case_id for c in cases)}.")
        cases = [c for c in cases if c.case_id in set(case_names)]
    return cases


def evaluate_command(data, output_dir, options: RunOptions = RunOptions(), case_names: Sequence[str] | None = None,
                     tolerance_mm: float = 2.0, modality: str | None = None) -> Path:
    """``refsam3d evaluate``: returns the path of ``report.md`` (``select_cases`` for the arguments)."""
    evaluate(None, select_cases(data, case_names, modality), output_dir, options=options, tolerance_mm=tolerance_mm)
    return Path(output_dir) / "report.md"


# ---- report -----------------------------------------------------------------------------------------


def _summary(rows: list[dict]) -> dict[str, float]:
    """Means over defined values (NaN left out), their count and the undefined counts."""
    summary: dict[str, float] = {"n": len(rows)}
    for metric in ("dice", "nsd", "hd95_mm"):
        values = np.array([r[metric] for r in rows], dtype=np.float64)
        finite = values[np.isfinite(values)]
        summary[metric] = float(finite.mean()) if finite.size else float("nan")
        summary[f"{metric}_sd"] = float(finite.std()) if finite.size else float("nan")
        summary[f"{metric}_undefined"] = int(values.size - finite.size)
    return summary


def _grouped(rows: list[dict], column: str) -> dict[str, dict[str, float]]:
    groups: dict[str, list[dict]] = {}
    for row in rows:
        groups.setdefault(row[column], []).append(row)
    return {name: _summary(group) for name, group in groups.items()}


def _fmt(value: float, digits: int) -> str:
    return "n/a" if not math.isfinite(value) else f"{value:.{digits}f}"


def _table(title: str, label: str, groups: dict[str, dict[str, float]]) -> list[str]:
    lines = [f"## {title}", "",
             f"| {label} | n | Dice mean ± sd | NSD mean ± sd | HD95 mm mean ± sd | NSD undefined | HD95 undefined |",
             "|---|---|---|---|---|---|---|"]
    for name, s in groups.items():
        lines.append(
            f"| {name} | {s['n']} | {_fmt(s['dice'], 3)} ± {_fmt(s['dice_sd'], 3)} | {_fmt(s['nsd'], 3)} ± "
            f"{_fmt(s['nsd_sd'], 3)} | {_fmt(s['hd95_mm'], 1)} ± {_fmt(s['hd95_mm_sd'], 1)} | "
            f"{s['nsd_undefined']} | {s['hd95_mm_undefined']} |"
        )
    return lines + [""]


def write_report(rows: list[dict], output_dir, tolerance_mm: float, model_name: str = "unknown",
                 worst: Sequence[tuple[str, float, str, str]] = ()) -> tuple[Path, Path]:
    """Write ``report.csv`` (one row per case and structure) and ``report.md`` (means per
    structure and per modality, settings, the empty-mask policy, the model), atomically.

    Args:
        rows: dicts with at least ``case, structure, name, modality, dice, nsd, hd95_mm``.
        output_dir: folder to write into (created if needed).
        tolerance_mm: the NSD tolerance the rows were computed with.
        model_name: model name and version, for the report header.
        worst: ``(case, mean Dice, prediction PNG, reference PNG)`` of the worst cases.
    """
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    csv_path, md_path = output_dir / "report.csv", output_dir / "report.md"
    with atomic_write(csv_path) as temporary:
        with open(temporary, "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=CSV_COLUMNS, extrasaction="ignore")
            writer.writeheader()
            writer.writerows(rows)

    by_structure = _grouped(rows, "name")
    lines = [
        f"# Evaluation report: {model_name}", "",
        f"- Date: {datetime.date.today().isoformat()}",
        f"- Cases: {len({r['case'] for r in rows})}, structures scored: {len(rows)} (case x structure)",
        f"- Metrics: MONAI {monai.__version__} compute_dice, compute_surface_dice (NSD, tolerance "
        f"{tolerance_mm:g} mm), compute_hausdorff_distance (95th percentile, mm); distances use the voxel spacing.",
        f"- {EMPTY_MASK_POLICY}",
        "- Not a medical device; not for clinical use.", "",
    ]
    lines += _table("Mean per structure", "structure", by_structure)
    lines += _table("Mean per modality", "modality", _grouped(rows, "modality"))
    lines += _table("Overall", "all", {"all structures": _summary(rows)} if rows else {})
    if worst:
        lines += ["## Worst cases (lowest mean Dice)", ""]
        lines += [f"- {case}: mean Dice {_fmt(dice, 3)} - prediction `{pred}`, reference `{ref}`" for case, dice, pred, ref in worst]
        lines.append("")
    lines += ["Per case and structure: `report.csv`.", ""]
    with atomic_write(md_path) as temporary:
        Path(temporary).write_text("\n".join(lines), encoding="utf-8")
    return csv_path, md_path
