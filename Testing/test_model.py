"""The RefSAM3D network: shapes, one encoder pass for P prompts, PETL training, determinism."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from RefSAM3DLib.checkpoint import build_untrained
from RefSAM3DLib.errors import RefSAM3DError
from RefSAM3DLib.model import MODEL_CONFIGS, build_model, parameter_report
from RefSAM3DLib.model.prompt_encoder import NO_TEXT_PROMPT

torch.set_num_threads(1)
PROMPTS = ["liver", "spleen", "left kidney"]


@pytest.fixture(scope="module")
def small_model():
    torch.manual_seed(0)
    return build_model("small").eval()


@pytest.fixture(scope="module")
def small_window():
    torch.manual_seed(1)
    size = MODEL_CONFIGS["small"].window_size_vox
    return torch.rand(1, 1, size, size, size)


@pytest.fixture(scope="module")
def small_outputs(small_model, small_window):
    """Logits of PROMPTS from one forward call, counting image-encoder passes."""
    calls = []
    handle = small_model.image_encoder.register_forward_hook(lambda *args: calls.append(1))
    with torch.no_grad():
        logits = small_model(small_window, PROMPTS)
    handle.remove()
    return logits, len(calls)


@pytest.fixture()
def tiny_model(tiny_sam_config, tiny_sam_files):
    sam_path, clip_path, _ = tiny_sam_files
    torch.manual_seed(2)
    return build_untrained(tiny_sam_config, sam_checkpoint=sam_path, clip_checkpoint=clip_path)


def test_small_config_gives_one_mask_per_prompt_from_one_encoder_pass(small_outputs):
    logits, encoder_passes = small_outputs
    size = MODEL_CONFIGS["small"].window_size_vox
    assert logits.shape == (1, len(PROMPTS), size, size, size)
    assert encoder_passes == 1
    assert torch.isfinite(logits).all()


def test_decoding_prompts_together_equals_decoding_each_alone(small_model, small_window, small_outputs):
    logits, _ = small_outputs
    with torch.no_grad():
        features = small_model.encode_image(small_window)
        for i, text in enumerate(PROMPTS):
            alone = small_model.decode(small_window, features, small_model.encode_prompts([text]))
            torch.testing.assert_close(alone[:, 0], logits[:, i], atol=1e-4, rtol=1e-4)


def test_different_prompts_give_different_masks(small_outputs):
    logits, _ = small_outputs
    for i in range(len(PROMPTS)):
        for j in range(i + 1, len(PROMPTS)):
            assert (logits[0, i] - logits[0, j]).abs().max() > 1e-3


def test_eval_mode_is_deterministic(small_model, small_window, small_outputs):
    with torch.no_grad():
        again = small_model(small_window, PROMPTS)
    assert torch.equal(again, small_outputs[0])


def test_text_encoder_is_frozen_and_caches_by_text(small_model):
    encoder = small_model.text_encoder
    assert not any(p.requires_grad for p in encoder.parameters())
    first = encoder(["spleen", "liver"])
    second = encoder(["liver"])
    assert first.tokens.shape[-1] == MODEL_CONFIGS["small"].text_dim == first.pooled.shape[-1]
    assert "liver" in encoder._cache and "spleen" in encoder._cache
    length = int(second.mask[0].sum())
    torch.testing.assert_close(second.tokens[0, :length], first.tokens[1, :length])
    assert not first.pooled.requires_grad


def test_wrong_window_size_is_a_user_error(small_model):
    with pytest.raises(RefSAM3DError, match="shape"):
        small_model.encode_image(torch.rand(1, 1, 32, 32, 32))


def test_empty_prompt_is_a_user_error(small_model):
    with pytest.raises(RefSAM3DError, match="non-empty"):
        small_model.encode_prompts(["liver", "  "])


def test_small_config_fits_the_bundled_model_budget():
    report = parameter_report("small")
    assert report["total"]["trainable"] <= 6_000_000  # fp32 safetensors <= 25 MB
    assert report["components"]["text_encoder"]["trainable"] == 0
    assert report["components"]["image_encoder"]["frozen"] == 0  # trained from scratch


def test_vit_b_trains_a_small_fraction_of_the_sam_image_encoder():
    with torch.device("meta"):  # counts only: no memory, no weights
        model = build_model("vit_b")
    encoder = model.image_encoder
    total = sum(p.numel() for p in encoder.parameters())
    trainable = sum(p.numel() for p in encoder.parameters() if p.requires_grad)
    print(f"vit_b image encoder: {trainable:,} of {total:,} parameters train ({trainable / total:.1%})")
    assert 80_000_000 < total < 100_000_000  # SAM ViT-B plus PETL
    assert trainable / total < 0.06
    assert not any(p.requires_grad for p in model.text_encoder.parameters())


def test_tiny_sam_config_shapes_for_batch_of_two_with_points_and_boxes(tiny_model, tiny_sam_config):
    size = tiny_sam_config.window_size_vox
    image = torch.rand(2, 1, size, size, size)
    points = torch.tensor([[[4, 5, 6], [10, 10, 10]], [[20, 3, 3], [0, 0, 0]]])
    labels = torch.tensor([[1, 0], [1, -1]])
    boxes = torch.tensor([[2, 2, 2, 12, 12, 12], [0, 4, 4, 31, 20, 20]])
    tiny_model.eval()
    with torch.no_grad():
        plain = tiny_model(image, ["liver", "aorta"])
        clicked = tiny_model(image, ["liver", "aorta"], points_dhw=points, point_labels=labels, boxes_dhw=boxes)
    assert plain.shape == clicked.shape == (2, 2, size, size, size)
    # Small but real: the toy SAM's point embeddings (std 0.1) now start the spatial tokens.
    assert (plain - clicked).abs().max() > 1e-6


def test_only_petl_parameters_receive_gradients(tiny_model, tiny_sam_config):
    size = tiny_sam_config.window_size_vox
    tiny_model.train()
    logits = tiny_model(torch.rand(1, 1, size, size, size), ["liver", "spleen"])
    (logits.sigmoid().mean() + logits.mean()).backward()
    petl = {"image_encoder." + n for n in tiny_model.image_encoder.petl_parameter_names()}
    trainable = {n for n, p in tiny_model.named_parameters() if p.requires_grad}
    with_grad = {n for n, p in tiny_model.named_parameters() if p.grad is not None}
    encoder_trainable = {n for n in trainable if n.startswith("image_encoder.")}
    assert encoder_trainable == petl
    assert with_grad <= trainable
    assert not any(n.startswith("text_encoder.") for n in with_grad)
    # Frozen SAM weights exist and get no gradient.
    assert "image_encoder.blocks.0.attn.qkv.weight" not in with_grad
    assert "image_encoder.blocks.0.adapter.up.weight" in with_grad
    total = sum(p.numel() for p in tiny_model.image_encoder.parameters())
    fraction = sum(p.numel() for p in tiny_model.image_encoder.parameters() if p.requires_grad) / total
    print(f"tiny SAM image encoder trainable fraction: {fraction:.1%}")
    assert 0 < fraction < 1


def test_small_is_a_hybrid_with_stem_skips_and_vit_b_keeps_sams_patch_embedding(small_model):
    from RefSAM3DLib.model.conv_stem import ConvStem
    from RefSAM3DLib.model.image_encoder import PatchEmbed3D

    assert isinstance(small_model.image_encoder.patch_embed, ConvStem)
    assert len(small_model.pixel_decoder.stem_merge) == len(MODEL_CONFIGS["small"].stem_channels) == 3
    with torch.device("meta"):
        vit_b = build_model("vit_b")
    assert isinstance(vit_b.image_encoder.patch_embed, PatchEmbed3D) and len(vit_b.pixel_decoder.stem_merge) == 0


def test_stem_deeper_than_the_patch_is_a_config_error():
    with pytest.raises(RefSAM3DError, match="stem_channels"):
        dataclasses.replace(MODEL_CONFIGS["small"], stem_channels=(4, 8, 16, 32)).validate()


def test_relative_position_bias_is_the_sum_of_the_three_decomposed_terms():
    """SAM's decomposed bias in 3D: bias[q, k] = rel_d[q, k_d] + rel_h[q, k_h] + rel_w[q, k_w]."""
    from segment_anything.modeling.image_encoder import get_rel_pos

    from RefSAM3DLib.model.image_encoder import Attention3D

    torch.manual_seed(2)
    attention = Attention3D(dim=8, num_heads=2, size_tok=3)
    with torch.no_grad():
        for table in (attention.rel_pos_d, attention.rel_pos_h, attention.rel_pos_w):
            table.normal_()
    q = torch.randn(1, 2, 27, 4)
    bias = attention._rel_pos_bias(q, (3, 3, 3))
    tables = [get_rel_pos(3, 3, t) for t in (attention.rel_pos_d, attention.rel_pos_h, attention.rel_pos_w)]
    query_dhw = [(i // 9, i // 3 % 3, i % 3) for i in range(27)]
    for head in range(2):
        for qi, (d, h, w) in enumerate(query_dhw):
            for ki, key in enumerate(query_dhw):
                expected = sum(q[0, head, qi] @ table[coordinate, k] for table, coordinate, k in
                               zip(tables, (d, h, w), key))
                assert torch.isclose(bias[0, head, qi, ki], expected, atol=1e-5)


@pytest.mark.parametrize("size_in, size_out", [((3, 5, 7), (10, 11, 13)), ((12, 12, 12), (96, 96, 96))])
def test_separable_upsample_is_trilinear_interpolation(size_in, size_out):
    from RefSAM3DLib.model.mask_decoder import trilinear_upsample

    torch.manual_seed(3)
    x = torch.randn(2, 3, *size_in)
    expected = torch.nn.functional.interpolate(x, size=size_out, mode="trilinear", align_corners=False)
    assert torch.allclose(trilinear_upsample(x, size_out), expected, atol=1e-5)


def test_image_fusion_is_the_papers_convolution_over_mask_and_image(small_model):
    """The decoder's read-out equals a 3x3x3 convolution over [mask logit, image], GELU, then a
    1x1x1 convolution (paper section 3.4), computed whole for every prompt."""
    decoder, pixel = small_model.mask_decoder, small_model.pixel_decoder
    torch.manual_seed(4)
    image, coarse = torch.rand(1, 1, 9, 10, 11), torch.randn(1, 3, 9, 10, 11)
    channels = decoder.mask_conv.out_channels
    kernel = torch.zeros(channels, 2, 3, 3, 3)
    kernel[:, :1] = pixel.image_conv.weight
    kernel[:, 1, 1, 1, 1] = decoder.mask_conv.weight.view(-1)
    with torch.no_grad():
        fused = decoder._fuse_with_image(coarse, pixel.image_conv(image))
        for i in range(3):
            hidden = torch.nn.functional.conv3d(torch.cat([image, coarse[:, i:i + 1]], dim=1), kernel,
                                                pixel.image_conv.bias + decoder.mask_conv.bias, padding=1)
            expected = coarse[:, i] + decoder.out_conv(torch.nn.functional.gelu(hidden))[:, 0]
            assert torch.allclose(fused[:, i], expected, atol=1e-5)


def test_with_local_clicks_a_text_prompts_click_reaches_no_token_and_a_no_text_prompts_does():
    # Without the click prior and the gesture maps, the sparse token is a click's only way in.
    config = dataclasses.replace(MODEL_CONFIGS["small"], click_prior=False, gesture_maps=False,
                                 gesture_text_biases=False, local_clicks_with_text=True)
    torch.manual_seed(0)
    model = build_model(config).eval()
    size = config.window_size_vox
    image = torch.rand(1, 1, size, size, size)
    here, there = torch.tensor([[[20.0, 20.0, 20.0]]]), torch.tensor([[[60.0, 60.0, 60.0]]])
    label = torch.tensor([[1]])
    with torch.no_grad():
        features = model.encode_image(image)
        answers = {(text, name): model.decode(image, features, model.encode_prompts([text]), points_dhw=point,
                                              point_labels=label)
                   for text in ("liver", NO_TEXT_PROMPT) for name, point in (("here", here), ("there", there))}
        model.config = dataclasses.replace(config, local_clicks_with_text=False)
        as_token = model.decode(image, features, model.encode_prompts(["liver"]), points_dhw=here, point_labels=label)
    assert torch.equal(answers["liver", "here"], answers["liver", "there"])
    assert not torch.equal(answers[NO_TEXT_PROMPT, "here"], answers[NO_TEXT_PROMPT, "there"])
    assert not torch.equal(as_token, answers["liver", "here"])


def test_a_model_gaining_local_clicks_answers_text_as_before_and_clicks_with_text_differently(model_gaining):
    older, grown = model_gaining("local_clicks_with_text")
    assert grown.config.local_clicks_with_text and not older.config.local_clicks_with_text
    size = MODEL_CONFIGS["small"].window_size_vox
    image = torch.rand(1, 1, size, size, size)
    click = dict(points_dhw=torch.tensor([[[40.0, 40.0, 40.0]]]), point_labels=torch.tensor([[1]]))
    with torch.no_grad():
        assert torch.equal(older(image, ["liver"]), grown(image, ["liver"]))
        assert torch.equal(older(image, [NO_TEXT_PROMPT], **click), grown(image, [NO_TEXT_PROMPT], **click))
        assert not torch.equal(older(image, ["liver"], **click), grown(image, ["liver"], **click))
