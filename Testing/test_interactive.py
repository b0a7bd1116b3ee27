"""The interactive session: one encoding, many answers; gestures reach the decoder in window voxels."""

import numpy as np
import pytest
import torch

from RefSAM3DLib.errors import RefSAM3DError
from RefSAM3DLib.geometry import box_ras_to_dhw
from RefSAM3DLib.inference import segment
from RefSAM3DLib.interactive import InteractiveSession, pad_to_window
from RefSAM3DLib.model import build_model
from RefSAM3DLib.model.text_encoder import ClipTextEncoder
from RefSAM3DLib.run_options import RunOptions
from RefSAM3DLib.volume import Volume
from test_inference import oblique_ct as oblique_ct_volume

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def tiny(tiny_sam_config):
    """The tiny vit_b-shaped network (32^3 windows at 1 mm) with random weights, no files."""
    torch.manual_seed(0)
    text = ClipTextEncoder(width=32, heads=2, layers=1, vocab_size=49408, output_dim=32, context_length=16)
    return build_model(tiny_sam_config, text_encoder=text).eval()


@pytest.fixture(scope="module")
def oblique_ct():
    """The oblique CT with its air made fat (-50 HU): all body, so the body crop keeps its whole
    grid and the several windows these tests need."""
    volume = oblique_ct_volume((20, 30, 26))
    array = np.where(volume.array < -500, volume.array + 750, volume.array).astype(np.int16)
    return Volume(array, volume.ijk_to_ras, modality="CT", name=volume.name)


@pytest.fixture(scope="module")
def session(tiny, oblique_ct):
    return InteractiveSession(oblique_ct, model=tiny, options=RunOptions(device="cpu"))


def centre_ras(volume: Volume) -> np.ndarray:
    centre = (np.array(volume.shape_kji[::-1]) - 1) / 2.0
    return (volume.ijk_to_ras @ np.append(centre, 1.0))[:3]


def test_text_alone_equals_the_engine_on_the_same_volume(session, tiny, oblique_ct):
    engine = segment(oblique_ct, "liver", model=tiny, options=RunOptions(device="cpu"))
    answer = session.segment("liver")
    np.testing.assert_array_equal(answer.segments[0].mask, engine.segments[0].mask)
    assert answer.segments[0].mask.shape == oblique_ct.shape_kji
    assert answer.model_name == engine.model_name


def test_several_structures_equal_the_engine_label_map_included(session, tiny, oblique_ct, monkeypatch):
    # 0.4: the random network's masks all cover the body, so the label map's choice is what differs.
    options = RunOptions(device="cpu", threshold=0.4)
    engine = segment(oblique_ct, "liver, spleen, aorta", model=tiny, options=options)
    monkeypatch.setattr(session, "options", options)
    answer = session.segment("liver, spleen, aorta")
    assert [s.structure.key for s in answer.segments] == ["liver", "spleen", "aorta"]
    for mine, theirs in zip(answer.segments, engine.segments):
        np.testing.assert_array_equal(mine.mask, theirs.mask)
    np.testing.assert_array_equal(answer.label_map, engine.label_map)
    assert set(np.unique(engine.label_map)) - {0} == {1, 2, 3}, "the label map must hold several structures to compare"


def test_gestures_never_run_the_image_encoder_again(session):
    calls = []
    handle = session.model.image_encoder.register_forward_hook(lambda *args: calls.append(1))
    try:
        session.segment("liver", points_ras=[centre_ras(session.volume)], point_labels=[0])
        session.segment(None, box_ras=np.concatenate([centre_ras(session.volume) - 10, centre_ras(session.volume) + 10]))
    finally:
        handle.remove()
    assert calls == [] and session.window_count > 1


def test_a_click_reaches_every_window_holding_it_at_its_window_voxel(session, monkeypatch):
    point = centre_ras(session.volume)
    expected_dhw = np.linalg.solve(session.grid.model.ijk_to_ras, np.append(point, 1.0))[:3][::-1] + session.pad_before
    seen = record_decoded_gestures(session, monkeypatch)
    session.segment("liver", points_ras=[point], point_labels=[1])
    starts = [start for start in session._features
              if np.all((expected_dhw - start >= -0.5) & (expected_dhw - start < session.window - 0.5))]
    clicked = [s for s in seen if "points_dhw" in s]
    assert len(clicked) == len(starts) >= 1 and len(seen) <= session.window_count
    locals_ = sorted(tuple(np.round(s["points_dhw"][0, 0].numpy(), 3)) for s in clicked)
    assert locals_ == sorted(tuple(np.round(expected_dhw - np.array(start), 3)) for start in starts)
    assert all(s["point_labels"].tolist() == [[1]] for s in clicked)


def corner_ras(volume: Volume) -> np.ndarray:
    return (volume.ijk_to_ras @ np.array([1.0, 1.0, 1.0, 1.0]))[:3]


