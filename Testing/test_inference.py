"""The sliding-window engine: one encoder pass per window for all prompts, grid fidelity, cancel."""

import numpy as np
import pytest
import torch

from RefSAM3DLib.errors import Cancelled, RefSAM3DError
from RefSAM3DLib.inference import count_windows, resolve_device, segment
from RefSAM3DLib.model.build import build_model
from RefSAM3DLib.run_options import RunOptions
from RefSAM3DLib.sliding_window import network_precision
from RefSAM3DLib.volume import Volume

CPU = RunOptions(device="cpu")


@pytest.fixture(scope="module")
def untrained_small():
    torch.manual_seed(0)
    return build_model("small").eval()


def oblique_ct(shape_kji=(40, 50, 60)):
    """A CT-like volume with an oblique, flipped, anisotropic IJK-to-RAS matrix and a bright blob."""
    rng = np.random.default_rng(1)
    array = rng.normal(-800, 20, shape_kji).astype(np.int16)
    array[10:30, 15:35, 20:45] = 60
    angle = np.deg2rad(20)
    rotation = np.array([[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0], [0, 0, 1]])
    ijk_to_ras = np.eye(4)
    ijk_to_ras[:3, :3] = rotation @ np.diag([-1.5, 1.2, 3.0])
    ijk_to_ras[:3, 3] = [100.0, -50.0, 20.0]
    return Volume(array, ijk_to_ras, modality="CT", name="oblique")


def count_image_encoder_calls(model):
    calls = []
    handle = model.image_encoder.register_forward_hook(lambda module, inputs, output: calls.append(inputs[0].shape[0]))
    return calls, handle


def test_image_encoder_runs_once_per_window_for_all_prompts(untrained_small):
    volume = oblique_ct()
    calls, handle = count_image_encoder_calls(untrained_small)
    try:
        result = segment(volume, ["liver", "spleen", "left kidney", "aorta"], model=untrained_small, options=CPU)
    finally:
        handle.remove()
    assert len(result.segments) == 4
    assert sum(calls) == count_windows(_model_shape(volume, untrained_small), untrained_small.config.window_size_vox, 0.25)


def _model_shape(volume, model):
    from RefSAM3DLib import preprocess

    return preprocess.model_grid(volume, model.config.spacing_mm).shape_dhw


def test_masks_lie_on_the_input_grid_of_an_oblique_volume(untrained_small):
    volume = oblique_ct()
    result = segment(volume, "liver, spleen", model=untrained_small, options=CPU)
    assert [s.structure.key for s in result.segments] == ["liver", "spleen"]
    for seg in result.segments:
        assert seg.mask.shape == volume.shape_kji
        assert seg.mask.dtype == np.uint8
        assert set(np.unique(seg.mask)) <= {0, 1}
    assert result.reference is volume


def test_progress_is_monotonic_and_ends_at_one(untrained_small):
    fractions = []
    segment(oblique_ct(), ["liver"], model=untrained_small, options=CPU, progress=lambda f, m: fractions.append(f))
    assert fractions[0] == 0.0 and fractions[-1] == 1.0
    assert all(b >= a for a, b in zip(fractions, fractions[1:]))


def test_cancel_stops_within_one_window(untrained_small):
    calls, handle = count_image_encoder_calls(untrained_small)
    polls = []

    def cancel():
        polls.append(1)
        return len(polls) > 1

    try:
        with pytest.raises(Cancelled):
            segment(oblique_ct((80, 80, 80)), ["liver"], model=untrained_small, options=CPU, cancel=cancel)
    finally:
        handle.remove()
    assert sum(calls) == 1


def test_unknown_text_is_still_segmented_with_a_warning(untrained_small):
    result = segment(oblique_ct(), ["the flux capacitor"], model=untrained_small, options=CPU)
    assert result.segments[0].structure is None
    assert any("outside the trained vocabulary" in w for w in result.warnings)


@pytest.mark.parametrize("prompt", ["", "   ", "\n"])
def test_empty_prompt_is_an_error(untrained_small, prompt):
    with pytest.raises(RefSAM3DError):
        segment(oblique_ct(), [prompt], model=untrained_small, options=CPU)


