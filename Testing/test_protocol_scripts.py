"""The measuring scripts' own geometry: the interactive protocol clicks where a structure is deepest
in millimetres (scripts/evaluate_interactive.py), and the model grid's ceiling answers to the grid's
spacing (scripts/model_space_ceiling.py)."""

from __future__ import annotations

import numpy as np
from conftest import load_script

from RefSAM3DLib import preprocess
from RefSAM3DLib.volume import Volume


def test_the_protocols_click_lies_where_the_structure_is_deepest_in_millimetres():
    evaluate_interactive = load_script("evaluate_interactive")
    spacing_kji = (4.0, 1.0, 1.0)  # 4 mm slices, 1 mm pixels, as thick-slice CT
    k, j, i = np.mgrid[0:24, 0:60, 0:90]
    # A ball 12 mm in radius (3 slices, 12 pixels) and, beside it, a slab 7 slices (28 mm) thick but
    # only 8 pixels (8 mm) wide: in voxel steps the slab looks deeper (3.5 against 3), in mm it is 4 mm deep.
    ball = ((k - 12) * 4.0) ** 2 + (j - 30.0) ** 2 + (i - 20.0) ** 2 <= 12.0 ** 2
    slab = (k >= 9) & (k < 16) & (j >= 26) & (j < 34) & (i >= 40) & (i < 85)
    click = evaluate_interactive.most_interior_voxel(ball | slab, spacing_kji)
    assert click[0] == 12 and abs(click[1] - 30) <= 1 and abs(click[2] - 20) <= 1
    in_voxel_steps = evaluate_interactive.most_interior_voxel(ball | slab)
    assert in_voxel_steps[2] >= 40  # what the protocol did before: a click in the thin slab


def test_the_model_grids_ceiling_falls_as_the_grid_coarsens():
    model_space_ceiling = load_script("model_space_ceiling")
    k, j, i = np.mgrid[0:40, 0:64, 0:64]
    spacing = np.array([1.5, 1.5, 2.5])  # (i, j, k) mm
    ball = ((i - 32) * 1.5) ** 2 + ((j - 32) * 1.5) ** 2 + ((k - 20) * 2.5) ** 2 <= 20.0 ** 2
    ijk_to_ras = np.diag([*(-spacing[:2]), spacing[2], 1.0])  # LPS-stored, as DICOM
    image = Volume(np.where(ball, 40.0, -100.0).astype(np.float32), ijk_to_ras, modality="CT")
    label = Volume(ball.astype(np.uint8), ijk_to_ras)

    def ceiling(spacing_mm: float) -> float:
        _, grid = preprocess.to_model_space(image, (spacing_mm,) * 3,
                                            preprocess.IntensitySettings("CT", (-125.0, 275.0), (0.5, 99.5)))
        mask = model_space_ceiling.round_trip(label, grid, 1)
        return 2 * (mask & ball).sum() / (mask.sum() + ball.sum())

    fine, coarse = ceiling(3.0), ceiling(12.0)
    assert fine > 0.97  # a 20 mm ball survives 3 mm voxels
    assert coarse < fine - 0.02  # 12 mm voxels cost it its shape


def test_averaging_runs_means_their_trained_weights_and_refuses_other_models(untrained_model_dir, tmp_path):
    import dataclasses

    import pytest
    import torch

    from RefSAM3DLib.checkpoint import load_model, save_checkpoint
    from RefSAM3DLib.errors import RefSAM3DError
    from RefSAM3DLib.model.build import build_model

    average_checkpoints = load_script("average_checkpoints")
    model = load_model(untrained_model_dir)
    bias = model.mask_decoder.gesture_maps.text_last_bias
    with torch.no_grad():
        bias.fill_(2.0)
    save_checkpoint(model, tmp_path / "run", {"name": "run"})
    averaged = average_checkpoints.average_checkpoints([untrained_model_dir, tmp_path / "run"], tmp_path / "soup")
    assert averaged == ["mask_decoder.gesture_maps.text_last_bias"]  # the only weight the runs disagree on
    soup = load_model(tmp_path / "soup")  # a verified checkpoint folder
    assert soup.mask_decoder.gesture_maps.text_last_bias.item() == 1.0
    assert torch.equal(soup.mask_decoder.hypernetwork.layers[0].weight, model.mask_decoder.hypernetwork.layers[0].weight)
    assert soup.metadata["averaged_from"] == [str(untrained_model_dir), str(tmp_path / "run")]

    other = build_model(dataclasses.replace(model.config, gesture_intensity=False))
    save_checkpoint(other, tmp_path / "other", {"name": "other"})
    with pytest.raises(RefSAM3DError, match="another model config"):
        average_checkpoints.average_checkpoints([untrained_model_dir, tmp_path / "other"], tmp_path / "bad")
    assert not (tmp_path / "bad").exists()
