"""3D image encoder: SAM's ViT made volumetric with PETL adapters (paper section 3.2).

Built by composition from ``segment_anything.modeling`` pieces so that the official SAM
checkpoint's keys load into it (see ``sam_weights.py``):

* patch embedding: frozen ``1 x k x k`` convolution (SAM's 2D kernel) followed by a trainable
  depth-wise ``k x 1 x 1`` convolution (paper 3.2.1);
* position: SAM's frozen (h, w) absolute table resized to the token grid, plus a learnable
  depth-axis table (3.2.2);
* blocks: SAM's attention (qkv, proj, decomposed relative positions) and MLP weights applied to
  (B, D*H*W, C) tokens, in 3D windows (zero padding as SAM's 2D windows) or globally where SAM
  is global (3.2.3). Cross-window mixing comes from the global blocks, as in SAM, so windows are
  not shifted. The relative-position tables of h and w come from SAM; the depth table is new and
  trainable (initialised as a copy of the h table when SAM weights are loaded);
* an adapter ``X + Act(X W_down) W_up`` with a depth-wise 3D convolution after the
  down-projection in every block (Eq. I), and one more per stage output (Eq. IV);
* a 3D neck trained from scratch (3.2.4).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from segment_anything.modeling.common import LayerNorm2d, MLPBlock
from segment_anything.modeling.image_encoder import Attention, get_rel_pos

from .conv_stem import ConvStem


class LayerNorm3d(LayerNorm2d):
    """SAM's channel-first LayerNorm for (B, C, D, H, W) tensors."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, d, h, w = x.shape
        return super().forward(x.reshape(b, c, d, h * w)).reshape(b, c, d, h, w)


