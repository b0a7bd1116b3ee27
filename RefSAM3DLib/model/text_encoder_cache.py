"""The frozen text encoder's answers for the vocabulary's phrases, kept in the model folder.

The text encoder is frozen (only the projector after it trains), so what it makes of "liver"
depends on its own weights, its context length and the phrase -- never on the trained weights.
A model folder therefore keeps those answers in ``text_embeddings.safetensors``: a run whose
prompts are all vocabulary phrases reads them there and never builds the encoder (nor imports
sentence-transformers and transformers); other text builds it on first use.

The file records the encoder's name, the SHA-256 of its weights, the context length and a format
version, plus a SHA-256 of its own contents; a file that does not match the model being loaded is
ignored with a log line (the encoder then answers everything), never trusted.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Callable

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from ..atomic import atomic_write
from ..vocabulary import STRUCTURES
from .prompt_encoder import NO_TEXT_PROMPT
from .text_encoder import TextEmbeddings, TextEncoder

log = logging.getLogger(__name__)

CACHE_FILE = "text_embeddings.safetensors"
FORMAT = "refsam3d-text-embeddings"
FORMAT_VERSION = "1"

Entry = tuple[torch.Tensor, torch.Tensor, torch.Tensor]
"""One text: tokens (L, C_text), mask (L,) all True, pooled (C_text,)."""


def vocabulary_phrases(structure_keys: "list[str] | None" = None) -> list[str]:
    """The names (as written and lower case), synonyms and keys in words of the structures
    ``structure_keys`` (default: the whole vocabulary): the texts the prompt parser hands to the
    encoder when a prompt names a structure plainly ("liver", "left kidney", "ivc").

    A model folder caches those of the structures it was trained on (about 1 MB for 13 organs;
    the whole vocabulary would be 8 MB); sentences ("perform liver segmentation") and other
    structures still reach the encoder. Always cached: ``NO_TEXT_PROMPT``, what a point or box
    given without text is decoded with.
    """
    phrases: list[str] = [NO_TEXT_PROMPT]
    for key, structure in STRUCTURES.items():
        if structure_keys is None or key in structure_keys:
            phrases += [structure.name, structure.name.lower(), *structure.synonyms, structure.key.replace("_", " ")]
    return list(dict.fromkeys(phrases))


def encoder_identity(config, encoder_sha256: str) -> dict[str, str]:
    """What the cached answers depend on: the file is used only where all of it matches."""
    return {"format": FORMAT, "format_version": FORMAT_VERSION, "text_encoder": config.text_encoder,
            "encoder_sha256": encoder_sha256, "context_length": str(config.text_context_length)}


def _contents_sha256(phrases: list[str], tensors: dict[str, torch.Tensor]) -> str:
    digest = hashlib.sha256(json.dumps(phrases, ensure_ascii=False).encode("utf-8"))
    for index in range(len(phrases)):
        for kind in ("tokens", "pooled"):
            digest.update(tensors[f"{kind}.{index}"].numpy().tobytes())
    return digest.hexdigest()


def write_text_embeddings(encoder: TextEncoder, path: "str | Path", identity: dict[str, str],
                          phrases: list[str] | None = None) -> Path:
    """Encode ``phrases`` (default: the whole vocabulary's) one at a time and write them.

    One at a time, so that a phrase's answer does not depend on which others shared its batch.
    Written atomically.
    """
    phrases = list(phrases if phrases is not None else vocabulary_phrases())
    tensors: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        for index, phrase in enumerate(phrases):
            encoded = encoder([phrase])
            length = int(encoded.mask[0].sum())
            tensors[f"tokens.{index}"] = encoded.tokens[0, :length].float().cpu().contiguous()
            tensors[f"pooled.{index}"] = encoded.pooled[0].float().cpu().contiguous()
    metadata = dict(identity, phrases=json.dumps(phrases, ensure_ascii=False),
                    contents_sha256=_contents_sha256(phrases, tensors))
    path = Path(path)
    with atomic_write(path) as temporary:
        save_file(tensors, str(temporary), metadata=metadata)
    return path


def read_text_embeddings(path: "str | Path", identity: dict[str, str]) -> dict[str, Entry] | None:
    """The cached answers by text, or None (logged) when the file is missing, damaged or was made
    by another encoder, context length or format."""
    path = Path(path)
    if not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
            differs = sorted(key for key, value in identity.items() if metadata.get(key) != value)
            if differs:
                log.info("%s ignored: made for another %s", path.name, ", ".join(differs))
                return None
            phrases = json.loads(metadata["phrases"])
            tensors = {name: handle.get_tensor(name) for name in handle.keys()}
    except (SafetensorError, OSError, ValueError, KeyError, RuntimeError) as error:
        log.warning("%s ignored: unreadable (%s)", path.name, str(error)[:120])
        return None
    try:
        intact = _contents_sha256(phrases, tensors) == metadata.get("contents_sha256")
    except (KeyError, TypeError):
        intact = False
    if not intact:
        log.warning("%s ignored: its contents do not match its SHA-256 (damaged)", path.name)
        return None
    entries = {}
    for index, phrase in enumerate(phrases):
        tokens = tensors[f"tokens.{index}"]
        entries[phrase] = (tokens, torch.ones(tokens.shape[0], dtype=torch.bool), tensors[f"pooled.{index}"])
    return entries


class PrecomputedTextEncoder(TextEncoder):
    """A frozen text encoder that answers known texts from a cache and builds the real encoder only
    for the first text it does not know.

    Args:
        dim: C_text of the real encoder.
        context_length: its maximum number of tokens L.
        entries: text -> (tokens (L, C_text), mask (L,), pooled (C_text,)) from
            :func:`read_text_embeddings`.
        build: makes the real encoder (e.g. ``lambda: build_text_encoder(config)``).
    """

    def __init__(self, dim: int, context_length: int, entries: dict[str, Entry],
                 build: Callable[[], TextEncoder]) -> None:
        super().__init__(dim, context_length)
        self._cache.update(entries)
        self._build = build
        self.encoder: TextEncoder | None = None

    def _encode(self, texts: list[str]) -> TextEmbeddings:
        if self.encoder is None:
            log.info("text outside the embedding cache (%s): loading the text encoder", texts[0][:40])
            self.encoder = self._build().to(self.device)
        return self.encoder._encode(texts)