def test_cached_answers_stay_the_engines_and_a_fresh_sessions(tiny, oblique_ct, monkeypatch):
    """The session keeps each window's text-only answer and text embedding for the prompt being
    refined: a gesture decodes only the windows it touches (and none beyond a box's reach), yet
    every answer is the one a session without that cache gives."""
    options = RunOptions(device="cpu", threshold=0.4)
    engine = segment(oblique_ct, "liver", model=tiny, options=options).segments[0].mask
    cached = InteractiveSession(oblique_ct, model=tiny, options=options)
    click = dict(points_ras=[corner_ras(oblique_ct)], point_labels=[1])
    box = dict(box_ras=np.concatenate([corner_ras(oblique_ct) - 3.0, corner_ras(oblique_ct) + 3.0]))
    decoded = []
    decode = tiny.decode
    monkeypatch.setattr(tiny, "decode", lambda *args, **kwargs: decoded.append(1) or decode(*args, **kwargs))
    answers = {}
    for name, gesture in [("text", {}), ("click", click), ("text again", {}), ("box", box), ("text last", {})]:
        decoded.clear()
        answers[name] = cached.segment("liver", **gesture).segments[0].mask
        answers[name, "decoded"] = len(decoded)
    assert answers["text", "decoded"] == cached.window_count > answers["click", "decoded"] >= 1
    assert answers["text again", "decoded"] == answers["text last", "decoded"] == 0
    assert answers["box", "decoded"] < cached.window_count
    for name in ("text", "text again", "text last"):  # MONAI weights each window's answer in place
        np.testing.assert_array_equal(answers[name], engine)
    for name, gesture in [("click", click), ("box", box)]:
        fresh = InteractiveSession(oblique_ct, model=tiny, options=options)
        np.testing.assert_array_equal(answers[name], fresh.segment("liver", **gesture).segments[0].mask)
    assert answers["click"].any() and not np.array_equal(answers["box"], engine)
    # Several structures cannot be refined: their answers are not kept, and the refined one's stay.
    for texts in ("liver, spleen", "liver, spleen", "liver"):
        decoded.clear()
        cached.segment(texts)
        assert len(decoded) == (0 if texts == "liver" else cached.window_count), texts


def test_without_text_windows_the_gesture_misses_contribute_nothing(session):
    mask = session.segment(None, points_ras=[corner_ras(session.volume)]).segments[0].mask
    far_corner = mask[-3:, -3:, -3:]
    assert not far_corner.any()


def record_decoded_gestures(session, monkeypatch) -> list[dict]:
    """Each decoded window's spatial arguments (window voxels), as the decoder receives them."""
    seen = []
    decode = session.model.decode

    def recording(image, features, prompts, **spatial):
        seen.append({k: v.clone() for k, v in spatial.items()})
        return decode(image, features, prompts, **spatial)

    monkeypatch.setattr(session.model, "decode", recording)
    return seen


def box_on_model_grid(session, box_ras) -> np.ndarray:
    """The box ``(6,)`` in voxels of the padded model-space image the windows are cut from."""
    return box_ras_to_dhw(box_ras, session.volume, session.grid.model) + np.tile(session.pad_before, 2)


def test_a_box_gesture_is_answered_by_the_windows_holding_it_whole(session, monkeypatch):
    """As in training, where every gestured window held its structure's whole box and click: the
    decoder sees the box unclipped, with the click, in every window it decodes, and only there."""
    centre = centre_ras(session.volume)
    box = np.concatenate([centre - 4.0, centre + 4.0])
    box_dhw = box_on_model_grid(session, box)
    first = {start: np.array(start) - 0.5 for start in session._features}  # a window's voxels: [first, first + size)
    holding = [s for s, f in first.items() if np.all(box_dhw[:3] >= f) and np.all(box_dhw[3:] < f + session.window)]
    partly = [s for s, f in first.items() if s not in holding
              and np.all(box_dhw[3:] >= f) and np.all(box_dhw[:3] < f + session.window)]
    assert holding and partly, "the box must lie whole in some windows and in part in others to mean anything"
    seen = record_decoded_gestures(session, monkeypatch)
    answer = session.segment("liver", points_ras=[centre], point_labels=[1], box_ras=box)
    assert len(seen) == len(holding)
    decoded_boxes = sorted(tuple(np.round(s["boxes_dhw"][0].numpy(), 3)) for s in seen)
    assert decoded_boxes == sorted(tuple(np.round(box_dhw - np.tile(start, 2), 3)) for start in holding)
    assert all("points_dhw" in s for s in seen)
    assert answer.segments[0].mask.shape == session.volume.shape_kji


