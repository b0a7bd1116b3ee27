"""Interactive refinement scored on whole volumes: text alone, text + box + one click, corrective clicks.

    python scripts/evaluate_interactive.py --data ../shared/data/btcv_vlalignseg \
        --cases btcv_0005 btcv_0024 btcv_0037 --modality CT --output runs/eval-interactive-btcv
    python scripts/evaluate_interactive.py --model runs/small-continue/best ...

The protocol of the interactive-refinement issue, per case and labelled structure, all through one
``InteractiveSession`` (the volume is encoded once) and scored on the input grid against the
reference label:

* ``text``: the structure's name alone;
* ``box_click``: text + the reference's bounding box + one positive click at its most interior
  voxel (largest distance to the boundary, in millimetres);
* ``click1`` .. ``click3``: ``box_click`` plus 1, 2, 3 simulated corrective clicks, each at the
  most interior voxel of the largest connected error region of the previous answer (positive in
  a missed region, negative in a false positive), accumulating as a user's clicks do;
* ``no_text``: the box and the interior click of ``box_click`` without text ("the structure in
  this box"): what the gestures carry by themselves;
* ``box``: text + the reference's bounding box alone, no click (a Slicer user's ROI by itself).

Writes ``interactive.csv`` (one row per case, structure and stage: Dice, NSD, HD95 and the
predicted / true volume, which tells a gesture that grows a mask from one that shrinks it) and
``interactive.md`` (mean Dice and mean predicted / true volume per structure and stage), and
prints the Markdown.
"""

from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

import numpy as np
from scipy import ndimage

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from RefSAM3DLib.evaluation import case_metrics, default_prompt, select_cases  # noqa: E402
from RefSAM3DLib.inference import model_name, model_version, run_model  # noqa: E402
from RefSAM3DLib.interactive import InteractiveSession  # noqa: E402
from RefSAM3DLib.run_options import RunOptions  # noqa: E402
from RefSAM3DLib.volume_reader import read_volume  # noqa: E402

REFINEMENT = ["text", "box_click", "click1", "click2", "click3"]  # each stage refines the previous one
STAGES = REFINEMENT + ["no_text", "box"]
# The structures whose Dice the issue bounds (text + box + one click >= 0.80 on average).
ISSUE_STRUCTURES = ["spleen", "kidney_right", "kidney_left", "gallbladder", "pancreas", "stomach"]


def most_interior_voxel(region: np.ndarray, spacing_kji=(1.0, 1.0, 1.0)) -> tuple[int, int, int]:
    """``(k, j, i)`` of a non-empty bool region farthest from its boundary, in millimetres.

    Why millimetres: CT and MR slices are 2-8 mm apart and their pixels ~1 mm, so a distance in
    voxel steps takes a slice for a pixel and puts the "most interior" voxel near a structure's
    side (the btcv_0037 stomach: 11.6 mm deep against 24.6 mm for the deepest voxel)."""
    distance = ndimage.distance_transform_edt(np.pad(region, 1), sampling=spacing_kji)[1:-1, 1:-1, 1:-1]
    return tuple(int(v) for v in np.unravel_index(int(np.argmax(distance)), region.shape))


def largest_error_click(prediction: np.ndarray, reference: np.ndarray, spacing_kji=(1.0, 1.0, 1.0)
                        ) -> tuple[tuple[int, int, int], int] | None:
    """The click a careful user makes: inside the largest connected error region, at its most
    interior voxel; label 1 where the region was missed, 0 where it is a false positive."""
    best = None
    for label, error in ((1, reference & ~prediction), (0, prediction & ~reference)):
        components, count = ndimage.label(error)
        if count == 0:
            continue
        sizes = np.bincount(components.ravel())[1:]
        largest = int(np.argmax(sizes)) + 1
        if best is None or sizes[largest - 1] > best[0]:
            best = (sizes[largest - 1], components == largest, label)
    if best is None:
        return None
    return most_interior_voxel(best[1], spacing_kji), best[2]


def kji_to_ras(voxels_kji, ijk_to_ras: np.ndarray) -> np.ndarray:
    """Voxel indices ``(N, 3)`` as (k, j, i) to RAS mm ``(N, 3)``."""
    ijk = np.asarray(voxels_kji, dtype=np.float64).reshape(-1, 3)[:, ::-1]
    return (ijk_to_ras[:3, :3] @ ijk.T).T + ijk_to_ras[:3, 3]


def bounding_box_ras(reference: np.ndarray, ijk_to_ras: np.ndarray) -> list[float]:
    """The reference's voxel bounding box as two opposite RAS corners ``(R1, A1, S1, R2, A2, S2)``."""
    coords = np.argwhere(reference)
    corners = kji_to_ras([coords.min(axis=0), coords.max(axis=0)], ijk_to_ras)
    return corners.ravel().tolist()


def stage_metrics(mask: np.ndarray, reference: np.ndarray, spacing_kji) -> dict[str, float]:
    """``case_metrics`` of one answer and its predicted / true volume."""
    return {**case_metrics(mask, reference, spacing_kji), "volume_ratio": float(mask.sum() / reference.sum())}


