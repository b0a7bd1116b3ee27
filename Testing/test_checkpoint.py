"""Checkpoints: SAM 2D -> 3D transfer, safe loading, save/load round trip."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil

import pytest
import torch
import torch.nn.functional as F

from RefSAM3DLib import checkpoint
from RefSAM3DLib.checkpoint import build_untrained, load_model, save_checkpoint
from RefSAM3DLib.errors import RefSAM3DError
from RefSAM3DLib.model import build_model
from RefSAM3DLib.model.sam_weights import load_sam_weights
from RefSAM3DLib.model.weight_files import read_safetensors, read_torch_weights
from RefSAM3DLib.model_info import BUNDLED_MODEL_DIR

torch.set_num_threads(1)


@pytest.fixture()
def tiny_model(tiny_sam_config, tiny_sam_files):
    sam_path, clip_path, _ = tiny_sam_files
    return build_untrained(tiny_sam_config, sam_checkpoint=sam_path, clip_checkpoint=clip_path)


def _randomise_trainable(model, seed=3):
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.add_(torch.randn(param.shape, generator=generator) * 0.05)


def test_tiny_sam_weights_load_into_the_3d_encoder_unchanged(tiny_model, tiny_sam_files):
    _, _, sam = tiny_sam_files
    ours = tiny_model.image_encoder.state_dict()
    theirs = sam.image_encoder.state_dict()
    for i in range(4):
        for key in ("attn.qkv.weight", "attn.proj.bias", "mlp.lin1.weight", "mlp.lin2.bias", "norm1.weight", "norm2.bias"):
            assert torch.equal(ours[f"blocks.{i}.{key}"], theirs[f"blocks.{i}.{key}"]), key
    # The (h, w) table is SAM's resized to the 4 x 4 token grid; the depth table is new.
    expected_pos = F.interpolate(theirs["pos_embed"].permute(0, 3, 1, 2), size=(4, 4), mode="bicubic",
                                 align_corners=False).permute(0, 2, 3, 1)
    torch.testing.assert_close(ours["pos_embed"], expected_pos)
    # Global block 1: SAM's 15-entry table resized to the 4-token grid (7 entries).
    assert ours["blocks.1.attn.rel_pos_h"].shape == (7, 16)
    torch.testing.assert_close(ours["blocks.1.attn.rel_pos_d"], ours["blocks.1.attn.rel_pos_h"])
    frozen = [n for n, p in tiny_model.image_encoder.named_parameters() if not p.requires_grad]
    assert "patch_embed.proj.weight" in frozen and "blocks.0.attn.qkv.weight" in frozen


def test_3d_patch_embedding_of_a_flat_volume_equals_sams_2d_patch_embedding(tiny_model, tiny_sam_files):
    """SAM's kernel, folded with its RGB normalisation, gives SAM's own numbers on a grey slice."""
    _, _, sam = tiny_sam_files
    torch.manual_seed(4)
    slice_hw = torch.rand(32, 32)
    volume = slice_hw.expand(8, 32, 32)[None, None]  # 8 identical slices = one patch in depth
    with torch.no_grad():
        ours = tiny_model.image_encoder.patch_embed(volume)[0, 0]  # (4, 4, C)
        rgb = (slice_hw * 255.0).expand(3, 32, 32)[None]
        theirs = sam.image_encoder.patch_embed((rgb - sam.pixel_mean) / sam.pixel_std)[0]
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)


def test_load_report_names_unused_sam_keys(tiny_sam_config, tiny_sam_files):
    sam_path, clip_path, _ = tiny_sam_files
    model = build_model(tiny_sam_config, text_encoder=build_model(tiny_sam_config).text_encoder)
    report = load_sam_weights(model, sam_path)
    assert report.missing == []
    assert "image_encoder.neck.0.weight" in report.unexpected
    assert any(k.startswith("mask_decoder.") for k in report.unexpected)
    assert "blocks.3.attn.qkv.weight" in report.loaded


def test_sam_of_another_size_is_refused_with_a_clear_message(tiny_sam_config, tmp_path):
    from segment_anything.modeling import ImageEncoderViT

    wider = ImageEncoderViT(img_size=64, patch_size=8, embed_dim=48, depth=4, num_heads=2, use_rel_pos=True,
                            global_attn_indexes=(1, 3), window_size=3)
    path = tmp_path / "wider.pth"
    torch.save({"image_encoder." + k: v for k, v in wider.state_dict().items()}, path)
    with pytest.raises(RefSAM3DError, match="width 48"):
        build_untrained(tiny_sam_config, sam_checkpoint=path, text_encoder=build_model(tiny_sam_config).text_encoder)


def test_a_file_that_is_not_sam_is_refused(tiny_sam_config, tmp_path):
    path = tmp_path / "other.pth"
    torch.save({"fc.weight": torch.zeros(2, 2)}, path)
    with pytest.raises(RefSAM3DError, match="not a Segment Anything checkpoint"):
        build_untrained(tiny_sam_config, sam_checkpoint=path, text_encoder=build_model(tiny_sam_config).text_encoder)


class _Payload:
    """Unpickling this runs code: it creates the marker file."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.makedirs, (self.marker,))


