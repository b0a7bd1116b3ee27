"""Cross-modal reference prompts: projector (Eq. III) and hierarchical cross-attention (Eq. VI-VIII).

Split for the cost rule "encode once, prompt many": the image half of the cross-attention (the
queries Q_i of each stage) depends only on the window and is computed once in
``stage_queries``; the per-prompt half (keys/values from the projected text, softmax over the L
words) is cheap because L is small.

Where the paper is ambiguous (Eq. VII names the values after the image features, but A_i has one
column per word), values come from the text, as in any cross-attention whose keys are the text.
The output projection of each stage is applied to the L values before the attention-weighted
sum (the same linear map, moved to where it costs L instead of D*H*W rows), and the four stage
outputs are summed -- equal to one linear fusion of the concatenation [O_1 .. O_4] (Eq. VIII).
"""

from __future__ import annotations

import torch
from torch import nn
from segment_anything.modeling.mask_decoder import MLP


class CrossModalProjector(nn.Module):
    """MLP from each word embedding to the decoder's feature space (Eq. III): (..., C_text) -> (..., C).

    Args:
        text_dim: C_text.
        dim: C, the decoder/prompt width.
    """

    def __init__(self, text_dim: int, dim: int) -> None:
        super().__init__()
        self.mlp = MLP(text_dim, dim, dim, num_layers=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(x)


class HierarchicalCrossAttention(nn.Module):
    """Stage features attend to the projected text; fused into a dense cross-modal prompt.

    Args:
        stage_dim: C_vit, width of the stage features V'_i.
        dim: C, width of the projected text and of the output prompt embedding.
        num_heads: attention heads.
        num_stages: number of hierarchical stages N (4).
    """

    def __init__(self, stage_dim: int, dim: int, num_heads: int, num_stages: int = 4) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.q_proj = nn.ModuleList(nn.Linear(stage_dim, dim) for _ in range(num_stages))
        self.k_proj = nn.ModuleList(nn.Linear(dim, dim) for _ in range(num_stages))
        self.v_proj = nn.ModuleList(nn.Linear(dim, dim) for _ in range(num_stages))
        self.out_proj = nn.ModuleList(nn.Linear(dim, dim) for _ in range(num_stages))
        self.norm = nn.LayerNorm(dim)

    def stage_queries(self, stages: list[torch.Tensor]) -> torch.Tensor:
        """Prompt-independent queries: 4 x (B, d, h, w, C_vit) -> (N_stages, B, heads, d*h*w, head_dim)."""
        queries = []
        for proj, stage in zip(self.q_proj, stages):
            b = stage.shape[0]
            q = proj(stage.reshape(b, -1, stage.shape[-1]))
            queries.append(q.reshape(b, -1, self.num_heads, self.head_dim).transpose(1, 2))
        return torch.stack(queries)

    def forward(self, queries: torch.Tensor, text: torch.Tensor, text_mask: torch.Tensor) -> torch.Tensor:
        """Dense cross-modal prompt embeddings.

        Args:
            queries: (N_stages, B, heads, N, head_dim) from ``stage_queries``.
            text: (P, L, C) projected word embeddings.
            text_mask: (P, L) bool, True for real tokens.

        Returns:
            (B, P, N, C) prompt embedding per token position.
        """
        p, l, c = text.shape
        key_bias = torch.zeros(p, l, dtype=queries.dtype, device=queries.device)
        key_bias = key_bias.masked_fill(~text_mask, float("-inf"))[:, None, None, :]  # (P, 1, 1, L)
        out = 0
        for i, q in enumerate(queries):
            k = self.k_proj[i](text).reshape(p, l, self.num_heads, self.head_dim).transpose(1, 2)
            v = self.v_proj[i](text).reshape(p, l, self.num_heads, self.head_dim)
            # Per-head share of the output projection, applied to the L values: (P, heads, L, C).
            w_out = self.out_proj[i].weight.t().reshape(self.num_heads, self.head_dim, c)
            v_out = torch.einsum("plhd,hdc->phlc", v, w_out)
            scores = torch.einsum("bhnd,phld->bphnl", q, k) * self.head_dim**-0.5 + key_bias
            out = out + torch.einsum("bphnl,phlc->bpnc", scores.softmax(-1), v_out) + self.out_proj[i].bias
        return self.norm(out)