def test_unknown_device_is_an_error():
    with pytest.raises(RefSAM3DError, match="Unknown device"):
        resolve_device("tpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message shown on machines without CUDA")
def test_cuda_without_gpu_is_a_clear_error():
    with pytest.raises(RefSAM3DError, match="--device cpu"):
        resolve_device("cuda")


@pytest.mark.skipif(torch.backends.mps.is_available(), reason="checks the message shown on machines without MPS")
def test_mps_is_offered_by_name_and_refused_clearly_where_absent():
    with pytest.raises(RefSAM3DError, match="MPS.*--device cpu"):
        resolve_device("mps")


def test_volume_smaller_than_one_window_is_padded(untrained_small):
    tiny = Volume(np.full((3, 20, 20), 40, np.int16), np.diag([2.0, 2.0, 2.0, 1.0]), modality="CT")
    result = segment(tiny, ["liver"], model=untrained_small, options=CPU)
    assert result.segments[0].mask.shape == (3, 20, 20)


def test_postprocessing_keeps_the_largest_component_and_fills_holes():
    from RefSAM3DLib.inference import postprocess_mask

    mask = np.zeros((20, 20, 20), np.uint8)
    mask[2:12, 2:12, 2:12] = 1
    mask[6, 6, 6] = 0  # an enclosed hole
    mask[16:18, 16:18, 16:18] = 1  # a small island
    cleaned = postprocess_mask(mask, largest_component=True, fill_holes=True)
    assert cleaned.dtype == np.uint8
    assert cleaned[6, 6, 6] == 1 and cleaned[16, 16, 16] == 0
    assert cleaned.sum() == 1000
    assert postprocess_mask(mask, False, False) is mask


def test_postprocessing_keeps_the_components_of_positive_clicks_besides_the_largest():
    from RefSAM3DLib.inference import postprocess_mask

    mask = np.zeros((20, 20, 20), np.uint8)
    mask[2:12, 2:12, 2:12] = 1  # the largest piece
    mask[15:18, 15:18, 15:18] = 1  # a piece a user clicked
    mask[15:17, 2:4, 2:4] = 1  # a piece nobody clicked
    kept = postprocess_mask(mask, True, False, keep_kji=[(16, 16, 16)])
    assert kept[5, 5, 5] == 1 and kept[16, 16, 16] == 1 and kept[15, 2, 2] == 0
    assert kept.sum() == 1000 + 27
    # A click on the background or on the largest piece keeps the largest alone, as no click does.
    for keep in ([(0, 0, 0)], [(5, 5, 5)], []):
        assert np.array_equal(postprocess_mask(mask, True, False, keep_kji=keep), postprocess_mask(mask, True, False))