def refine_structure(session: InteractiveSession, prompt: str, reference: np.ndarray, spacing_kji) -> dict[str, dict]:
    """Metrics of every stage of the protocol for one structure."""
    ijk_to_ras = session.volume.ijk_to_ras
    results = {}
    mask = session.segment(prompt).segments[0].mask.astype(bool)
    results["text"] = stage_metrics(mask, reference, spacing_kji)
    box = bounding_box_ras(reference, ijk_to_ras)
    clicks_kji, labels = [most_interior_voxel(reference, spacing_kji)], [1]
    for previous, stage in zip(REFINEMENT, REFINEMENT[1:]):
        if stage != "box_click":
            click = largest_error_click(mask, reference, spacing_kji)
            if click is None:  # already exact: the user stops clicking
                results[stage] = results[previous]
                continue
            clicks_kji.append(click[0])
            labels.append(click[1])
        answer = session.segment(prompt, points_ras=kji_to_ras(clicks_kji, ijk_to_ras), point_labels=labels, box_ras=box)
        mask = answer.segments[0].mask.astype(bool)
        results[stage] = stage_metrics(mask, reference, spacing_kji)
    alone = session.segment(None, points_ras=kji_to_ras(clicks_kji[:1], ijk_to_ras), box_ras=box)
    results["no_text"] = stage_metrics(alone.segments[0].mask.astype(bool), reference, spacing_kji)
    boxed = session.segment(prompt, box_ras=box)
    results["box"] = stage_metrics(boxed.segments[0].mask.astype(bool), reference, spacing_kji)
    return results


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", required=True, help="a dataset folder (the layouts refsam3d evaluate reads)")
    parser.add_argument("--cases", nargs="*", help="case ids (default: all)")
    parser.add_argument("--model", default=None, help="model name or folder (default: the bundled model)")
    parser.add_argument("--modality", choices=["CT", "MR"], default=None,
                        help="for cases whose dataset does not state it")
    parser.add_argument("--structures", nargs="*", default=None, help="structure keys (default: every labelled one)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--overlap", type=float, default=RunOptions.overlap,
                        help=f"sliding-window overlap (default {RunOptions.overlap}, the engine's)")
    parser.add_argument("--output", required=True, help="report folder")
    args = parser.parse_args(argv)

    cases = select_cases(args.data, args.cases, args.modality)
    options = RunOptions(device=args.device, model=args.model, overlap=args.overlap)
    model = run_model(options)
    output = Path(args.output)
    output.mkdir(parents=True, exist_ok=True)
    rows = []
    for case in cases:
        image = read_volume(case.image_path, modality=case.modality, frame=case.frame)
        label = read_volume(case.label_path)
        session = InteractiveSession(image, model=model, options=options)
        spacing_kji = image.spacing_mm[::-1]
        for value, key in case.structures.items():
            if args.structures and key not in args.structures:
                continue
            reference = label.array == value
            if not reference.any():
                continue
            for stage, metrics in refine_structure(session, default_prompt(key), reference, spacing_kji).items():
                rows.append({"case": case.case_id, "structure": key, "stage": stage, **metrics})
            print(case.case_id, key, " ".join(f"{r['stage']}={r['dice']:.3f}" for r in rows[-len(STAGES):]), flush=True)

    with open(output / "interactive.csv", "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    report = summary_markdown(rows, f"{model_name(model)} {model_version(model)}", args)
    (output / "interactive.md").write_text(report, encoding="utf-8")
    print(report)
    return 0


def summary_markdown(rows: list[dict], model_label: str, args) -> str:
    """Mean Dice and mean predicted / true volume per structure and stage, and the issue's figure
    (mean Dice of its structures)."""
    structures = sorted({r["structure"] for r in rows})

    def table(metric: str) -> tuple[dict, list[str]]:
        mean = {(s, st): float(np.mean([r[metric] for r in rows if r["structure"] == s and r["stage"] == st]))
                for s in structures for st in STAGES}
        lines = ["| structure | " + " | ".join(STAGES) + " |", "|---|" + "---|" * len(STAGES)]
        lines += [f"| {s} | " + " | ".join(f"{mean[s, st]:.3f}" for st in STAGES) + " |" for s in structures]
        return mean, lines

    dice, dice_lines = table("dice")
    _, volume_lines = table("volume_ratio")
    lines = [f"# Interactive refinement: {model_label}", "",
             f"Data: `{args.data}` cases {', '.join(sorted({r['case'] for r in rows}))}", "",
             "Dice:", "", *dice_lines]
    bounded = [s for s in ISSUE_STRUCTURES if s in structures]
    if bounded:
        lines += ["", "Mean over " + ", ".join(bounded) + ": " +
                  ", ".join(f"{st} {np.mean([dice[s, st] for s in bounded]):.3f}" for st in STAGES)]
    lines += ["", "Predicted / true volume:", "", *volume_lines]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
