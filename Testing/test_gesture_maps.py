"""Gestures drawn as maps (model/gesture_maps.py): what each map says, the term stays on the crop
the gesture reaches, padding and prompts without a gesture get none, gradients reach the MLP, its
text biases tell prompts with text from those without, the intensity maps mark the clicked
intensity, and a model that gains the part (or its text biases, or its intensity weights) answers
exactly as before until it trains."""

from __future__ import annotations

import torch
from conftest import assert_every_parameter_learns

from RefSAM3DLib.model import MODEL_CONFIGS
from RefSAM3DLib.model.gesture_maps import BOX_REACH_VOX, FAR_SIGMA_VOX, MAP_CHANNELS, GestureMaps, draw_maps
from RefSAM3DLib.model.prompt_encoder import NO_TEXT_PROMPT

torch.set_num_threads(1)
SIZE = 40


def test_the_maps_mark_the_box_the_clicks_and_the_tissue_that_looks_like_the_clicked_voxel():
    features = torch.zeros(1, 2, SIZE, SIZE, SIZE)
    features[:, 0, :, :, :20] = 1.0  # tissue A where w < 20, tissue B (orthogonal) elsewhere
    features[:, 1, :, :, 20:] = 1.0
    clicks = torch.tensor([[10.0, 10.0, 5.0], [30.0, 30.0, 30.0]])
    box = torch.tensor([15.0, 15.0, 12.0, 5.0, 5.0, 2.0])  # corners in any order
    maps = draw_maps(features, clicks, torch.tensor([1, 0]), box, [0, 0, 0])[0]
    assert maps.shape == (7, SIZE, SIZE, SIZE)
    box_map, near_pos, near_neg, far_pos, far_neg, like_pos, like_neg = maps
    assert box_map[10, 10, 10] == 1 and box_map[10, 10, 13] == -1 and box_map[16, 10, 10] == -1
    assert near_pos[10, 10, 5] == 1 and near_neg[30, 30, 30] == 1 and near_pos[30, 30, 30] < 1e-6
    assert far_pos[10, 10, 11] > near_pos[10, 10, 11] > 0  # the far map reaches further
    assert like_pos[0, 0, 0] == 1 and like_pos[0, 0, 25] == 0  # A like the positive click, B not
    assert like_neg[39, 39, 39] == 1 and like_neg[39, 39, 0] == 0
    # Offset crops draw the same maps (window coordinates throughout).
    crop = draw_maps(features[..., 8:, 4:, 2:], clicks, torch.tensor([1, 0]), box, [8, 4, 2])[0]
    assert torch.allclose(crop, maps[:, 8:, 4:, 2:])


def trained_head() -> GestureMaps:
    torch.manual_seed(0)
    head = GestureMaps(4, text_biases=True)
    torch.nn.init.normal_(head.text_first_bias)
    torch.nn.init.normal_(head.text_last_bias)
    torch.nn.init.normal_(head.head[-1].weight)
    torch.nn.init.constant_(head.head[-1].bias, 0.5)
    return head


def test_the_term_stays_on_the_crop_the_gesture_reaches_and_needs_a_click():
    head = trained_head()
    features, coarse = torch.randn(1, 4, SIZE, SIZE, SIZE), torch.randn(1, 3, SIZE, SIZE, SIZE)
    points = torch.tensor([[[8.0, 8.0, 8.0]], [[0.0, 0.0, 0.0]], [[0.0, 0.0, 0.0]]])
    labels = torch.tensor([[1], [-1], [-1]])  # prompt 0 clicked; 1 and 2 padding only
    boxes = torch.tensor([[30.0, 30.0, 30.0, 34.0, 34.0, 34.0]] * 3)
    with torch.no_grad():
        changed = (head(features, coarse, points, labels, boxes) - coarse).abs() > 0
        clicks_only = (head(features, coarse, points, labels, None) - coarse).abs() > 0
        boxes_alone = (head(features, coarse, None, None, boxes) - coarse).abs() > 0
    reach = int(3 * FAR_SIGMA_VOX)
    assert clicks_only[0, 0, 8, 8, 8] and clicks_only[0, 0, 8 + reach + 1:].sum() == 0
    assert not clicks_only[0, 1:].any()  # padding alone is no gesture
    # With its click, the box's term reaches BOX_REACH_VOX beyond it and no further.
    assert changed[0, 0, 30, 30, 30] and changed[0, 0, 34 + BOX_REACH_VOX, 34, 34]
    assert changed[0, 0, 34 + BOX_REACH_VOX + 1:].sum() == 0
    # A box without a click (padding only, or no points at all) gets no term: never trained.
    assert not changed[0, 1:].any() and not boxes_alone.any()


