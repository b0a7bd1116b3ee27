"""Simulated gestures for training spatial prompts: clicks in the errors, jittered boxes, rounds with text."""

from __future__ import annotations

import json

import pytest
import torch

from RefSAM3DLib.errors import RefSAM3DError
from RefSAM3DLib.training import train
from RefSAM3DLib.training.config import load_config
from RefSAM3DLib.training.gestures import corrective_click, gesture_rounds, jittered_box, most_interior
from RefSAM3DLib.model.prompt_encoder import NO_TEXT_PROMPT
from RefSAM3DLib.training.loop import GestureStep, MultiPromptStep

from test_training import TOY_MODEL

torch.set_num_threads(1)


def cube(shape=(16, 16, 16), low=(4, 4, 4), high=(10, 12, 9)) -> torch.Tensor:
    mask = torch.zeros(shape, dtype=torch.bool)
    mask[low[0]:high[0], low[1]:high[1], low[2]:high[2]] = True
    return mask


def test_a_positive_click_lands_in_the_missed_region_and_a_negative_one_in_the_false_positive():
    target = cube()
    generator = torch.Generator().manual_seed(0)
    too_small = target.clone()
    too_small[4:8] = False  # misses the first 4 slices
    too_big = target | cube(low=(12, 12, 12), high=(16, 16, 16))
    for _ in range(20):
        point, label = corrective_click(too_small, target, generator)
        assert label == 1 and target[tuple(point.long())] and not too_small[tuple(point.long())]
        point, label = corrective_click(too_big, target, generator)
        assert label == 0 and too_big[tuple(point.long())] and not target[tuple(point.long())]
    assert corrective_click(target, target, generator) is None


def test_box_without_jitter_is_the_tight_box_and_jitter_stays_in_the_window():
    mask = cube()
    assert jittered_box(mask, 0.0).tolist() == [4, 4, 4, 9, 11, 8]
    generator = torch.Generator().manual_seed(1)
    boxes = torch.stack([jittered_box(mask, 0.5, generator) for _ in range(50)])
    assert (boxes[:, :3] <= boxes[:, 3:]).all() and boxes.min() >= 0 and boxes.max() <= 15
    assert (boxes != torch.tensor([4.0, 4, 4, 9, 11, 8])).any(dim=1).all()


def test_rounds_accumulate_clicks_and_pad_once_a_structure_is_exact():
    target = torch.stack([cube(), cube(low=(0, 0, 0), high=(3, 3, 3))])
    seen = []

    def decode(points, labels, boxes):
        seen.append((points.shape, labels.clone(), boxes))
        perfect = target[None].float() * 20 - 10  # from round 1 on, every answer is exact
        return perfect

    first = torch.full((1, 2, 16, 16, 16), -10.0)  # text alone found nothing
    rounds = gesture_rounds(decode, first, target, rounds=3, box_prob=1.0, box_jitter=0.0,
                            generator=torch.Generator().manual_seed(0))
    assert len(rounds) == 3
    assert [shape for shape, _, _ in seen] == [(2, 1, 3), (2, 2, 3), (2, 3, 3)]
    assert seen[0][1].tolist() == [[1], [1]]  # missed structures: positive clicks
    assert seen[2][1].tolist() == [[1, -1, -1], [1, -1, -1]]
    assert seen[0][2].tolist() == [[4, 4, 4, 9, 11, 8], [0, 0, 0, 2, 2, 2]]


def test_a_first_click_inside_lands_on_the_structure_even_where_the_text_answer_is_right():
    target = torch.stack([cube(), cube(low=(0, 0, 0), high=(3, 3, 3))])
    exact = target[None].float() * 20 - 10  # the text answer is already exact
    seen = []

    def decode(points, labels, boxes):
        seen.append((points.clone(), labels.clone()))
        return exact

    for inside_click_prob, first_labels in [(0.0, [[-1], [-1]]), (1.0, [[1], [1]])]:
        seen.clear()
        gesture_rounds(decode, exact, target, rounds=2, box_prob=0.0, box_jitter=0.0,
                       inside_click_prob=inside_click_prob, generator=torch.Generator().manual_seed(0))
        points, labels = seen[0]
        assert labels.tolist() == first_labels  # without it, an exact answer gets no click at all
        if inside_click_prob:
            assert all(bool(target[i][tuple(points[i, 0].long())]) for i in range(2))
        assert seen[1][1][:, 1].tolist() == [-1, -1]  # later rounds correct errors: none left


