"""Evaluation: MONAI metrics checked by hand on tiny volumes, the empty-mask policy, the report."""

import csv
import json
import math

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from RefSAM3DLib.datasets import Case, cases_from_path
from RefSAM3DLib.errors import RefSAM3DError
from RefSAM3DLib.run_options import RunOptions
from RefSAM3DLib.evaluation import (
    EMPTY_MASK_POLICY,
    case_metrics,
    evaluate,
    evaluate_command,
    write_report,
)


def cube(shape, start, size=4):
    mask = np.zeros(shape, dtype=np.uint8)
    mask[tuple(slice(s, s + size) for s in start)] = 1
    return mask


def test_dice_of_two_cubes_offset_by_one_voxel():
    a, b = cube((10, 10, 10), (2, 2, 2)), cube((10, 10, 10), (3, 2, 2))
    overlap = 3 * 4 * 4  # the shift removes one 4x4 layer
    expected = 2 * overlap / (64 + 64)
    assert case_metrics(a, b, (1.0, 1.0, 1.0))["dice"] == pytest.approx(expected)
    assert case_metrics(a, a, (1.0, 1.0, 1.0)) == {"dice": 1.0, "nsd": 1.0, "hd95_mm": 0.0}


def test_hd95_and_nsd_of_a_known_shift_use_the_anisotropic_spacing():
    # Two one-voxel-thick planes, two voxels apart along array axis 0 (3 mm voxels there):
    # every boundary voxel is 2 x 3 = 6 mm from the other plane.
    a = np.zeros((8, 6, 6), dtype=np.uint8)
    b = np.zeros_like(a)
    a[2], b[4] = 1, 1
    spacing = (3.0, 1.0, 1.0)
    assert case_metrics(a, b, spacing)["hd95_mm"] == pytest.approx(6.0)
    assert case_metrics(a, b, spacing[::-1])["hd95_mm"] == pytest.approx(2.0)
    assert case_metrics(a, b, spacing, tolerance_mm=5.9)["nsd"] == pytest.approx(0.0)
    assert case_metrics(a, b, spacing, tolerance_mm=6.0)["nsd"] == pytest.approx(1.0)


def test_nsd_counts_boundary_voxels_within_tolerance():
    # a: plane x=2. b: plane x=2 for y<3, plane x=5 for y>=3 (1 mm voxels).
    a = np.zeros((8, 6, 6), dtype=np.uint8)
    b = np.zeros_like(a)
    a[2] = 1
    b[2, :3], b[5, 3:] = 1, 1
    # a -> b distances: y<3: 0 (18 voxels); y=3,4,5: 1, 2, 3 mm (6 voxels each)
    # b -> a distances: y<3: 0 (18 voxels); x=5 half-plane: 3 mm (18 voxels)
    within = 18 + 6 + 6 + 18  # distances <= 2 mm
    assert case_metrics(a, b, (1.0, 1.0, 1.0), tolerance_mm=2.0)["nsd"] == pytest.approx(within / 72)


@pytest.mark.parametrize(
    "prediction_empty, reference_empty, dice, nsd_is_nan",
    [(True, True, 1.0, True), (True, False, 0.0, False), (False, True, 0.0, False)],
)
def test_empty_masks_follow_the_documented_policy(prediction_empty, reference_empty, dice, nsd_is_nan):
    full = cube((8, 8, 8), (2, 2, 2))
    empty = np.zeros_like(full)
    metrics = case_metrics(empty if prediction_empty else full, empty if reference_empty else full, (1.0, 2.0, 1.0))
    assert metrics["dice"] == dice
    assert math.isnan(metrics["nsd"]) == nsd_is_nan
    if not nsd_is_nan:
        assert metrics["nsd"] == 0.0
    assert math.isnan(metrics["hd95_mm"])
    assert "NaN" in EMPTY_MASK_POLICY


def test_bad_inputs_are_user_errors():
    with pytest.raises(RefSAM3DError, match="shape"):
        case_metrics(np.zeros((4, 4, 4)), np.zeros((4, 4, 5)), (1, 1, 1))
    with pytest.raises(RefSAM3DError, match="spacing"):
        case_metrics(np.zeros((4, 4, 4)), np.zeros((4, 4, 4)), (1, 0, 1))


def rows_for_report():
    return [
        {"case": "a", "structure": "liver", "name": "Liver", "modality": "CT", "dice": 0.9, "nsd": 0.8, "hd95_mm": 4.0},
        {"case": "b", "structure": "liver", "name": "Liver", "modality": "MR", "dice": 0.7, "nsd": 0.6, "hd95_mm": 8.0},
        {"case": "a", "structure": "spleen", "name": "Spleen", "modality": "CT", "dice": 1.0, "nsd": float("nan"),
         "hd95_mm": float("nan")},
    ]