class PatchEmbed3D(nn.Module):
    """(B, 1, D, H, W) volume -> (B, D/k, H/k, W/k, C) tokens.

    Args:
        patch_size: k, the cubic patch edge in voxels.
        embed_dim: C.
    """

    def __init__(self, patch_size: int, embed_dim: int) -> None:
        super().__init__()
        k = patch_size
        # Frozen in the SAM-initialised config: SAM's 2D kernel, summed over RGB (see sam_weights.py).
        self.proj = nn.Conv3d(1, embed_dim, kernel_size=(1, k, k), stride=(1, k, k))
        # Trainable depth-wise k x 1 x 1; starts as the mean over the k slices of a patch.
        self.depth_proj = nn.Conv3d(embed_dim, embed_dim, kernel_size=(k, 1, 1), stride=(k, 1, 1), groups=embed_dim)
        nn.init.constant_(self.depth_proj.weight, 1.0 / k)
        nn.init.zeros_(self.depth_proj.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.depth_proj(self.proj(x)).permute(0, 2, 3, 4, 1)


class Adapter3D(nn.Module):
    """``X + Act(DWConv3d(X W_down)) W_up`` on (B, D, H, W, C) tokens (paper Eq. I).

    W_up starts at zero so an adapted block starts as the block itself.

    Args:
        dim: C.
        bottleneck_dim: width of the down-projection.
    """

    def __init__(self, dim: int, bottleneck_dim: int) -> None:
        super().__init__()
        self.down = nn.Linear(dim, bottleneck_dim)
        self.dwconv = nn.Conv3d(bottleneck_dim, bottleneck_dim, kernel_size=3, padding=1, groups=bottleneck_dim)
        self.act = nn.GELU()
        self.up = nn.Linear(bottleneck_dim, dim)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.down(x).permute(0, 4, 1, 2, 3)
        h = self.dwconv(h).permute(0, 2, 3, 4, 1)
        return x + self.up(self.act(h))


class Attention3D(Attention):
    """SAM's multi-head attention over (B, D, H, W, C) with 3D decomposed relative positions.

    Keeps SAM's ``qkv``, ``proj``, ``rel_pos_h``, ``rel_pos_w`` (so the checkpoint keys match)
    and adds ``rel_pos_d`` for the new depth axis.

    Args:
        dim: C.
        num_heads: attention heads.
        size_tok: edge of the cubic token region this attention sees (window or whole grid).
    """

    def __init__(self, dim: int, num_heads: int, size_tok: int) -> None:
        super().__init__(dim, num_heads, qkv_bias=True, use_rel_pos=True, input_size=(size_tok, size_tok))
        self.rel_pos_d = nn.Parameter(torch.zeros(2 * size_tok - 1, dim // num_heads))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, d, h, w, c = x.shape
        n = d * h * w
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # each (B, heads, N, head_dim)
        bias = self._rel_pos_bias(q, (d, h, w))
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=self.scale)
        return self.proj(out.transpose(1, 2).reshape(b, d, h, w, c))

    def _rel_pos_bias(self, q: torch.Tensor, size: tuple[int, int, int]) -> torch.Tensor:
        """Decomposed 3D relative-position bias (SAM/MViTv2 style): (B, heads, N, N).

        ``bias[q, k] = rel_d[q, k_d] + rel_h[q, k_h] + rel_w[q, k_w]``, written as one matmul of the
        per-query terms (B, heads, N, D+H+W) with the one-hot (d, h, w) of every key (N, D+H+W):
        the same sums, 3x faster on CPU than broadcasting three terms to (N, N) (bf16, 12^3 tokens).
        """
        d, h, w = size
        b, nh, n, hd = q.shape
        r_q = q.reshape(b, nh, d, h, w, hd)
        rel_d = torch.einsum("bndhwc,dkc->bndhwk", r_q, get_rel_pos(d, d, self.rel_pos_d))
        rel_h = torch.einsum("bndhwc,hkc->bndhwk", r_q, get_rel_pos(h, h, self.rel_pos_h))
        rel_w = torch.einsum("bndhwc,wkc->bndhwk", r_q, get_rel_pos(w, w, self.rel_pos_w))
        per_query = torch.cat([rel_d, rel_h, rel_w], dim=-1).reshape(b, nh, n, d + h + w)
        key_dhw = torch.stack(torch.meshgrid(*(torch.arange(s, device=q.device) for s in size), indexing="ij"), dim=-1)
        key_one_hot = torch.cat([F.one_hot(key_dhw[..., axis].flatten(), s) for axis, s in enumerate(size)], dim=-1)
        return per_query @ key_one_hot.to(per_query.dtype).T


def window_partition_3d(x: torch.Tensor, window: int) -> tuple[torch.Tensor, tuple[int, int, int]]:
    """(B, D, H, W, C) -> (B * nWindows, window, window, window, C), zero-padded; returns padded size."""
    b, d, h, w, c = x.shape
    pad = [(window - s % window) % window for s in (d, h, w)]
    if any(pad):
        x = F.pad(x, (0, 0, 0, pad[2], 0, pad[1], 0, pad[0]))
    dp, hp, wp = d + pad[0], h + pad[1], w + pad[2]
    x = x.view(b, dp // window, window, hp // window, window, wp // window, window, c)
    windows = x.permute(0, 1, 3, 5, 2, 4, 6, 7).reshape(-1, window, window, window, c)
    return windows, (dp, hp, wp)


def window_unpartition_3d(
    windows: torch.Tensor, window: int, padded: tuple[int, int, int], size: tuple[int, int, int]
) -> torch.Tensor:
    """Inverse of ``window_partition_3d``: back to (B, D, H, W, C) without padding."""
    dp, hp, wp = padded
    d, h, w = size
    b = windows.shape[0] // ((dp // window) * (hp // window) * (wp // window))
    x = windows.view(b, dp // window, hp // window, wp // window, window, window, window, -1)
    x = x.permute(0, 1, 4, 2, 5, 3, 6, 7).reshape(b, dp, hp, wp, -1)
    return x[:, :d, :h, :w].contiguous()


class Block3D(nn.Module):
    """SAM's ViT block on 3D tokens, followed by an adapter.

    Args:
        dim: C.
        num_heads: attention heads.
        mlp_ratio: MLP hidden width / C.
        window_tok: 3D window edge in tokens; 0 means global attention.
        grid_tok: token grid edge (sizes the relative-position tables of global blocks).
        adapter_dim: adapter bottleneck width.
    """

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, window_tok: int, grid_tok: int, adapter_dim: int) -> None:
        super().__init__()
        self.window_tok = window_tok
        # eps as in segment_anything's build_sam, so the pretrained norms behave as in SAM.
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention3D(dim, num_heads, window_tok if window_tok > 0 else grid_tok)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = MLPBlock(embedding_dim=dim, mlp_dim=int(dim * mlp_ratio))
        self.adapter = Adapter3D(dim, adapter_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x
        x = self.norm1(x)
        if self.window_tok > 0:
            size = x.shape[1:4]
            x, padded = window_partition_3d(x, self.window_tok)
            x = window_unpartition_3d(self.attn(x), self.window_tok, padded, size)
        else:
            x = self.attn(x)
        x = shortcut + x
        x = x + self.mlp(self.norm2(x))
        return self.adapter(x)


class ImageEncoderViT3D(nn.Module):
    """(B, 1, D, H, W) volume -> neck embedding + 4 adapted stage features.

    Args:
        grid_tok: token grid edge = window_size_vox / patch_size.
        patch_size: cubic patch edge k in voxels.
        embed_dim: ViT width C.
        depth: number of blocks.
        num_heads: attention heads.
        mlp_ratio: MLP hidden width / C.
        attn_window_tok: 3D window edge (tokens) of windowed blocks.
        global_attn_indexes: blocks with global attention.
        stage_indexes: blocks whose outputs are the stage features V_1..V_4.
        adapter_dim: adapter bottleneck width.
        neck_dim: channels of the neck output.
        stem_channels: channels of the convolutional stem's levels (hybrid); empty for SAM's
            patch embedding.
    """

    def __init__(
        self,
        grid_tok: int,
        patch_size: int,
        embed_dim: int,
        depth: int,
        num_heads: int,
        mlp_ratio: float,
        attn_window_tok: int,
        global_attn_indexes: tuple[int, ...],
        stage_indexes: tuple[int, ...],
        adapter_dim: int,
        neck_dim: int,
        stem_channels: tuple[int, ...] = (),
    ) -> None:
        super().__init__()
        self.stage_indexes = tuple(stage_indexes)
        if stem_channels:
            self.patch_embed = ConvStem(tuple(stem_channels), patch_size, embed_dim)
        else:
            self.patch_embed = PatchEmbed3D(patch_size, embed_dim)
        # SAM's (h, w) table resized to the token grid, and the new depth table (paper 3.2.2).
        self.pos_embed = nn.Parameter(torch.zeros(1, grid_tok, grid_tok, embed_dim))
        self.pos_embed_depth = nn.Parameter(torch.zeros(1, grid_tok, 1, 1, embed_dim))
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        self.blocks = nn.ModuleList(
            Block3D(
                embed_dim, num_heads, mlp_ratio,
                window_tok=0 if i in global_attn_indexes else attn_window_tok,
                grid_tok=grid_tok, adapter_dim=adapter_dim,
            )
            for i in range(depth)
        )
        self.stage_adapters = nn.ModuleList(Adapter3D(embed_dim, adapter_dim) for _ in stage_indexes)
        self.neck = nn.Sequential(
            nn.Conv3d(embed_dim, neck_dim, kernel_size=1, bias=False),
            LayerNorm3d(neck_dim),
            nn.Conv3d(neck_dim, neck_dim, kernel_size=3, padding=1, bias=False),
            LayerNorm3d(neck_dim),
        )

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
        """Returns the neck embedding (B, neck_dim, d, h, w), 4 stage features (B, d, h, w, C) and
        the convolutional stem's level outputs, finest first (empty without a stem)."""
        if isinstance(self.patch_embed, ConvStem):
            x, skips = self.patch_embed(x)
        else:
            x, skips = self.patch_embed(x), []
        x = x + self.pos_embed[:, None] + self.pos_embed_depth
        stages = []
        for i, block in enumerate(self.blocks):
            x = block(x)
            if i in self.stage_indexes:
                stages.append(self.stage_adapters[len(stages)](x))
        return self.neck(x.permute(0, 4, 1, 2, 3)), stages, skips

    def petl_parameter_names(self) -> set[str]:
        """Names of the parameters that train when the ViT itself is frozen (SAM-initialised)."""
        trainable_prefixes = ("patch_embed.depth_proj.", "pos_embed_depth", "stage_adapters.", "neck.")
        names = set()
        for name, _ in self.named_parameters():
            if name.startswith(trainable_prefixes) or ".adapter." in name or name.endswith("attn.rel_pos_d"):
                names.add(name)
        return names