def test_interior_clicks_land_at_the_centre_of_the_structure_and_then_of_the_error():
    target = cube(low=(2, 2, 2), high=(13, 13, 13))[None]  # an 11-voxel cube: its centre is (7, 7, 7)
    half = torch.full((1, 1, 16, 16, 16), -10.0)
    half[0, :, 2:13, 2:13, 2:8] = 10.0  # the answer after the first click: the cube's w < 8 (missed: w 8..12)
    seen = []

    def decode(points, labels, boxes):
        seen.append((points.clone(), labels.clone()))
        return half

    empty = torch.full((1, 1, 16, 16, 16), -10.0)
    gesture_rounds(decode, empty, target, rounds=2, box_prob=0.0, box_jitter=0.0, inside_click_prob=1.0,
                   interior_click_prob=1.0, generator=torch.Generator().manual_seed(0))
    assert seen[0][0][0, 0].tolist() == [7, 7, 7]
    # The second click: positive, in the middle of the missed slab (w 8..12: its centre plane w = 10,
    # 3 voxels from the slab's faces, as are d and h 4..10).
    d, h, w = seen[1][0][0, 1].tolist()
    assert seen[1][1][0, 1] == 1 and w == 10 and 4 <= d <= 10 and 4 <= h <= 10
    # The window's edge counts as outside: a region cut by it is deepest away from the edge.
    assert torch.nonzero(most_interior(cube(low=(0, 0, 0), high=(5, 16, 16)))).tolist() == [
        [2, h, w] for h in range(2, 14) for w in range(2, 14)]


def test_a_box_alone_has_no_click_in_its_first_round_and_clicks_after():
    target = torch.stack([cube(), cube(low=(0, 0, 0), high=(3, 3, 3))])
    empty = torch.full((1, 2) + target.shape[1:], -10.0)  # answers miss both structures
    seen = []

    def decode(points, labels, boxes):
        seen.append((labels.clone(), boxes))
        return empty

    for box_alone_prob, first_labels in [(0.0, [[1], [1]]), (1.0, [[-1], [-1]])]:
        seen.clear()
        gesture_rounds(decode, empty, target, rounds=2, box_prob=1.0, box_jitter=0.0, inside_click_prob=1.0,
                       box_alone_prob=box_alone_prob, generator=torch.Generator().manual_seed(0))
        assert seen[0][0].tolist() == first_labels and seen[0][1] is not None
        assert seen[1][0][:, 1].tolist() == [1, 1]  # the second round clicks in what was missed


def test_round_zero_of_a_gesture_step_is_the_text_only_step(untrained_small_toy):
    model = untrained_small_toy
    image = torch.rand(2, 1, 32, 32, 32)
    texts = [["liver", "spleen"], ["spleen"]]
    targets = [torch.stack([cube((32,) * 3), torch.zeros((32,) * 3, dtype=torch.bool)]), cube((32,) * 3)[None]]
    settings = {"rounds": 2, "box_prob": 0.5, "box_jitter": 0.1, "max_structures": 4, "weight": 1.0,
                "no_text_prob": 0.0, "inside_click_prob": 0.0, "box_alone_prob": 0.0, "interior_click_prob": 0.0}
    with torch.no_grad():
        text_only = MultiPromptStep(model)(image, texts)
        with_gestures = GestureStep(model, settings)(image, texts, targets)
    for logits, pairs in zip(text_only, with_gestures):
        assert torch.equal(pairs[0][0], logits)
        assert len(pairs) == 3 and all(lg.shape[1] == 1 for lg, _ in pairs[1:])  # only present structures


def test_gestures_are_placed_on_the_labels_and_scored_against_the_loss_targets(untrained_small_toy, monkeypatch):
    model = untrained_small_toy
    boxes = []
    decode = model.decode

    def recording(image, features, prompts, points_dhw=None, point_labels=None, boxes_dhw=None):
        boxes.append(boxes_dhw)
        return decode(image, features, prompts, points_dhw=points_dhw, point_labels=point_labels, boxes_dhw=boxes_dhw)

    monkeypatch.setattr(model, "decode", recording)
    labels = torch.stack([cube((32,) * 3), torch.zeros((32,) * 3, dtype=torch.bool)])
    # Partial-volume targets, here deliberately elsewhere: the loss scores against them, while the
    # box a user draws is the labels' box.
    fractions = torch.roll(labels, 5, dims=1).float() * 0.9
    settings = {"rounds": 2, "box_prob": 1.0, "box_jitter": 0.0, "max_structures": 4, "weight": 1.0,
                "no_text_prob": 0.0, "inside_click_prob": 1.0, "box_alone_prob": 0.0, "interior_click_prob": 0.0}
    with torch.no_grad():
        pairs = GestureStep(model, settings)(torch.rand(1, 1, 32, 32, 32), [["liver", "spleen"]], [labels], [fractions])[0]
    assert torch.equal(pairs[0][1], fractions)
    assert len(pairs) == 3 and all(torch.equal(target, fractions[:1]) for _, target in pairs[1:])
    assert boxes[1].tolist() == [[4.0, 4.0, 4.0, 9.0, 11.0, 8.0]]