def test_a_positive_click_on_the_input_grid_keeps_its_piece_after_resampling(samples_dir):
    """The click is an input-grid voxel; the clean-up runs on a crop of that grid, so the crop's
    offset must be taken off (oblique geometry, anisotropic model grid)."""
    from RefSAM3DLib.inference import mask_on_input
    from RefSAM3DLib.preprocess import model_grid

    volume = oblique_ct()
    grid = model_grid(volume, (3.0, 2.5, 2.0))
    probabilities = np.zeros(grid.shape_dhw, np.float32)
    d, h, w = grid.shape_dhw
    probabilities[d // 4:d // 2, h // 4:h // 2, w // 4:w // 2] = 1.0  # the larger piece
    probabilities[3 * d // 4:3 * d // 4 + 3, 3 * h // 4:3 * h // 4 + 3, 3 * w // 4:3 * w // 4 + 3] = 1.0
    options = RunOptions(largest_component=True)
    unclicked, _, _ = mask_on_input(probabilities, grid, options, one_piece=True)
    everything, _, _ = mask_on_input(probabilities, grid, RunOptions(largest_component=False), one_piece=True)
    small_piece = everything.astype(bool) & ~unclicked.astype(bool)
    assert small_piece.any()
    click = tuple(int(v) for v in np.argwhere(small_piece)[len(np.argwhere(small_piece)) // 2])
    clicked, _, _ = mask_on_input(probabilities, grid, options, one_piece=True, keep_kji=[click])
    assert np.array_equal(clicked, everything)
    # A click outside the crop the clean-up runs on is ignored, not an index error.
    outside, _, _ = mask_on_input(probabilities, grid, options, one_piece=True, keep_kji=[(0, 0, 0)])
    assert np.array_equal(outside, unclicked)


@pytest.mark.parametrize("largest_component, fill_holes", [(True, False), (False, True), (True, True)])
def test_postprocessing_gives_scipy_ndimages_masks(largest_component, fill_holes):
    """SimpleITK's clean-up, face-connected as ndimage's defaults, on ragged random masks."""
    from scipy import ndimage

    from RefSAM3DLib.inference import postprocess_mask

    rng = np.random.default_rng(5)
    for _ in range(10):
        mask = (ndimage.gaussian_filter(rng.random((16, 20, 24)), 1.2) > rng.uniform(0.47, 0.53)).astype(np.uint8)
        expected = mask
        if largest_component:
            components, _ = ndimage.label(expected)
            sizes = np.bincount(components.ravel())
            sizes[0] = 0
            expected = (components == sizes.argmax()).astype(np.uint8)
        if fill_holes:
            expected = ndimage.binary_fill_holes(expected).astype(np.uint8)
        assert np.array_equal(postprocess_mask(mask, largest_component, fill_holes), expected)


def test_structures_the_model_never_trained_on_come_with_a_warning(untrained_small):
    untrained_small.metadata = {"structures": ["liver", "spleen"]}
    try:
        volume = Volume(np.zeros((20, 20, 20), np.float32), np.eye(4), modality="CT")
        result = segment(volume, ["liver", "urinary bladder"], model=untrained_small, options=CPU)
    finally:
        untrained_small.metadata = {}
    assert [w for w in result.warnings if "not among the structures" in w] == [
        w for w in result.warnings if "bladder" in w.lower()]
    assert len([w for w in result.warnings if "not among the structures" in w]) == 1


def test_volume_huge_in_model_space_is_refused_before_resampling(untrained_small, monkeypatch):
    """20^3 voxels of 99 mm: 16 kB on disk, 660^3 at the model's 3 mm (gigabytes once resampled)."""
    volume = Volume(np.zeros((20, 20, 20), np.int16), np.diag([99.0, 99.0, 99.0, 1.0]), "CT")

    def no_resampling(*args, **kwargs):
        raise AssertionError("resampled before the memory check")

    monkeypatch.setattr("RefSAM3DLib.preprocess.to_model_space", no_resampling)
    monkeypatch.setattr("RefSAM3DLib.inference.available_memory_bytes", lambda: 4 * 2**30)  # a 4 GiB machine
    with pytest.raises(RefSAM3DError, match=r"Not enough memory: .* needs about (\d\d|[5-9])\.\d GiB"):
        segment(volume, "liver", model=untrained_small)


@pytest.mark.parametrize("oblique", [False, True])
def test_masks_made_inside_each_structure_box_equal_those_made_on_the_whole_grid(samples_dir, oblique):
    """Cropping to each structure before resampling back must not change a voxel: real CT anatomy
    (the sample CT's liver, spleen, kidneys, stomach and a thin aorta, smoothed into probabilities
    on an anisotropic model grid), as read and with an oblique, flipped geometry."""
    from scipy import ndimage

    from RefSAM3DLib.inference import mask_on_input, postprocess_mask
    from RefSAM3DLib.volume_reader import read_volume
    from RefSAM3DLib.preprocess import from_model_space, labels_to_model_space, model_grid
    from RefSAM3DLib.sliding_window import LabelMapComposer

    labels = read_volume(samples_dir / "ts_example_ct_label.nii.gz", modality="CT")
    if oblique:
        labels = Volume(labels.array, oblique_ct().ijk_to_ras, modality="CT")
    grid = model_grid(labels, (2.0, 2.5, 1.7))
    labels_dhw = labels_to_model_space(labels, grid)
    whole = LabelMapComposer(labels.shape_kji, 6)
    boxed = LabelMapComposer(labels.shape_kji, 6)
    for value, label in enumerate((5, 1, 2, 3, 6, 52), start=1):  # liver, spleen, kidneys, stomach, aorta
        probabilities = ndimage.gaussian_filter((labels_dhw == label).astype(np.float32), 1.2)
        on_input = from_model_space(probabilities, grid)
        expected = postprocess_mask((on_input >= 0.5).astype(np.uint8), True, True)
        whole.add(value, expected, on_input)

        mask, box, inside = mask_on_input(probabilities, grid, RunOptions(largest_component=True, fill_holes=True), True)
        boxed.add(value, mask[box], inside, box)

        assert expected.any() and mask.dtype == np.uint8
        assert np.array_equal(mask, expected), f"label {label}"
        assert np.count_nonzero(mask[box]) == np.count_nonzero(mask)
        assert inside.size < 0.5 * on_input.size  # the work did shrink to the structure
    assert np.array_equal(boxed.labels, whole.labels)


def test_a_structure_that_never_reaches_the_threshold_gives_an_empty_mask_without_resampling(samples_dir):
    from RefSAM3DLib.inference import mask_on_input
    from RefSAM3DLib.preprocess import model_grid

    volume = oblique_ct()
    grid = model_grid(volume, (3.0, 3.0, 3.0))
    mask, box, inside = mask_on_input(np.full(grid.shape_dhw, 0.49, np.float32), grid, RunOptions())
    assert box is None and inside is None
    assert mask.shape == volume.shape_kji and not mask.any()


def test_modality_is_the_stated_one_else_ct_for_hounsfield_units_else_mr_with_a_warning(samples_dir):
    from RefSAM3DLib.inference import decide_modality
    from RefSAM3DLib.volume_reader import read_volume

    ct = read_volume(samples_dir / "ts_example_ct_image.nii.gz")
    mr = read_volume(samples_dir / "ts_example_mr_sm_image.nii.gz")
    decided, warnings = decide_modality(ct)
    assert decided.modality == "CT" and warnings == []
    decided, warnings = decide_modality(mr)
    assert decided.modality == "MR" and len(warnings) == 1 and "--modality" in warnings[0]
    stated = read_volume(samples_dir / "ts_example_ct_image.nii.gz", modality="MR")
    decided, warnings = decide_modality(stated)
    assert decided is stated and warnings == []
    # the result records the modality the run used
    tiny = Volume(np.full((3, 20, 20), 40, np.int16), np.diag([2.0, 2.0, 2.0, 1.0]))
    result = segment(tiny, ["liver"], model=build_model("small").eval(), options=CPU)
    assert result.reference.modality == "MR" and any("treated as MR" in w for w in result.warnings)


@pytest.mark.parametrize("avx512_bf16, amx, expected", [(False, False, False), (True, False, True), (False, True, True)])
def test_network_runs_in_bfloat16_only_on_cpus_that_compute_it_natively(monkeypatch, avx512_bf16, amx, expected):
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
    with network_precision(torch.device("cpu")):
        assert torch.is_autocast_enabled("cpu") == expected
        assert not expected or torch.get_autocast_dtype("cpu") == torch.bfloat16


def test_islands_are_removed_only_from_one_piece_structures_and_only_when_asked():
    from RefSAM3DLib.inference import expand_prompts, segments_on_input
    from RefSAM3DLib.preprocess import model_grid

    volume = Volume(np.zeros((20, 20, 20), np.int16), np.eye(4), modality="CT")
    grid = model_grid(volume, (1.0, 1.0, 1.0))
    blob_and_island = np.zeros((20, 20, 20), np.float32)
    blob_and_island[2:10, 2:10, 2:10] = 0.9
    blob_and_island[15:17, 15:17, 15:17] = 0.9
    parsed, _ = expand_prompts(["spleen", "colon", "enhancing tumour"])
    probabilities = np.stack([blob_and_island] * 3)
    kept = [int(s.mask.sum()) for s in segments_on_input(probabilities, parsed, grid, RunOptions())[0]]
    assert kept == [512, 520, 520]  # the spleen loses its island; bowel and tumours may be several pieces
    everything = segments_on_input(probabilities, parsed, grid, RunOptions(largest_component=False))[0]
    assert [int(s.mask.sum()) for s in everything] == [520, 520, 520]
