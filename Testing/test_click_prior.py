"""Clicks as local corrections (model/click_prior.py): sign, locality, similarity, a click where
the mask is already right, padding, gradients, and a model that gains the part keeps its
text-only answers."""

from __future__ import annotations

import math

import torch
from conftest import assert_every_parameter_learns

from RefSAM3DLib.model import MODEL_CONFIGS
from RefSAM3DLib.model.click_prior import REACH_SIGMAS, ClickPrior

torch.set_num_threads(1)
SIZE = 24
CLICK = (12, 12, 6)


def two_tissues() -> torch.Tensor:
    """(1, 4, 24, 24, 24) pixel features: tissue A (channel 0) in the half w < 12, tissue B
    (channel 1, orthogonal to A) in the other half."""
    features = torch.zeros(1, 4, SIZE, SIZE, SIZE)
    features[:, 0, :, :, : SIZE // 2] = 1.0
    features[:, 1, :, :, SIZE // 2:] = 1.0
    return features


def click_term(label: int, coarse_at_click: float = 0.0) -> torch.Tensor:
    """(D, H, W) change of one prompt's coarse logits by one click at CLICK in tissue A."""
    coarse = torch.zeros(1, 1, SIZE, SIZE, SIZE)
    coarse[(0, 0) + CLICK] = coarse_at_click
    points = torch.tensor([[CLICK]], dtype=torch.float32)
    return (ClickPrior(4)(two_tissues(), coarse, points, torch.tensor([[label]])) - coarse)[0, 0]


def test_a_positive_click_raises_nearby_similar_voxels_only_and_a_negative_click_lowers_them():
    positive, negative = click_term(1), click_term(0)
    assert positive.shape == (SIZE, SIZE, SIZE)
    assert positive[CLICK] > 3.0  # the clicked voxel is brought to about the margin
    assert positive[CLICK] > positive[12, 12, 1] > positive[2, 2, 1] > 0  # fades with distance
    assert torch.all(positive[..., SIZE // 2:] == 0)  # tissue B is not like the click: untouched
    assert torch.allclose(negative, -positive)


def test_a_click_the_mask_already_agrees_with_changes_almost_nothing():
    agreeing, disagreeing = click_term(1, coarse_at_click=10.0), click_term(1, coarse_at_click=-10.0)
    assert agreeing.abs().max() < 0.01
    assert disagreeing[CLICK] > 13.0  # from -10 to about the margin
    assert click_term(0, coarse_at_click=-10.0).abs().max() < 0.01  # "not here" where it is not


def test_padding_points_and_prompts_without_clicks_get_no_term_and_each_prompt_only_its_own():
    prior = ClickPrior(4)
    features = two_tissues().repeat(2, 1, 1, 1, 1)
    coarse = torch.randn(2, 2, SIZE, SIZE, SIZE)
    points = torch.tensor([[CLICK, (0, 0, 0)], [(0, 0, 0), (0, 0, 0)]], dtype=torch.float32)
    labels = torch.tensor([[1, -1], [-1, -1]])
    corrected = prior(features, coarse, points, labels)
    alone = prior(features, coarse[:, :1], points[:1, :1], labels[:1, :1])
    assert torch.allclose(corrected[:, 0], alone[:, 0])
    assert not torch.allclose(corrected[:, 0], coarse[:, 0])
    assert torch.equal(corrected[:, 1], coarse[:, 1])


def test_every_parameter_of_the_prior_learns_from_a_click():
    prior = ClickPrior(4)
    features = two_tissues() + 0.3 * torch.rand(1, 4, SIZE, SIZE, SIZE)
    points = torch.tensor([[CLICK, (4, 20, 18)]], dtype=torch.float32)
    prior(features, torch.zeros(1, 1, SIZE, SIZE, SIZE), points, torch.tensor([[1, 0]])).sum().backward()
    assert_every_parameter_learns(prior)


def test_a_model_gaining_the_click_prior_keeps_its_text_answers_and_changes_its_clicked_ones(model_gaining):
    older, grown = model_gaining("click_prior")
    assert older.mask_decoder.click_prior is None and isinstance(grown.mask_decoder.click_prior, ClickPrior)
    assert {n for n in grown.trainable_state_dict() if ".click_prior." in n} == {
        f"mask_decoder.click_prior.{n}" for n in ("projection.weight", "margin", "log_sigma_vox", "floor")}
    size = MODEL_CONFIGS["small"].window_size_vox
    image = torch.rand(1, 1, size, size, size)
    with torch.no_grad():
        assert torch.equal(older(image, ["liver"]), grown(image, ["liver"]))
        for label in (1, 0):
            clicks = dict(points_dhw=torch.tensor([[[40.0, 40.0, 40.0]]]), point_labels=torch.tensor([[label]]))
            before, after = older(image, ["liver"], **clicks), grown(image, ["liver"], **clicks)
            assert (after - before)[0, 0, 40, 40, 40] * (1 if label else -1) > 1.0


def test_the_cropped_term_is_the_whole_window_formula_within_its_reach():
    """The prior computes each click within REACH_SIGMAS of it; against the formula evaluated on
    the whole window, near a corner (crop clipped) and off the voxel grid."""
    torch.manual_seed(0)
    prior = ClickPrior(4).requires_grad_(False)
    prior.floor.data = torch.tensor([0.2, 0.1])
    features, coarse = torch.randn(1, 4, 30, 26, 34), torch.randn(1, 1, 30, 26, 34)
    for point, label in [((2.0, 24.6, 1.0), 1), ((15.0, 13.0, 17.0), 0)]:
        corrected = prior(features, coarse, torch.tensor([[point]]), torch.tensor([[label]]))
        sign, voxel = (1.0 if label else -1.0), tuple(round(c) for c in point)
        unit = prior.projection(features.movedim(1, -1))
        unit = unit / unit.norm(dim=-1, keepdim=True)
        pull = torch.relu(((unit * unit[(0, *voxel)]).sum(-1) - prior.floor[label]) / (1 - prior.floor[label]))
        grid = torch.stack(torch.meshgrid(*[torch.arange(s, dtype=torch.float32) for s in (30, 26, 34)],
                                          indexing="ij"), dim=-1)
        sigma = torch.exp(prior.log_sigma_vox[label])
        nearness = torch.exp(-((grid - torch.tensor(point)) ** 2).sum(-1) / (2 * sigma ** 2))
        amount = torch.nn.functional.softplus(prior.margin[label] - sign * coarse[(0, 0, *voxel)])
        expected = coarse + sign * amount * nearness * pull
        # Beyond the crop the formula's term is below exp(-REACH_SIGMAS^2 / 2) of the amount.
        truncation = math.exp(-REACH_SIGMAS ** 2 / 2) + 1e-4
        assert torch.allclose(corrected, expected, atol=truncation * float(amount)), (point, label)
        assert not torch.allclose(corrected, coarse)