def test_gesture_rounds_without_text_start_from_an_empty_mask(untrained_small_toy, monkeypatch):
    model = untrained_small_toy
    decoded = []  # (texts, points, labels) of every decode call
    decode = model.decode

    def recording(image, features, prompts, points_dhw=None, point_labels=None, boxes_dhw=None):
        decoded.append((list(prompts.texts), points_dhw, point_labels))
        return decode(image, features, prompts, points_dhw=points_dhw, point_labels=point_labels, boxes_dhw=boxes_dhw)

    monkeypatch.setattr(model, "decode", recording)
    target = cube((32,) * 3)
    settings = {"rounds": 2, "box_prob": 0.0, "box_jitter": 0.0, "max_structures": 4, "weight": 1.0,
                "no_text_prob": 1.0, "inside_click_prob": 0.0, "box_alone_prob": 0.0, "interior_click_prob": 0.0}
    with torch.no_grad():
        pairs = GestureStep(model, settings)(torch.rand(1, 1, 32, 32, 32), [["liver"]], [target[None]])[0]
    assert len(pairs) == 3
    assert decoded[0][0] == ["liver"]  # round 0: the text-only step, unchanged
    assert decoded[1][0] == decoded[2][0] == [NO_TEXT_PROMPT]
    # Nothing was predicted before the first click, so it is a positive click inside the structure.
    first_click = decoded[1][1][0, 0].long()
    assert decoded[1][2].tolist() == [[1]] and bool(target[tuple(first_click)])


@pytest.fixture(scope="module")
def untrained_small_toy():
    from RefSAM3DLib.model import build_model
    from RefSAM3DLib.model.text_encoder import ClipTextEncoder
    from RefSAM3DLib.training.config import model_config

    torch.manual_seed(0)
    config = model_config({"model": {**TOY_MODEL, "text_dim": 32}})
    text = ClipTextEncoder(width=32, heads=2, layers=1, vocab_size=49408, output_dim=32, context_length=32)
    return build_model(config, text_encoder=text).eval()


@pytest.mark.parametrize("section, message", [
    ({"rounds": 0}, r"interactive.rounds must be an integer in 1..20"),
    ({"enabled": "yes"}, "interactive.enabled must be true or false"),
    ({"box_prob": 1.5}, r"interactive.box_prob must be a number in 0.0..1.0"),
    ({"clicks": 3}, r"unknown keys \['clicks'\] in section 'interactive'"),
])
def test_interactive_settings_are_validated(section, message):
    with pytest.raises(RefSAM3DError, match=message):
        load_config({"datasets": [{"name": "x"}], "interactive": section})


def _gesture_config(samples_dir, output):
    return {
        "model": TOY_MODEL, "output": str(output / "run"), "cache": str(output / "cache"),
        "data_root": str(samples_dir),
        "datasets": [{"name": "ts", "root": ".", "modality": "CT", "include": ["ts_example_ct"],
                      "structures": ["liver", "spleen"]}],
        "prompts": {"max_prompts": 2},
        "training": {"steps": 3, "warmup_steps": 1, "checkpoint_every": 100, "validate_every": 100, "seed": 3},
        "augment": {"affine_prob": 0.0, "erase_prob": 0.0, "contrast_prob": 0.0, "brightness_prob": 0.0,
                    "sharpen_prob": 0.0, "posterize_prob": 0.0},
        "interactive": {"enabled": True, "rounds": 2},
    }


def test_a_few_training_steps_with_gestures_record_it_in_the_checkpoint(samples_dir, tmp_path):
    run = train(_gesture_config(samples_dir, tmp_path), device="cpu", progress=False)
    record = json.loads((run / "checkpoint" / "config.json").read_text(encoding="utf-8"))
    assert record["metadata"]["spatial_prompts"] is True and record["metadata"]["step"] == 3
    losses = [float(line.split(",")[1]) for line in (run / "log.csv").read_text(encoding="utf-8").splitlines()[1:]]
    assert len(losses) == 3 and all(loss == loss and loss > 0 for loss in losses)


def test_training_only_the_gesture_parameters_leaves_every_other_weight_as_init_gave_it(samples_dir, tmp_path):
    from safetensors.torch import load_file

    first = train(_gesture_config(samples_dir, tmp_path / "first"), device="cpu", progress=False)
    config = _gesture_config(samples_dir, tmp_path / "second")
    config["training"].update(trainable=["spatial_prompts", "mask_decoder.click_prior"], lr=1e-2)
    second = train(config, init=first / "checkpoint", device="cpu", progress=False)
    before, after = (load_file(next((run / "checkpoint").glob("*.safetensors"))) for run in (first, second))
    assert before.keys() == after.keys()  # the checkpoint still holds every weight
    changed = {name for name in before if not torch.equal(before[name], after[name])}
    assert changed and all(name.startswith(("spatial_prompts.", "mask_decoder.click_prior.")) for name in changed)
    assert "spatial_prompts.point_embeddings.weight" in changed

    config["training"]["trainable"] = ["decoder_of_clicks"]
    with pytest.raises(RefSAM3DError, match="no trainable parameter of this model starts with 'decoder_of_clicks'"):
        train(config, init=first / "checkpoint", device="cpu", progress=False)
    config["training"]["trainable"] = "spatial_prompts"
    with pytest.raises(RefSAM3DError, match="training.trainable must be a list"):
        load_config(config)
