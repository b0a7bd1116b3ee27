"""The one registry of RefSAM3D configurations (``MODEL_CONFIGS``) and their type, ``ModelConfig``.

Two configurations of the same architecture (paper section 3):

* ``vit_b`` -- the paper's: SAM ViT-B image encoder (embed 768, depth 12, 12 heads, patch 16,
  global attention at blocks 2, 5, 8, 11) initialised from the official SAM checkpoint
  (``sam_vit_b_01ec64.pth``) and frozen except for the PETL parts (adapters, depth-wise
  patch-embedding convolution, depth position table, depth relative-position tables, 3D neck);
  CLIP ViT-B-16 text tower (open_clip), frozen; 1.0 mm isotropic, 128^3 voxel windows.
  Four 2x transposed-convolution steps restore the input resolution (log2(16) = 4).
* ``small`` -- the bundled CPU default: the same architecture scaled down (patch 8, width 192,
  depth 8) so that it trains and runs on 2 CPU cores. No SAM weights exist for it, so everything
  except the frozen MiniLM text encoder (all-MiniLM-L6-v2, 384-d) trains from scratch;
  2.0 mm isotropic, 96^3 voxel windows (12^3 tokens), three 2x up-sampling steps (log2(8) = 3).

Sizes and costs (``benchmarks/bench_model.py``, random weights, 1 CPU thread, fp32):

======  =========  ===========  ==========  ============  ========  ===========  ===========
config  window     params       trainable   encode GFLOP  encode s  decode x1 s  decode x8 s
======  =========  ===========  ==========  ============  ========  ===========  ===========
small   96^3 2 mm  28.0 M       5.3 M       16.7          0.84      0.02         0.22
vit_b   128^3 1mm  158.2 M      9.5 M       101           5.5       0.09         0.75
======  =========  ===========  ==========  ============  ========  ===========  ===========

(small: 22.7 M of the total is the frozen MiniLM; vit_b: 85.3 M frozen SAM ViT-B + 63.4 M frozen
CLIP text, 3.6 M = 4.1 % of the image encoder trains.) On one H200, vit_b encodes a 128^3 window
in 33 ms fp32 / 20 ms bf16 autocast and decodes 8 prompts in 6-7 ms.
``refsam3d info --config NAME --json`` prints the per-component counts (``parameter_report``).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

from ..errors import RefSAM3DError


@dataclass(frozen=True)
class ModelConfig:
    """Everything that defines a RefSAM3D network and its model space.

    Args:
        name: registry name, recorded in checkpoints.
        spacing_mm: isotropic model spacing (D, H, W axes) in mm.
        window_size_vox: edge of the cubic model input window in voxels (divisible by patch_size).
        ct_window_hu: CT intensity window (low, high) in HU, clipped then scaled to [0, 1].
        mr_percentiles: MR robust scaling percentiles (low, high) of non-zero voxels.
        patch_size: edge of the cubic 3D patch in voxels; log2(patch_size) up-sampling steps.
        embed_dim: ViT width C.
        depth: number of ViT blocks.
        num_heads: attention heads per block.
        mlp_ratio: ViT MLP hidden width / embed_dim.
        attn_window_tok: edge of the cubic 3D attention window, in tokens, of windowed blocks.
        global_attn_indexes: blocks with global attention (as in SAM).
        stage_indexes: the 4 blocks whose outputs are the hierarchical stage features V_1..V_4.
        adapter_dim: bottleneck width of every adapter (W_down: C -> adapter_dim).
        pretrained_image_encoder: True when the ViT comes from a SAM checkpoint and is frozen
            (only PETL parts train); False trains every image-encoder weight from scratch.
        neck_dim: channels of the 3D neck output = the decoder's transformer width.
        decoder_depth: layers of SAM's TwoWayTransformer.
        decoder_heads: heads of the TwoWayTransformer and of the hierarchical cross-attention.
        decoder_mlp_dim: MLP width inside the TwoWayTransformer.
        upsample_channels: channels after each 2x transposed 3D convolution, length
            log2(patch_size), ending at full resolution.
        fusion_channels: channels of the per-prompt full-resolution fusion with the image.
        text_encoder: ``"minilm"`` (sentence-transformers all-MiniLM-L6-v2) or ``"clip"``
            (open_clip ViT-B-16 text tower).
        text_dim: width C_text of the text encoder's token embeddings.
        text_context_length: maximum number of text tokens L.
        stem_channels: channels of a convolutional stem's levels (full resolution, then each
            half), whose outputs also feed the pixel decoder as U-Net skips (the hybrid ``small``);
            empty: SAM's patch embedding, as in the paper (``vit_b``).
        clip_text: open_clip TextTransformer arguments for ``text_encoder="clip"``
            (width, heads, layers, vocab_size, output_dim); ignored for MiniLM.
        token_logits: the mask decoder also reads the transformer's per-prompt image tokens
            (``mask_decoder.py``), so that points and boxes can say where. False in checkpoints
            made before it existed (their record has no such field); ``checkpoint.upgrade``
            adds it to such a model without changing its outputs.
        click_prior: clicks also act through ``click_prior.ClickPrior`` (a local logit term from
            the pixel features). False in checkpoints made before it existed; ``checkpoint.upgrade``
            adds it (text-only outputs unchanged; answers to clicks gain its untrained term).
        gesture_maps: boxes and clicks also act as full-resolution maps (``gesture_maps.GestureMaps``).
            False in checkpoints made before it existed; ``checkpoint.upgrade`` adds it at zero.
        gesture_text_biases: the gesture maps' MLP has its own biases for prompts with text (a
            gesture corrects a text answer, or draws the structure alone). False in checkpoints
            made before it existed; ``checkpoint.upgrade`` adds them at zero.
        gesture_intensity: the gesture maps' MLP also reads the window's intensities and how alike
            each voxel's is to the clicked voxels' (``gesture_maps.INTENSITY_CHANNELS``). False in
            checkpoints made before it existed; ``checkpoint.upgrade`` adds it at zero.
        local_clicks_with_text: clicks of prompts with text act only through the click prior and
            the gesture maps, not as sparse tokens (``RefSAM3D._token_labels``). A switch without
            weights; False in checkpoints made before it existed. On in ``small`` since
            refsam3d-small-v13 (v12's weights); off in ``vit_b``, whose click tokens come from SAM's
            prompt encoder and have not been measured either way.
    """

    name: str
    spacing_mm: tuple[float, float, float]
    window_size_vox: int
    ct_window_hu: tuple[float, float]
    mr_percentiles: tuple[float, float]
    patch_size: int
    embed_dim: int
    depth: int
    num_heads: int
    attn_window_tok: int
    global_attn_indexes: tuple[int, ...]
    stage_indexes: tuple[int, int, int, int]
    adapter_dim: int
    pretrained_image_encoder: bool
    neck_dim: int
    upsample_channels: tuple[int, ...]
    text_encoder: str
    text_dim: int
    text_context_length: int
    mlp_ratio: float = 4.0
    decoder_depth: int = 2
    decoder_heads: int = 8
    decoder_mlp_dim: int = 2048
    fusion_channels: int = 16
    stem_channels: tuple[int, ...] = ()
    clip_text: dict = field(default_factory=dict)
    token_logits: bool = False
    click_prior: bool = False
    gesture_maps: bool = False
    gesture_text_biases: bool = False
    gesture_intensity: bool = False
    local_clicks_with_text: bool = False

    @property
    def grid_tok(self) -> int:
        """Token grid edge: window_size_vox / patch_size."""
        return self.window_size_vox // self.patch_size

    @property
    def num_upsample(self) -> int:
        """Number of 2x transposed-convolution steps back to full resolution."""
        return int(round(math.log2(self.patch_size)))

    def validate(self) -> None:
        """Raise RefSAM3DError when the numbers cannot form a network, or one of a sane size."""
        problems = self._range_problems()
        if problems:  # the checks below divide by these numbers
            raise RefSAM3DError(f"Invalid model config {self.name!r}: " + "; ".join(problems) + ".")
        if 2 ** self.num_upsample != self.patch_size:
            problems.append(f"patch_size {self.patch_size} is not a power of two")
        if self.window_size_vox % self.patch_size:
            problems.append(f"window_size_vox {self.window_size_vox} is not a multiple of patch_size {self.patch_size}")
        if len(self.upsample_channels) != self.num_upsample:
            problems.append(f"upsample_channels needs {self.num_upsample} entries (log2 patch_size)")
        if self.stem_channels and (len(self.stem_channels) > self.num_upsample
                                   or self.patch_size % 2 ** (len(self.stem_channels) - 1)):
            problems.append(f"stem_channels needs at most {self.num_upsample} levels (log2 patch_size)")
        if self.embed_dim % self.num_heads:
            problems.append("embed_dim must be divisible by num_heads")
        if self.neck_dim % self.decoder_heads:
            problems.append("neck_dim must be divisible by decoder_heads")
        if len(self.stage_indexes) != 4 or max(self.stage_indexes) >= self.depth:
            problems.append("stage_indexes must name 4 blocks below depth")
        if self.text_encoder not in ("minilm", "clip"):
            problems.append(f"unknown text_encoder {self.text_encoder!r} (use 'minilm' or 'clip')")
        if problems:
            raise RefSAM3DError(f"Invalid model config {self.name!r}: " + "; ".join(problems) + ".")

    def _range_problems(self) -> list[str]:
        problems = [f"{name} {getattr(self, name)} is outside {low}..{high}"
                    for name, (low, high) in _LIMITS.items() if not low <= getattr(self, name) <= high]
        items = dict(_ITEM_LIMITS, global_attn_indexes=(0, self.depth - 1), stage_indexes=(0, self.depth - 1))
        problems += [f"{name} {list(getattr(self, name))} has values outside {low}..{high}"
                     for name, (low, high) in items.items()
                     if not all(low <= value <= high for value in getattr(self, name))]
        for name in ("ct_window_hu", "mr_percentiles"):
            if getattr(self, name)[0] >= getattr(self, name)[1]:
                problems.append(f"{name} {list(getattr(self, name))} must rise (low, high)")
        for key, value in self.clip_text.items():
            if key not in _CLIP_TEXT_LIMITS:
                problems.append(f"clip_text has unknown field {key!r} (known: {', '.join(_CLIP_TEXT_LIMITS)})")
            elif not _CLIP_TEXT_LIMITS[key][0] <= value <= _CLIP_TEXT_LIMITS[key][1]:
                problems.append(f"clip_text {key} {value} is outside {_CLIP_TEXT_LIMITS[key][0]}..{_CLIP_TEXT_LIMITS[key][1]}")
        return problems

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "ModelConfig":
        """A config from its JSON form (a checkpoint's ``model_config``), every field type-checked.

        A checkpoint folder may come from anywhere: a wrong type must be one clear error here,
        not a traceback from deep inside the network builder (call ``validate`` for the ranges).
        """
        if not isinstance(data, dict):
            raise RefSAM3DError(f"Model config must be a JSON object, not {type(data).__name__}; restore the model folder.")
        fields = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - set(fields))
        if unknown:
            raise RefSAM3DError(f"Model config has unknown fields {unknown}; upgrade refsam3d to read this checkpoint.")
        missing = sorted(name for name, f in fields.items() if name not in data
                         and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING)
        problems = [f"{name} is missing" for name in missing]
        problems += [problem for name, value in data.items() if (problem := _type_problem(name, value, fields[name].type))]
        if problems:
            raise RefSAM3DError("Invalid model config: " + "; ".join(problems) + "; restore the model folder.")
        return cls(**{name: tuple(value) if isinstance(value, list) else value for name, value in data.items()})


# Sizes beyond these are a typo or a hostile file, not a network (vit_b: width 768, depth 12).
_LIMITS = {
    "window_size_vox": (1, 512), "patch_size": (1, 64), "embed_dim": (1, 4096), "depth": (1, 128),
    "num_heads": (1, 128), "attn_window_tok": (1, 512), "adapter_dim": (1, 4096), "neck_dim": (1, 4096),
    "text_dim": (1, 4096), "text_context_length": (1, 4096), "mlp_ratio": (0.125, 16.0),
    "decoder_depth": (1, 32), "decoder_heads": (1, 128), "decoder_mlp_dim": (1, 65536),
    "fusion_channels": (1, 4096),
}
_ITEM_LIMITS = {
    "spacing_mm": (0.01, 100.0), "ct_window_hu": (-10000.0, 100000.0), "mr_percentiles": (0.0, 100.0),
    "upsample_channels": (1, 4096), "stem_channels": (1, 4096),
}
_CLIP_TEXT_LIMITS = {"width": (1, 4096), "heads": (1, 128), "layers": (1, 128), "vocab_size": (1, 1_000_000),
                     "output_dim": (1, 4096)}


def _type_problem(name: str, value, annotation: str) -> str | None:
    """What is wrong with ``value`` for a field annotated ``annotation`` (a string: postponed annotations)."""
    shown = repr(value) if len(repr(value)) <= 40 else repr(value)[:37] + "..."
    if annotation.startswith("tuple["):
        kind = annotation[len("tuple["):].split(",")[0].strip()
        length = None if "..." in annotation else annotation.count(",") + 1
        if (not isinstance(value, (list, tuple)) or (length is not None and len(value) != length)
                or not all(_is_a(item, kind) for item in value)):
            return f"{name} must be a list of {length or 'any number of'} {kind}s, not {shown}"
    elif annotation == "dict":
        if not isinstance(value, dict) or not all(_is_a(item, "int") for item in value.values()):
            return f"{name} must map names to integers, not {shown}"
    elif not _is_a(value, annotation):
        return f"{name} must be a{'n' if annotation == 'int' else ''} {annotation}, not {shown}"
    return None


def _is_a(value, kind: str) -> bool:
    if kind == "bool" or isinstance(value, bool):  # JSON true is no number, 1 is no boolean
        return kind == "bool" and isinstance(value, bool)
    if kind == "int":
        return isinstance(value, int)
    if kind == "float":
        return isinstance(value, (int, float)) and math.isfinite(value)
    return isinstance(value, str)


MODEL_CONFIGS: dict[str, ModelConfig] = {
    "small": ModelConfig(
        name="small",
        spacing_mm=(3.0, 3.0, 3.0),
        window_size_vox=96,
        ct_window_hu=(-125.0, 275.0),
        mr_percentiles=(0.5, 99.5),
        patch_size=8,
        embed_dim=192,
        depth=8,
        num_heads=6,
        attn_window_tok=6,
        global_attn_indexes=(3, 7),
        stage_indexes=(1, 3, 5, 7),
        adapter_dim=32,
        pretrained_image_encoder=False,
        neck_dim=128,
        upsample_channels=(64, 32, 8),
        stem_channels=(8, 16, 32),
        text_encoder="minilm",
        text_dim=384,
        text_context_length=32,
        decoder_depth=2,
        decoder_heads=4,
        decoder_mlp_dim=512,
        fusion_channels=4,
        token_logits=True,
        click_prior=True,
        gesture_maps=True,
        gesture_text_biases=True,
        gesture_intensity=True,
        local_clicks_with_text=True,
    ),
    "vit_b": ModelConfig(
        name="vit_b",
        spacing_mm=(1.0, 1.0, 1.0),
        window_size_vox=128,
        ct_window_hu=(-125.0, 275.0),
        mr_percentiles=(0.5, 99.5),
        patch_size=16,
        embed_dim=768,
        depth=12,
        num_heads=12,
        attn_window_tok=4,
        global_attn_indexes=(2, 5, 8, 11),
        stage_indexes=(2, 5, 8, 11),
        adapter_dim=64,
        pretrained_image_encoder=True,
        neck_dim=256,
        upsample_channels=(128, 64, 32, 16),
        text_encoder="clip",
        text_dim=512,
        text_context_length=77,
        decoder_depth=2,
        decoder_heads=8,
        decoder_mlp_dim=2048,
        fusion_channels=4,
        clip_text=dict(width=512, heads=8, layers=12, vocab_size=49408, output_dim=512),
        token_logits=True,
        click_prior=True,
        gesture_maps=True,
        gesture_text_biases=True,
        gesture_intensity=True,
    ),
}


def get_config(name_or_config: "str | ModelConfig") -> ModelConfig:
    """The registered config for a name, or the given ModelConfig itself (validated)."""
    if isinstance(name_or_config, ModelConfig):
        config = name_or_config
    else:
        try:
            config = MODEL_CONFIGS[name_or_config]
        except KeyError:
            raise RefSAM3DError(
                f"Unknown model config {name_or_config!r}; choose one of {sorted(MODEL_CONFIGS)}."
            ) from None
    config.validate()
    return config
