"""The bundled default model: present, verified, documented, and segmenting the sample CT."""

import json
import re
from pathlib import Path

import numpy as np
import pytest

from RefSAM3DLib import io
from RefSAM3DLib.checkpoint import BUNDLED_MODEL_DIR, load_model
from RefSAM3DLib.evaluation import case_metrics
from RefSAM3DLib.inference import model_name, segment
from RefSAM3DLib.weights import sha256_file

SAMPLES = Path(__file__).resolve().parents[1] / "RefSAM3DLib" / "samples"
# Measured with the bundled model on the bundled sample CT (see MODEL_CARD.md), minus a margin.
LIVER_DICE_FLOOR = 0.45  # measured 0.559


@pytest.fixture(scope="module")
def bundled():
    return load_model(None)


def test_bundled_weights_match_the_sha256_in_config_and_model_card(bundled):
    record = json.loads((BUNDLED_MODEL_DIR / "config.json").read_text())
    weights = BUNDLED_MODEL_DIR / "model.safetensors"
    assert sha256_file(weights) == record["weights_sha256"]
    assert record["weights_sha256"] in (BUNDLED_MODEL_DIR / "MODEL_CARD.md").read_text()
    assert weights.stat().st_size <= 25 * 2**20
    assert model_name(bundled) == "refsam3d-small-v1"


def test_model_card_states_data_scores_and_that_it_is_not_a_medical_device():
    card = (BUNDLED_MODEL_DIR / "MODEL_CARD.md").read_text()
    assert "not a medical device" in card.lower()
    for dataset in ("BTCV", "CHAOS", "TotalSegmentator"):
        assert dataset in card
    assert re.search(r"\| liver \| 0\.\d+", card, flags=re.IGNORECASE), "per-structure validation Dice table"


def test_bundled_model_finds_the_liver_of_the_sample_ct(bundled):
    volume = io.read_volume(SAMPLES / "ts_example_ct_image.nii.gz")
    label = io.read_volume(SAMPLES / "ts_example_ct_label.nii.gz")
    liver_value = next(int(v) for v, k in json.loads((SAMPLES / "labelmaps.json").read_text())[
        "ts_example_ct_label.nii.gz"].items() if k == "liver")
    result = segment(volume, ["perform liver segmentation"], model=bundled, device="cpu")
    dice = case_metrics(result.segments[0].mask, label.array == liver_value, volume.spacing_mm[::-1])["dice"]
    assert dice >= LIVER_DICE_FLOOR
    assert result.model_name == "refsam3d-small-v1"
    assert np.count_nonzero(result.segments[0].mask) > 0
