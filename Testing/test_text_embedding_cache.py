"""The text-embedding cache in a model folder: known prompts never load the frozen text encoder."""

from __future__ import annotations

import shutil

import pytest
import torch

from RefSAM3DLib.checkpoint import TEXT_EMBEDDINGS_FILE, load_model, save_checkpoint, write_text_embedding_cache
from RefSAM3DLib.model import build_model
from RefSAM3DLib.model.prompt_encoder import NO_TEXT_PROMPT
from RefSAM3DLib.model.text_encoder import MiniLMTextEncoder
from RefSAM3DLib.model.text_encoder_cache import (PrecomputedTextEncoder, encoder_identity, read_text_embeddings,
                                                  write_text_embeddings)


@pytest.fixture(scope="module")
def saved_small(tmp_path_factory):
    """A small model (random trainable weights) saved with two trained structures, and its folder."""
    torch.manual_seed(3)
    model = build_model("small").eval()
    folder = save_checkpoint(model, tmp_path_factory.mktemp("cache") / "small",
                             {"name": "cache-test", "structures": ["liver", "kidney_left"]})
    return model, folder


@pytest.fixture(scope="module")
def minilm():
    return MiniLMTextEncoder()


def copy_of(folder, tmp_path):
    return shutil.copytree(folder, tmp_path / folder.name)


def test_known_prompts_come_from_the_model_folder_without_building_the_text_encoder(saved_small, minilm):
    _, folder = saved_small
    loaded = load_model(folder)
    assert isinstance(loaded.text_encoder, PrecomputedTextEncoder)
    with torch.no_grad():
        cached = loaded.text_encoder(["liver", "left kidney", "left renal", NO_TEXT_PROMPT])
    assert loaded.text_encoder.encoder is None  # MiniLM was never built
    for index, text in enumerate(["liver", "left kidney", "left renal", NO_TEXT_PROMPT]):
        fresh = minilm([text])
        length = int(fresh.mask[0].sum())
        assert int(cached.mask[index].sum()) == length
        assert torch.allclose(cached.tokens[index, :length], fresh.tokens[0, :length], atol=1e-6)
        assert torch.allclose(cached.pooled[index], fresh.pooled[0], atol=1e-6)


def test_cached_model_gives_the_same_prompt_embeddings_as_the_saved_one(saved_small):
    model, folder = saved_small
    loaded = load_model(folder)
    with torch.no_grad():
        before = model.encode_prompts(["liver"])
        after = loaded.encode_prompts(["liver"])
    assert torch.allclose(before.tokens, after.tokens, atol=1e-6)
    assert torch.allclose(before.sentence, after.sentence, atol=1e-6)


def test_text_outside_the_cache_builds_the_encoder_on_first_use(saved_small, minilm):
    _, folder = saved_small
    loaded = load_model(folder)
    with torch.no_grad():
        answer = loaded.text_encoder(["segment the spleen please"])
    assert isinstance(loaded.text_encoder.encoder, MiniLMTextEncoder)
    assert torch.allclose(answer.pooled[0], minilm(["segment the spleen please"]).pooled[0], atol=1e-6)


def test_a_cache_made_for_another_encoder_is_ignored(saved_small, minilm, tmp_path):
    model, folder = saved_small
    folder = copy_of(folder, tmp_path)
    identity = dict(encoder_identity(model.config, "0" * 64))
    write_text_embeddings(minilm, folder / TEXT_EMBEDDINGS_FILE, identity, ["liver"])
    assert read_text_embeddings(folder / TEXT_EMBEDDINGS_FILE, encoder_identity(model.config, "1" * 64)) is None
    assert isinstance(load_model(folder).text_encoder, MiniLMTextEncoder)


def test_a_damaged_cache_is_ignored(saved_small, tmp_path):
    _, folder = saved_small
    folder = copy_of(folder, tmp_path)
    path = folder / TEXT_EMBEDDINGS_FILE
    data = bytearray(path.read_bytes())
    data[-8:] = bytes(8 * [0x7F])  # the last float values, not the header
    path.write_bytes(bytes(data))
    assert isinstance(load_model(folder).text_encoder, MiniLMTextEncoder)


def test_the_cache_of_a_model_folder_can_be_remade_from_its_config(saved_small, tmp_path):
    _, folder = saved_small
    folder = copy_of(folder, tmp_path)
    (folder / TEXT_EMBEDDINGS_FILE).unlink()
    assert isinstance(load_model(folder).text_encoder, MiniLMTextEncoder)
    write_text_embedding_cache(folder)
    loaded = load_model(folder)
    assert isinstance(loaded.text_encoder, PrecomputedTextEncoder)
    loaded.text_encoder(["Left kidney", "hepatic"])
    assert loaded.text_encoder.encoder is None


def test_a_text_encoder_that_cannot_answer_a_phrase_saves_the_model_without_a_cache(tmp_path):
    """As training's prompt table does for a synonym it lacks: the checkpoint must still be written."""
    from RefSAM3DLib.errors import RefSAM3DError
    from RefSAM3DLib.model.text_encoder import TextEncoder

    class Refusing(TextEncoder):
        def _encode(self, texts):
            raise RefSAM3DError(f"{texts[0]!r} is not in the prompt table")

    model = build_model("small", text_encoder=Refusing(384, 32))
    folder = save_checkpoint(model, tmp_path / "m", {"structures": ["liver"]})
    assert (folder / "model.safetensors").is_file() and (folder / "config.json").is_file()
    assert not (folder / TEXT_EMBEDDINGS_FILE).exists()
