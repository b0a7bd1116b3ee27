"""SAM's weights into the 3D network: the official 2D ViT-B checkpoint (``sam_vit_b_01ec64.pth``)
into the 3D image encoder, and SAM's mask-decoder transformer, single-mask hypernetwork and point
embeddings into ours where the shapes carry over (as MONAI's ``SwinUNETR.load_from`` loads
pre-trained weights beside the network they fill).

    report = load_sam_weights(model, path)   # -> LoadReport; records the file's SHA-256 in model.base_weights

The key names follow ``image_encoder.py`` (built from ``segment_anything.modeling`` pieces so
that SAM's keys fit), ``mask_decoder.py`` and ``prompt_encoder.py``.
"""

from __future__ import annotations

import inspect
import logging
from pathlib import Path

import torch
import torch.nn.functional as F
from segment_anything.modeling import Sam  # already imported by image_encoder.py

from ..errors import RefSAM3DError
from ..weights import sha256_file
from .refsam3d import RefSAM3D
from .weight_files import LoadReport, read_torch_weights

log = logging.getLogger(__name__)


def _sam_pixel_statistics() -> tuple[torch.Tensor, torch.Tensor]:
    """SAM's input normalisation (mean, std per RGB channel), from segment_anything's own defaults."""
    params = inspect.signature(Sam.__init__).parameters
    return torch.tensor(params["pixel_mean"].default), torch.tensor(params["pixel_std"].default)


