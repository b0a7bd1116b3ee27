"""SAM's own decoder and prompt-encoder weights start the 3D decoder where the shapes carry over."""

import torch

from RefSAM3DLib.model.sam_weights import load_sam_weights
from RefSAM3DLib.model import build_model


def test_sams_transformer_hypernetwork_and_point_embeddings_start_the_3d_decoder(tiny_sam_config, tiny_sam_files):
    sam_path, _, sam = tiny_sam_files
    torch.manual_seed(5)
    model = build_model(tiny_sam_config, text_encoder=build_model(tiny_sam_config).text_encoder)

    report = load_sam_weights(model, sam_path)

    theirs = sam.mask_decoder
    ours = model.mask_decoder
    # The toy SAM has 1 transformer layer, our config 2: layer 0 and the final attention carry over.
    torch.testing.assert_close(ours.transformer.layers[0].self_attn.q_proj.weight,
                               theirs.transformer.layers[0].self_attn.q_proj.weight)
    torch.testing.assert_close(ours.transformer.final_attn_token_to_image.out_proj.bias,
                               theirs.transformer.final_attn_token_to_image.out_proj.bias)
    torch.testing.assert_close(ours.mask_token.weight, theirs.mask_tokens.weight[:1])
    for layer in (0, 1):
        torch.testing.assert_close(ours.hypernetwork.layers[layer].weight,
                                   theirs.output_hypernetworks_mlps[0].layers[layer].weight)
    points = torch.cat([e.weight for e in sam.prompt_encoder.point_embeddings])
    torch.testing.assert_close(model.spatial_prompts.point_embeddings.weight, points)
    torch.testing.assert_close(model.spatial_prompts.not_a_point.weight, sam.prompt_encoder.not_a_point_embed.weight)
    # Widths that differ (SAM's last hypernetwork layer: 16 / 8 = 2 channels, ours 8) stay ours, and are reported.
    assert ours.hypernetwork.layers[2].weight.shape != theirs.output_hypernetworks_mlps[0].layers[2].weight.shape
    assert "mask_decoder.output_hypernetworks_mlps.0.layers.2.weight" in report.unexpected
    assert "mask_decoder.transformer.layers.0.self_attn.q_proj.weight" not in report.unexpected
    assert "prompt_encoder.point_embeddings.2.weight" not in report.unexpected
    assert "mask_decoder.output_upscaling.0.weight" in report.unexpected
    assert "mask_decoder.transformer.layers.0.mlp.lin1.weight" in report.loaded
    assert "spatial_prompts.point_embeddings.weight" in report.loaded


def test_decoder_layers_sam_lacks_keep_their_own_initialisation(tiny_sam_config, tiny_sam_files):
    sam_path, _, _ = tiny_sam_files
    torch.manual_seed(5)
    model = build_model(tiny_sam_config, text_encoder=build_model(tiny_sam_config).text_encoder)
    before = model.mask_decoder.transformer.layers[1].self_attn.q_proj.weight.clone()
    load_sam_weights(model, sam_path)
    torch.testing.assert_close(model.mask_decoder.transformer.layers[1].self_attn.q_proj.weight, before)