def test_gradients_reach_every_weight_of_the_mlp():
    head = trained_head()
    features = torch.randn(1, 4, SIZE, SIZE, SIZE)
    out = head(features, torch.zeros(1, 1, SIZE, SIZE, SIZE), torch.tensor([[[20.0, 20.0, 20.0]]]),
               torch.tensor([[1]]), torch.tensor([[10.0, 10.0, 10.0, 30.0, 30.0, 30.0]]))
    out.sum().backward()
    assert_every_parameter_learns(head)


def test_the_text_biases_change_the_term_of_prompts_with_text_only():
    head = trained_head()
    features, coarse = torch.randn(1, 4, SIZE, SIZE, SIZE), torch.randn(1, 2, SIZE, SIZE, SIZE)
    points, labels = torch.tensor([[[20.0, 20.0, 20.0]]] * 2), torch.tensor([[1], [1]])
    with torch.no_grad():
        mixed = head(features, coarse, points, labels, None, has_text=[True, False])
        all_text = head(features, coarse, points, labels, None)  # None: every prompt has text
        head.text_first_bias.zero_()
        head.text_last_bias.zero_()
        ignored = head(features, coarse, points, labels, None, has_text=[True, False])
    assert torch.equal(mixed[:, 0], all_text[:, 0]) and not torch.equal(mixed[:, 1], all_text[:, 1])
    assert torch.equal(mixed[:, 1], ignored[:, 1]) and not torch.equal(mixed[:, 0], ignored[:, 0])


def test_a_model_gaining_the_gesture_maps_answers_exactly_as_before_until_it_trains(model_gaining):
    older, grown = model_gaining("gesture_maps")
    assert older.mask_decoder.gesture_maps is None and isinstance(grown.mask_decoder.gesture_maps, GestureMaps)
    assert all(n.startswith("mask_decoder.gesture_maps.") for n in
               set(grown.trainable_state_dict()) - set(older.trainable_state_dict()))
    size = MODEL_CONFIGS["small"].window_size_vox
    image = torch.rand(1, 1, size, size, size)
    gesture = dict(points_dhw=torch.tensor([[[40.0, 40.0, 40.0]]]), point_labels=torch.tensor([[1]]),
                   boxes_dhw=torch.tensor([[30.0, 30.0, 30.0, 50.0, 50.0, 50.0]]))
    with torch.no_grad():
        assert torch.equal(older(image, ["liver"]), grown(image, ["liver"]))
        assert torch.equal(older(image, ["liver"], **gesture), grown(image, ["liver"], **gesture))
        torch.nn.init.normal_(grown.mask_decoder.gesture_maps.head[-1].weight)
        assert torch.equal(older(image, ["liver"]), grown(image, ["liver"]))  # text never reaches it
        assert not torch.equal(older(image, ["liver"], **gesture), grown(image, ["liver"], **gesture))


def share_a_trained_mlp(older, grown):
    """Give both models the same trained gesture-map MLP; returns a window and a click on it."""
    torch.nn.init.normal_(older.mask_decoder.gesture_maps.head[-1].weight)
    grown.mask_decoder.gesture_maps.head.load_state_dict(older.mask_decoder.gesture_maps.head.state_dict())
    size = MODEL_CONFIGS["small"].window_size_vox
    image = torch.rand(1, 1, size, size, size)
    return image, dict(points_dhw=torch.tensor([[[40.0, 40.0, 40.0]]]), point_labels=torch.tensor([[1]]))


def test_a_model_gaining_the_text_biases_answers_exactly_as_before_until_it_trains(model_gaining):
    older, grown = model_gaining("gesture_text_biases")
    assert older.mask_decoder.gesture_maps.text_first_bias is None
    assert set(grown.trainable_state_dict()) - set(older.trainable_state_dict()) == {
        "mask_decoder.gesture_maps.text_first_bias", "mask_decoder.gesture_maps.text_last_bias"}
    image, gesture = share_a_trained_mlp(older, grown)
    with torch.no_grad():
        for prompt in ("liver", NO_TEXT_PROMPT):
            assert torch.equal(older(image, [prompt], **gesture), grown(image, [prompt], **gesture))
        torch.nn.init.normal_(grown.mask_decoder.gesture_maps.text_last_bias)
        assert not torch.equal(older(image, ["liver"], **gesture), grown(image, ["liver"], **gesture))
        assert torch.equal(older(image, [NO_TEXT_PROMPT], **gesture), grown(image, [NO_TEXT_PROMPT], **gesture))