def _fold_patch_kernel(weight: torch.Tensor, bias: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """SAM's (C, 3, k, k) kernel -> an exactly equivalent (C, 1, 1, k, k) kernel for one channel in [0, 1].

    SAM sees a grey image x in [0, 1] as RGB (255 x - mean_c) / std_c; the conv of that equals
    a conv of x with sum_c w_c 255 / std_c plus a constant bias shift.
    """
    mean, std = _sam_pixel_statistics()
    scale = (255.0 / std)[None, :, None, None]
    folded = (weight * scale).sum(dim=1)
    shift = (weight.sum(dim=(2, 3)) * (mean / std)[None]).sum(dim=1)
    return folded[:, None, None], bias - shift


def _resize_rel_pos(table: torch.Tensor, length: int) -> torch.Tensor:
    """(L, head_dim) relative-position table -> (length, head_dim), linear (as SAM's get_rel_pos)."""
    if table.shape[0] == length:
        return table.clone()
    return F.interpolate(table.t()[None], size=length, mode="linear")[0].t().contiguous()


def load_sam_weights(model: RefSAM3D, path: "str | Path") -> LoadReport:
    """Copy an official-format SAM checkpoint into the model's 3D image encoder, and start its mask
    decoder and spatial prompt encoder from SAM's where the shapes carry over
    (:func:`_load_sam_decoder_and_prompt_weights` says which do not).

    2D patch kernel -> frozen 1 x k x k kernel (with SAM's pixel normalisation folded in), (h, w)
    position table resized to the token grid, relative-position tables resized to the 3D window
    (the new depth table starts as the h table), every block's qkv/proj/norm/MLP copied.

    Raises:
        RefSAM3DError: not a SAM checkpoint, a SAM of another size, or weights missing.
    """
    state = read_torch_weights(path)
    prefix = "image_encoder."
    encoder_state = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    if "patch_embed.proj.weight" not in encoder_state:
        raise RefSAM3DError(
            f"{Path(path).name} is not a Segment Anything checkpoint (no image_encoder.patch_embed.proj.weight); "
            "use sam_vit_b_01ec64.pth."
        )
    config = model.config
    encoder = model.image_encoder
    kernel = encoder_state["patch_embed.proj.weight"]
    sam_depth = len({k.split(".")[1] for k in encoder_state if k.startswith("blocks.")})
    if (kernel.shape[0], kernel.shape[2], sam_depth) != (config.embed_dim, config.patch_size, config.depth):
        raise RefSAM3DError(
            f"{Path(path).name} is a SAM with width {kernel.shape[0]}, patch {kernel.shape[2]}, {sam_depth} blocks, "
            f"but config {config.name!r} needs width {config.embed_dim}, patch {config.patch_size}, "
            f"{config.depth} blocks; use the matching SAM checkpoint (vit_b: sam_vit_b_01ec64.pth)."
        )
    sam_grid = encoder_state["pos_embed"].shape[1]
    sam_global = tuple(i for i in range(sam_depth)
                       if encoder_state[f"blocks.{i}.attn.rel_pos_h"].shape[0] == 2 * sam_grid - 1)
    if sam_global != tuple(config.global_attn_indexes):
        raise RefSAM3DError(
            f"{Path(path).name} has global attention in blocks {sam_global}, config {config.name!r} in "
            f"{tuple(config.global_attn_indexes)}; it is a different SAM variant."
        )

    new = {}
    new["patch_embed.proj.weight"], new["patch_embed.proj.bias"] = _fold_patch_kernel(
        kernel, encoder_state["patch_embed.proj.bias"])
    pos = encoder_state["pos_embed"].permute(0, 3, 1, 2)
    grid = config.grid_tok
    new["pos_embed"] = F.interpolate(pos, size=(grid, grid), mode="bicubic", align_corners=False).permute(0, 2, 3, 1)
    used = {"patch_embed.proj.weight", "patch_embed.proj.bias", "pos_embed"}
    own = dict(encoder.named_parameters())
    for i in range(config.depth):
        for key in ("norm1.weight", "norm1.bias", "attn.qkv.weight", "attn.qkv.bias", "attn.proj.weight",
                    "attn.proj.bias", "norm2.weight", "norm2.bias", "mlp.lin1.weight", "mlp.lin1.bias",
                    "mlp.lin2.weight", "mlp.lin2.bias"):
            name = f"blocks.{i}.{key}"
            if name in encoder_state:
                new[name] = encoder_state[name]
                used.add(name)
        for axis in ("h", "w"):
            name = f"blocks.{i}.attn.rel_pos_{axis}"
            if name in encoder_state:
                new[name] = _resize_rel_pos(encoder_state[name], own[name].shape[0])
                used.add(name)
        if f"blocks.{i}.attn.rel_pos_h" in new:
            new[f"blocks.{i}.attn.rel_pos_d"] = new[f"blocks.{i}.attn.rel_pos_h"].clone()
    for name, tensor in new.items():
        if tensor.shape != own[name].shape:
            raise RefSAM3DError(f"{Path(path).name}: {name} has shape {tuple(tensor.shape)}, model needs {tuple(own[name].shape)}.")
    encoder.load_state_dict(new, strict=False)

    decoder_loaded = _load_sam_decoder_and_prompt_weights(model, state)
    used_by_decoder = {key for keys in decoder_loaded.values() for key in keys}
    petl = encoder.petl_parameter_names()
    report = LoadReport(
        source=str(path),
        loaded=sorted(new) + sorted(decoder_loaded),
        missing=sorted(n for n in own if n not in new and n not in petl),
        unexpected=sorted(prefix + k for k in encoder_state if k not in used)
        + sorted(k for k in state if not k.startswith(prefix) and k not in used_by_decoder),
    )
    if config.pretrained_image_encoder and report.missing:
        raise RefSAM3DError(f"{Path(path).name} lacks frozen weights {report.missing[:8]}; the file is incomplete.")
    model.base_weights["sam_image_encoder"] = sha256_file(Path(path))
    log.info("SAM weights: %s", report.summary())
    return report


def _sam_decoder_candidates(model: RefSAM3D, state: dict[str, torch.Tensor]) -> dict[str, tuple[torch.Tensor, list[str]]]:
    """Our decoder/prompt-encoder parameter -> (SAM's tensor for it, the SAM keys it comes from).

    SAM's ``TwoWayTransformer`` is ours (same class, same names); SAM's first output token and
    its hypernetwork are our single mask token and hypernetwork (SAM's single-mask output);
    SAM's point embeddings (0 negative, 1 positive, 2 and 3 box corners) and not-a-point
    embedding are ours in the same order.
    """
    pairs = {f"mask_decoder.transformer.{name}": [f"mask_decoder.transformer.{name}"]
             for name, _ in model.mask_decoder.transformer.named_parameters()}
    pairs["mask_decoder.mask_token.weight"] = ["mask_decoder.mask_tokens.weight"]
    for layer in range(len(model.mask_decoder.hypernetwork.layers)):
        for kind in ("weight", "bias"):
            pairs[f"mask_decoder.hypernetwork.layers.{layer}.{kind}"] = [
                f"mask_decoder.output_hypernetworks_mlps.0.layers.{layer}.{kind}"]
    pairs["spatial_prompts.point_embeddings.weight"] = [f"prompt_encoder.point_embeddings.{i}.weight" for i in range(4)]
    pairs["spatial_prompts.not_a_point.weight"] = ["prompt_encoder.not_a_point_embed.weight"]
    candidates = {}
    for ours, keys in pairs.items():
        if all(key in state for key in keys):
            tensor = torch.cat([state[key] for key in keys])
            candidates[ours] = (tensor[:1] if ours == "mask_decoder.mask_token.weight" else tensor, keys)
    return candidates


def _load_sam_decoder_and_prompt_weights(model: RefSAM3D, state: dict[str, torch.Tensor]) -> dict[str, list[str]]:
    """Start the 3D mask decoder and spatial prompt encoder from SAM's where shapes carry over.

    What does not carry over: SAM's 2D up-scaling convolutions, IoU head and extra mask tokens
    (our pixel decoder is 3D and there is one mask per prompt), the last hypernetwork layer when
    its width (SAM: transformer_dim / 8) differs from our full-resolution channels (vit_b: 32 vs
    16), the random Fourier matrix (2D there, a fixed-seed 3D buffer here), and SAM's mask prompt
    (``no_mask_embed``, ``mask_downscaling``: ours takes text instead).

    Returns:
        our parameter name -> the SAM keys copied into it.
    """
    own = dict(model.named_parameters())
    loaded = {}
    with torch.no_grad():
        for ours, (tensor, keys) in _sam_decoder_candidates(model, state).items():
            if tuple(tensor.shape) == tuple(own[ours].shape):
                own[ours].copy_(tensor)
                loaded[ours] = keys
    return loaded