def test_malicious_pickle_is_refused_without_running_its_code(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    torch.save({"image_encoder.patch_embed.proj.weight": _Payload(marker)}, path)
    with pytest.raises(RefSAM3DError, match="Refused"):
        read_torch_weights(path)
    assert not marker.exists()


def test_save_load_round_trip_gives_identical_outputs(tiny_model, tiny_sam_config, tiny_sam_files, tmp_path):
    sam_path, clip_path, _ = tiny_sam_files
    _randomise_trainable(tiny_model)
    tiny_model.eval()
    image = torch.rand(1, 1, 32, 32, 32)
    with torch.no_grad():
        before = tiny_model(image, ["liver", "right kidney"])
    folder = save_checkpoint(tiny_model, tmp_path / "tiny-v1", {"name": "tiny", "version": "1", "structures": ["liver"]})
    record = json.loads((folder / "config.json").read_text())
    assert record["metadata"]["structures"] == ["liver"]
    assert set(record["base_weights_sha256"]) == {"sam_image_encoder", "clip_text"}
    stored = read_safetensors(folder / "model.safetensors")
    assert set(stored) == set(tiny_model.trainable_state_dict())
    assert "image_encoder.blocks.0.attn.qkv.weight" not in stored  # frozen base weights stay out

    loaded = load_model(folder, sam_checkpoint=sam_path, clip_checkpoint=clip_path)
    assert not loaded.training and loaded.metadata["name"] == "tiny"
    with torch.no_grad():
        after = loaded(image, ["liver", "right kidney"])
    assert torch.equal(before, after)


def test_different_base_weights_are_refused(tiny_model, tiny_sam_config, tiny_sam_files, tmp_path):
    sam_path, clip_path, _ = tiny_sam_files
    folder = save_checkpoint(tiny_model, tmp_path / "m", {})
    state = torch.load(sam_path, weights_only=True)
    state["image_encoder.blocks.0.attn.qkv.weight"] = state["image_encoder.blocks.0.attn.qkv.weight"] + 1
    other = tmp_path / "other_sam.pth"
    torch.save(state, other)
    with pytest.raises(RefSAM3DError, match="differ from those this model was trained on"):
        load_model(folder, sam_checkpoint=other, clip_checkpoint=clip_path)


def test_truncated_or_corrupt_safetensors_give_clear_errors(tiny_model, tiny_sam_files, tmp_path):
    sam_path, clip_path, _ = tiny_sam_files
    folder = save_checkpoint(tiny_model, tmp_path / "m", {})
    weights_file = folder / "model.safetensors"
    weights_file.write_bytes(weights_file.read_bytes()[:-100])
    with pytest.raises(RefSAM3DError, match="SHA-256"):
        load_model(folder, sam_checkpoint=sam_path, clip_checkpoint=clip_path)
    # Even with a matching hash (a broken file saved as such), reading fails clearly.
    record = json.loads((folder / "config.json").read_text())
    record["weights_sha256"] = checkpoint.weights.sha256_file(weights_file)
    (folder / "config.json").write_text(json.dumps(record))
    with pytest.raises(RefSAM3DError, match="corrupt or truncated"):
        load_model(folder, sam_checkpoint=sam_path, clip_checkpoint=clip_path)
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\xff" * 64)
    with pytest.raises(RefSAM3DError, match="corrupt or truncated"):
        read_safetensors(garbage)


def test_folder_without_config_is_a_user_error(tmp_path):
    with pytest.raises(RefSAM3DError, match="config.json"):
        load_model(tmp_path)


def test_default_model_is_the_bundled_one():
    if (BUNDLED_MODEL_DIR / "config.json").is_file():
        model = load_model()
        assert model.config.name == "small" and not model.training
    else:
        with pytest.raises(RefSAM3DError, match="bundled model"):
            load_model("default")


def test_small_model_round_trip_records_minilm_weights(tmp_path):
    torch.manual_seed(5)
    model = build_model("small").eval()
    folder = save_checkpoint(model, tmp_path / "small", {"name": "refsam3d-small"})
    record = json.loads((folder / "config.json").read_text())
    assert len(record["base_weights_sha256"]["minilm_text"]) == 64
    assert (folder / "model.safetensors").stat().st_size < 25_000_000
    loaded = load_model(folder)
    for name, tensor in model.trainable_state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name
    shutil.rmtree(folder)


# ---- issue 13: a hostile or broken config.json is one clear error before anything is built ----


def _huge_but_every_size_in_range(config):
    config.update(depth=128, embed_dim=4096, num_heads=64)  # each size in range, together 25 G parameters


HOSTILE_RECORDS = {
    # case: (change to the parsed config.json, word the error names)
    "format_version as text": (lambda r, d: r.update(format_version="2"), "format_version"),
    "model_config null": (lambda r, d: r.update(model_config=None), "model_config"),
    "patch_size as text": (lambda r, d: r["model_config"].update(patch_size="8"), "patch_size"),
    "metadata a string": (lambda r, d: r.update(metadata="hello"), "metadata"),
    "metadata.name a list": (lambda r, d: r["metadata"].update(name=["a"]), "metadata.name"),
    "spacing nested": (lambda r, d: r["model_config"].update(spacing_mm=[[[3.0]]] * 3), "spacing_mm"),
    "embed_dim 6e12": (lambda r, d: r["model_config"].update(embed_dim=6e12), "embed_dim"),
    "depth 10 million": (lambda r, d: r["model_config"].update(depth=10_000_000), "depth"),
    "num_heads 0": (lambda r, d: r["model_config"].update(num_heads=0), "num_heads"),
    "sizes in range, 25 G parameters together": (lambda r, d: _huge_but_every_size_in_range(r["model_config"]),
                                                 "parameters"),
    "weights of another width": (lambda r, d: r["model_config"].update(embed_dim=96), "does not fit"),
    "absolute weights_file": (lambda r, d: r.update(weights_file=str(d.parent / "elsewhere.safetensors")),
                              "weights_file"),
    "escaping weights_file": (lambda r, d: r.update(weights_file="../elsewhere.safetensors"), "weights_file"),
}


@pytest.mark.parametrize("case", sorted(HOSTILE_RECORDS))
def test_hostile_config_is_refused_before_the_model_is_built(case, untrained_model_dir, tmp_path, monkeypatch):
    folder = tmp_path / "model"
    shutil.copytree(untrained_model_dir, folder)
    shutil.copy(folder / "model.safetensors", tmp_path / "elsewhere.safetensors")  # a file outside, hash valid
    record = json.loads((folder / "config.json").read_text())
    change, word = HOSTILE_RECORDS[case]
    change(record, folder)
    (folder / "config.json").write_text(json.dumps(record))

    def no_build(*args, **kwargs):
        raise AssertionError("the model was built before the config and weights were checked")

    monkeypatch.setattr(checkpoint, "build_untrained", no_build)
    with pytest.raises(RefSAM3DError, match=word) as error:
        load_model(folder)
    assert "\n" not in str(error.value)


def test_deeply_nested_config_json_is_a_clear_error(untrained_model_dir, tmp_path):
    folder = tmp_path / "model"
    shutil.copytree(untrained_model_dir, folder)
    text = (folder / "config.json").read_text()
    (folder / "config.json").write_text(text.replace('"metadata": {', '"deep": ' + "[" * 100_000 + "]" * 100_000
                                                     + ', "metadata": {', 1))
    with pytest.raises(RefSAM3DError, match="config.json is not valid JSON"):
        load_model(folder)


def test_a_model_is_named_by_bundled_name_folder_or_default(tmp_path):
    from RefSAM3DLib.model_info import model_folder

    assert model_folder(None) == model_folder("") == model_folder("default") == BUNDLED_MODEL_DIR
    assert model_folder(BUNDLED_MODEL_DIR.name) == BUNDLED_MODEL_DIR  # from any working folder
    assert model_folder(tmp_path) == tmp_path
    with pytest.raises(RefSAM3DError, match=f"does not exist.*{BUNDLED_MODEL_DIR.name}"):
        model_folder(tmp_path / "missing")


def _clicked_logits(model, image):
    """Logits of two prompts, each with a positive and a negative click (model in eval mode)."""
    points = torch.tensor([[[8.0, 8.0, 8.0], [20.0, 20.0, 20.0]], [[24.0, 10.0, 4.0], [5.0, 5.0, 28.0]]])
    with torch.no_grad():
        return model(image, ["liver", "right kidney"], points_dhw=points, point_labels=torch.tensor([[1, 0], [1, 0]]))


def test_a_model_made_before_token_logits_loads_and_grows_them_without_changing_an_output(
        tiny_model, tiny_sam_config, tiny_sam_files, tmp_path):
    sam_path, clip_path, _ = tiny_sam_files
    older_config = dataclasses.replace(tiny_sam_config, token_logits=False)
    older = build_model(older_config, text_encoder=tiny_model.text_encoder)
    older.load_state_dict(tiny_model.state_dict(), strict=False)
    _randomise_trainable(older)
    folder = save_checkpoint(older, tmp_path / "older", {"name": "older"})
    record = json.loads((folder / "config.json").read_text())
    del record["model_config"]["token_logits"]  # a record written before the field existed
    (folder / "config.json").write_text(json.dumps(record))

    loaded = load_model(folder, sam_checkpoint=sam_path, clip_checkpoint=clip_path)
    assert loaded.config.token_logits is False and loaded.mask_decoder.token_hypernetwork is None
    grown = checkpoint.upgrade(loaded, tiny_sam_config)
    assert grown.config.token_logits and grown.metadata["name"] == "older"
    image = torch.rand(1, 1, 32, 32, 32)
    assert torch.equal(_clicked_logits(loaded, image), _clicked_logits(grown.eval(), image))
    assert "mask_decoder.token_hypernetwork.layers.2.weight" in grown.trainable_state_dict()
    # Once the new part has trained, the per-prompt image tokens (which saw the clicks) move the mask.
    with torch.no_grad():
        grown.mask_decoder.token_hypernetwork.layers[-1].weight.normal_(0.0, 0.1)
    assert not torch.allclose(_clicked_logits(loaded, image), _clicked_logits(grown, image))
    # Nothing to add: the same model back.
    assert checkpoint.upgrade(grown, tiny_sam_config) is grown
    assert checkpoint.upgrade(loaded, dataclasses.replace(tiny_sam_config, window_size_vox=64)) is loaded
