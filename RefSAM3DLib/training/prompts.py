"""The prompt table: every training phrasing of every structure, encoded ONCE by the frozen text encoder.

Training samples a random phrasing per structure per step. The text encoder is frozen, so its
output for a phrasing never changes: it is computed once (on the machine that has the MiniLM/CLIP
weights) and saved as a safetensors table. Training then builds the model with a
:class:`TableTextEncoder` serving that table, so a GPU machine needs no text-encoder weights and
the projector still trains on exactly the embeddings that inference will produce.

File layout (``prompts.safetensors``): ``tokens`` (T, C_text) float16, the word embeddings of all
phrasings concatenated; ``lengths`` (N,) int64 tokens per phrasing; ``pooled`` (N, C_text) float16.
float16 halves a file that travels with the cache (its rounding, ~5e-4 relative, is far below the
differences between phrasings); served as float32.
Metadata ``table`` (JSON): ``{"texts": [N phrasings], "structures": {key: [phrasing indices]},
"text_encoder": name, "text_dim": C_text}``.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from ..errors import RefSAM3DError
from ..model.prompt_encoder import NO_TEXT_PROMPT
from ..model.text_encoder import TextEmbeddings, TextEncoder
from ..vocabulary import STRUCTURES, training_phrasings


def phrasings_for(structure_keys, modality_by_key: dict[str, set[str]] | None = None,
                  max_per_structure: int = 16, seed: int = 0) -> dict[str, list[str]]:
    """The training phrasings of each structure key (vocabulary.training_phrasings).

    Args:
        structure_keys: vocabulary keys.
        modality_by_key: modalities a structure is trained in; one modality picks its word in the
            sentence templates ("CT images, ..."), several (or none) use both words.
        max_per_structure: keep the display name and a seeded draw of the others up to this many
            (ribs and vertebrae have 30+ phrasings; the table must stay small enough to travel).
        seed: seed of that draw.
    """
    rng = random.Random(seed)
    table = {}
    for key in sorted(set(structure_keys)):
        modalities = (modality_by_key or {}).get(key) or set()
        modality = next(iter(modalities)) if len(modalities) == 1 else None
        name, *others = training_phrasings(STRUCTURES[key], modality)
        table[key] = [name] + rng.sample(others, min(len(others), max_per_structure - 1))
    return table


def build_prompt_table(text_encoder: TextEncoder, phrasings: dict[str, list[str]], path: Path | str,
                       base_weights: dict[str, str] | None = None, batch_size: int = 64) -> Path:
    """Encode every phrasing once and save the table.

    Args:
        text_encoder: the frozen encoder the model will use at inference (its config's).
        phrasings: ``{structure key: [phrasings]}`` (see :func:`phrasings_for`).
        path: the ``.safetensors`` file to write (atomically).
        base_weights: SHA-256 of the text encoder's weight file(s) (``model.base_weights``), kept so
            checkpoints trained from the table still name the text weights they need.
    Returns:
        ``path``.
    """
    # NO_TEXT_PROMPT last: gesture rounds without text decode with it (GestureStep).
    texts = list(dict.fromkeys([t for key in sorted(phrasings) for t in phrasings[key]] + [NO_TEXT_PROMPT]))
    index = {t: i for i, t in enumerate(texts)}
    tokens, lengths, pooled = [], [], []
    for start in range(0, len(texts), batch_size):
        out = text_encoder(texts[start:start + batch_size])
        for i in range(out.tokens.shape[0]):
            n = int(out.mask[i].sum())
            tokens.append(out.tokens[i, :n].half().cpu())
            lengths.append(n)
        pooled.append(out.pooled.half().cpu())
    meta = {
        "texts": texts,
        "structures": {key: [index[t] for t in phrasings[key]] for key in sorted(phrasings)},
        "text_encoder": type(text_encoder).__name__,
        "text_dim": int(text_encoder.dim),
        "base_weights": dict(base_weights or {}),
    }
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    save_file(
        {"tokens": torch.cat(tokens).contiguous(), "lengths": torch.tensor(lengths, dtype=torch.int64),
         "pooled": torch.cat(pooled).contiguous()},
        str(tmp), metadata={"table": json.dumps(meta)},
    )
    tmp.replace(path)
    return path


class PromptTable:
    """A loaded prompt table.

    Args:
        path: a file written by :func:`build_prompt_table`.
    Attributes:
        texts: the N phrasings; ``structures``: ``{key: [phrasing indices]}``; ``base_weights``:
        the text encoder's weight hashes.
    """

    def __init__(self, path: Path | str) -> None:
        path = Path(path)
        if not path.is_file():
            raise RefSAM3DError(f"prompt table {path} not found; run 'python -m RefSAM3DLib.training prepare' first")
        with safe_open(str(path), framework="pt") as handle:
            meta = json.loads(handle.metadata()["table"])
        tensors = {k: v.float() if v.is_floating_point() else v for k, v in load_file(str(path)).items()}
        self.texts: list[str] = meta["texts"]
        self.structures: dict[str, list[int]] = meta["structures"]
        self.text_dim: int = meta["text_dim"]
        self.text_encoder_name: str = meta["text_encoder"]
        self.base_weights: dict[str, str] = meta.get("base_weights", {})
        offsets = torch.cumsum(torch.cat([torch.zeros(1, dtype=torch.int64), tensors["lengths"]]), 0)
        self.entries = {
            text: (tensors["tokens"][offsets[i]:offsets[i + 1]], tensors["pooled"][i])
            for i, text in enumerate(self.texts)
        }

    def phrasings(self, key: str) -> list[str]:
        if key not in self.structures:
            raise RefSAM3DError(f"structure '{key}' is not in the prompt table; rebuild it with 'prepare'")
        return [self.texts[i] for i in self.structures[key]]


class TableTextEncoder(TextEncoder):
    """A frozen TextEncoder that serves a :class:`PromptTable` instead of running a network.

    Drop-in for the model's text encoder during training (``build_model(config, text_encoder=...)``);
    texts outside the table raise RefSAM3DError.

    Args:
        table: the loaded prompt table.
        context_length: the model config's ``text_context_length``.
    """

    def __init__(self, table: PromptTable, context_length: int) -> None:
        super().__init__(dim=table.text_dim, context_length=context_length)
        # TextEncoder.forward finds the device through a parameter; this empty one carries it.
        self.device_anchor = nn.Parameter(torch.zeros(0), requires_grad=False)
        for text, (tokens, pooled) in table.entries.items():
            self._cache[text] = (tokens, torch.ones(tokens.shape[0], dtype=torch.bool), pooled)

    def _encode(self, texts: list[str]) -> TextEmbeddings:
        raise RefSAM3DError(f"prompts {texts[:3]} are not in the training prompt table; rebuild it with 'prepare'")