def test_a_box_no_window_holds_is_answered_from_its_clipped_parts(session, monkeypatch):
    corner = corner_ras(session.volume)
    far = (session.volume.ijk_to_ras @ np.append(np.array(session.volume.shape_kji[::-1]) - 2.0, 1.0))[:3]
    box = np.concatenate([corner, far])  # the whole volume: wider than a window on the model grid
    box_dhw = box_on_model_grid(session, box)
    assert np.any(box_dhw[3:] - box_dhw[:3] >= session.window), "the box must not fit a window"
    seen = record_decoded_gestures(session, monkeypatch)
    session.segment("liver", box_ras=box)
    assert len(seen) == session.window_count  # every window meets the box: each decodes its part
    clipped = sorted(tuple(np.clip(box_dhw - np.tile(start, 2), 0, session.window - 1))
                     for start in session._features)
    decoded = sorted(tuple(s["boxes_dhw"][0].double().numpy()) for s in seen)
    np.testing.assert_allclose(decoded, clipped, atol=1e-3)


def test_a_box_keeps_the_structure_inside_it(tiny, oblique_ct):
    # A threshold this low makes the text alone answer nearly everywhere: the box must cut it back.
    anything = InteractiveSession(oblique_ct, model=tiny, options=RunOptions(device="cpu", threshold=1e-6))
    half = np.array([4.0, 5.0, 3.0])
    box = np.concatenate([centre_ras(oblique_ct) - half, centre_ras(oblique_ct) + half])
    kji = np.argwhere(anything.segment("liver").segments[0].mask)
    boxed = np.argwhere(anything.segment("liver", box_ras=box).segments[0].mask)
    ras = lambda voxels: (oblique_ct.ijk_to_ras @ np.c_[voxels[:, ::-1], np.ones(len(voxels))].T).T[:, :3]  # noqa: E731
    # The box grown by its margin (10 % or 2 model voxels of 1 mm per side), plus one input voxel
    # of resampling (the oblique grid's largest spacing), in RAS mm.
    reach = np.maximum(0.1 * 2 * half, 2.0) + np.max(oblique_ct.spacing_mm)
    outside = lambda points: np.any(np.abs(points - centre_ras(oblique_ct)) > half + reach, axis=1)  # noqa: E731
    assert outside(ras(kji)).any(), "the text alone must reach beyond the box for this test to mean anything"
    assert len(boxed) > 0 and not outside(ras(boxed)).any()


def test_wrong_requests_are_clear_errors(session):
    with pytest.raises(RefSAM3DError, match="give a text prompt, points or a box"):
        session.segment(None)
    with pytest.raises(RefSAM3DError, match="refine ONE structure"):
        session.segment("liver, spleen", points_ras=[centre_ras(session.volume)])
    with pytest.raises(RefSAM3DError, match="outside oblique"):
        session.segment("liver", points_ras=[centre_ras(session.volume) + 500.0])
    with pytest.raises(RefSAM3DError, match="one 0 \\(negative\\) or 1"):
        session.segment("liver", points_ras=[centre_ras(session.volume)], point_labels=[2])


def test_padding_matches_monais_split_of_the_shortfall():
    padded, before = pad_to_window(np.ones((5, 40, 8), np.float32), 32)
    assert padded.shape == (32, 40, 32) and before.tolist() == [13, 0, 12]
    assert padded[13:18, :, 12:20].all() and padded.sum() == 5 * 40 * 8


def test_a_cache_that_cannot_fit_is_refused_before_encoding(tiny, oblique_ct, monkeypatch):
    monkeypatch.setattr("RefSAM3DLib.interactive.available_memory_bytes", lambda: 10 * 2**20)
    calls = []
    handle = tiny.image_encoder.register_forward_hook(lambda *args: calls.append(1))
    try:
        with pytest.raises(RefSAM3DError, match="interactive cache of this volume needs about"):
            InteractiveSession(oblique_ct, model=tiny, options=RunOptions(device="cpu"))
    finally:
        handle.remove()
    assert calls == []


def test_the_clean_up_is_told_the_input_voxels_of_positive_clicks_only(session, monkeypatch):
    import RefSAM3DLib.interactive as interactive

    seen = []
    real = interactive.segments_on_input

    def recording(*args, keep_kji=(), **kwargs):
        seen.append([tuple(v) for v in keep_kji])
        return real(*args, keep_kji=keep_kji, **kwargs)

    monkeypatch.setattr(interactive, "segments_on_input", recording)
    volume = session.volume
    positive_kji, negative_kji = (5, 7, 9), (12, 20, 3)
    to_ras = lambda kji: (volume.ijk_to_ras @ np.array([*kji[::-1], 1.0]))[:3]  # noqa: E731
    session.segment("liver", points_ras=[to_ras(positive_kji), to_ras(negative_kji)], point_labels=[1, 0])
    assert seen == [[positive_kji]]