def test_the_intensity_maps_mark_the_voxels_as_bright_as_the_clicked_one():
    image = torch.full((1, 1, SIZE, SIZE, SIZE), 0.3)
    image[..., 20:] = 0.6  # bile-like tissue where w < 20, brighter tissue elsewhere (0.3 apart: 120 HU)
    features = torch.randn(1, 2, SIZE, SIZE, SIZE)
    clicks, labels = torch.tensor([[10.0, 10.0, 5.0], [30.0, 30.0, 30.0]]), torch.tensor([1, 0])

    def intensity_maps(image, clicks, labels, origin):
        crop = features[..., origin[0]:, origin[1]:, origin[2]:]
        with_image = draw_maps(crop, clicks, labels, None, origin, image)
        assert torch.equal(with_image[:, :MAP_CHANNELS], draw_maps(crop, clicks, labels, None, origin))
        return with_image[0, MAP_CHANNELS:]

    maps = intensity_maps(image, clicks, labels, [0, 0, 0])
    image_map, same_pos, same_neg = maps
    assert torch.equal(image_map, image[0, 0])
    assert same_pos[39, 0, 0] == 1 and same_pos[0, 0, 25] < 1e-6  # far but alike; near but not
    assert same_neg[0, 0, 39] == 1 and same_neg[39, 39, 0] < 1e-6
    positives_only = intensity_maps(image, clicks[:1], labels[:1], [0, 0, 0])
    assert torch.equal(positives_only[1], same_pos) and not positives_only[2].any()
    # Several clicks of a kind: each voxel compares with its nearest one's intensity.
    two = intensity_maps(image, torch.tensor([[10.0, 10.0, 5.0], [10.0, 10.0, 25.0]]), torch.tensor([1, 1]), [0, 0, 0])
    assert two[1, 10, 10, 12] == 1 and two[1, 10, 10, 30] == 1
    assert two[1, 10, 10, 17] < 1e-6  # dark, but nearer the click in the bright tissue
    # Offset crops draw the same maps (window coordinates throughout).
    crop = intensity_maps(image[..., 8:, 4:, 2:], clicks, labels, [8, 4, 2])
    assert torch.allclose(crop, maps[:, 8:, 4:, 2:])


def test_the_intensity_weights_change_the_term_and_learn():
    head = trained_head()
    torch.manual_seed(1)
    with_intensity = GestureMaps(4, text_biases=True, intensity=True)
    with_intensity.load_state_dict(head.state_dict(), strict=False)
    features, coarse = torch.randn(1, 4, SIZE, SIZE, SIZE), torch.randn(1, 1, SIZE, SIZE, SIZE)
    image = torch.rand(1, 1, SIZE, SIZE, SIZE)
    gesture = (torch.tensor([[[20.0, 20.0, 20.0]]]), torch.tensor([[1]]), None)
    with torch.no_grad():  # zero at first: the term of the MLP without them
        assert torch.equal(head(features, coarse, *gesture), with_intensity(features, coarse, *gesture, image=image))
    torch.nn.init.normal_(with_intensity.intensity_in.weight)
    out = with_intensity(features, coarse, *gesture, image=image)
    assert not torch.equal(out, head(features, coarse, *gesture))
    out.sum().backward()
    assert_every_parameter_learns(with_intensity)


def test_a_model_gaining_the_intensity_weights_answers_exactly_as_before_until_it_trains(model_gaining):
    older, grown = model_gaining("gesture_intensity")
    assert older.mask_decoder.gesture_maps.intensity_in is None
    assert set(grown.trainable_state_dict()) - set(older.trainable_state_dict()) == {
        "mask_decoder.gesture_maps.intensity_in.weight"}
    image, gesture = share_a_trained_mlp(older, grown)
    with torch.no_grad():
        assert torch.equal(older(image, ["liver"], **gesture), grown(image, ["liver"], **gesture))
        torch.nn.init.normal_(grown.mask_decoder.gesture_maps.intensity_in.weight)
        assert torch.equal(older(image, ["liver"]), grown(image, ["liver"]))  # text never reaches it
        assert not torch.equal(older(image, ["liver"], **gesture), grown(image, ["liver"], **gesture))