def test_report_has_rows_means_settings_and_policy(tmp_path):
    rows = rows_for_report()
    csv_path, md_path = write_report(rows, tmp_path, tolerance_mm=1.5, model_name="refsam3d-test 0.1")
    with open(csv_path) as handle:
        written = list(csv.DictReader(handle))
    assert [(r["case"], r["structure"]) for r in written] == [(r["case"], r["structure"]) for r in rows]
    report = md_path.read_text(encoding="utf-8")
    liver = [r for r in rows if r["structure"] == "liver"]
    liver_dice = np.mean([r["dice"] for r in liver])
    assert f"| Liver | 2 | {liver_dice:.3f} ±" in report
    ct_hd = np.nanmean([r["hd95_mm"] for r in rows if r["modality"] == "CT"])
    assert f"| CT | 2 | {np.mean([0.9, 1.0]):.3f}" in report and f"{ct_hd:.1f} ±" in report
    # the spleen's undefined NSD and HD95 are counted, not averaged
    assert "| Spleen | 1 | 1.000 ± 0.000 | n/a ± n/a | n/a ± n/a | 1 | 1 |" in report
    assert "1.5 mm" in report and EMPTY_MASK_POLICY in report and "refsam3d-test 0.1" in report
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.csv", "report.md"]


def test_cases_from_the_bundled_folder_pairs(samples_dir):
    cases = {c.case_id: c for c in cases_from_path(samples_dir)}
    assert {"ts_example_ct", "ct3slice", "msd_spleen_2_crop", "chaos_t2spir_01", "ts_example_mr_sm"} <= set(cases)
    assert cases["ct3slice"].structures == {1: "liver", 2: "thoracic_spine"}
    assert cases["ts_example_ct"].image_path.name == "ts_example_ct_image.nii.gz"
    assert cases["ts_example_ct"].structures[3] == "kidney_left"
    assert cases["ts_example_ct"].modality is None  # the engine decides from the image


def write_case(folder, name, shape_kji=(24, 32, 32), spacing=(2.0, 2.0, 3.0)):
    rng = np.random.default_rng(0)
    image = rng.normal(-900, 10, shape_kji).astype(np.int16)
    label = np.zeros(shape_kji, dtype=np.uint8)
    label[8:16, 8:20, 6:18], label[8:16, 20:28, 20:28] = 1, 2
    image[label == 1], image[label == 2] = 60, 45
    paths = []
    for array, kind in ((image, "image"), (label, "label")):
        itk = sitk.GetImageFromArray(array)
        itk.SetSpacing(spacing)
        paths.append(folder / f"{name}_{kind}.nii.gz")
        sitk.WriteImage(itk, str(paths[-1]))
    return paths


def test_cases_from_msd_dataset_json(tmp_path):
    (tmp_path / "imagesTr").mkdir()
    (tmp_path / "labelsTr").mkdir()
    dataset = {"name": "Spleen", "modality": {"0": "CT"}, "labels": {"0": "background", "1": "spleen"},
               "training": [{"image": "./imagesTr/spleen_2.nii.gz", "label": "./labelsTr/spleen_2.nii.gz"}]}
    (tmp_path / "dataset.json").write_text(json.dumps(dataset))
    write_case(tmp_path / "imagesTr", "spleen_2")[0].rename(tmp_path / "imagesTr" / "spleen_2.nii.gz")
    write_case(tmp_path / "labelsTr", "spleen_2")[1].rename(tmp_path / "labelsTr" / "spleen_2.nii.gz")
    for data in (tmp_path, tmp_path / "dataset.json"):
        (case,) = cases_from_path(data)
        assert (case.case_id, case.structures, case.modality, case.frame) == ("spleen_2", {1: "spleen"}, "CT", None)
        assert case.label_path == tmp_path / "labelsTr" / "spleen_2.nii.gz"
    dataset["modality"] = {"0": "FLAIR", "1": "T1w"}  # multi-channel: the first channel is read
    (tmp_path / "dataset.json").write_text(json.dumps(dataset))
    (case,) = cases_from_path(tmp_path)
    assert (case.modality, case.frame) == ("MR", 0)


def test_evaluate_writes_report_and_worst_case_overlays(tmp_path):
    from RefSAM3DLib.model.build import build_model

    torch.manual_seed(0)
    model = build_model("small").eval()
    data = tmp_path / "data"
    data.mkdir()
    image_path, label_path = write_case(data, "synthetic")
    case = Case("synthetic", "synthetic", image_path, label_path, {1: "liver", 2: "spleen"}, "CT", "synthetic")
    fractions = []
    rows = evaluate(model, [case], tmp_path / "report", options=RunOptions(device="cpu"), progress=lambda f, m: fractions.append(f))
    assert [(r["case"], r["structure"]) for r in rows] == [("synthetic", "liver"), ("synthetic", "spleen")]
    assert all(0.0 <= r["dice"] <= 1.0 for r in rows)
    assert rows[0]["reference_ml"] == pytest.approx(8 * 12 * 12 * 2 * 2 * 3 / 1000)
    written = sorted(p.name for p in (tmp_path / "report").iterdir())
    assert written == ["report.csv", "report.md", "worst_1_synthetic.png", "worst_1_synthetic_reference.png"]
    assert fractions[-1] == 1.0
    (data / "labelmaps.json").write_text(json.dumps({"synthetic_label.nii.gz": {"1": "liver"}}))
    with pytest.raises(RefSAM3DError, match="Unknown case"):
        evaluate_command(data, tmp_path / "other", RunOptions(device="cpu"), case_names=["nope"])
