"""The training config: one YAML/JSON file that describes a whole run (data, model, optimiser,
schedule, output), in the spirit of MONAI bundles.

Relative paths: ``output``, ``cache`` and ``data_root`` are relative to the config file's folder;
each dataset's ``root``, ``labelmap`` and ``json`` are relative to ``data_root``.
A config may name another as its ``base`` and override parts of it (``configs/train_vit_b.yaml``
on ``train_small.yaml``). See ``configs/train_small.yaml`` for a commented example.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
from pathlib import Path

from ..errors import RefSAM3DError
from ..model import get_config

TRAINING_DEFAULTS = {
    "model": "small",  # a registered config name, or {"base": name, <ModelConfig field>: value, ...}
    "output": "runs/train",
    "cache": None,  # default: <output>/cache
    "data_root": ".",
    "datasets": [],
    "split": {"validation": [], "validation_fraction": 0.0, "seed": 0},
    "prompts": {"max_prompts": 16, "background_prob": 0.1, "max_phrasings": 16},
    "training": {
        "steps": 1000,  # an int, or "auto" (needs max_minutes: the horizon is set from measured speed)
        "batch_size": 1,
        "lr": 1.0e-4,
        "weight_decay": 1.0e-5,
        "betas": [0.9, 0.999],
        "warmup_steps": 50,
        "checkpoint_every": 250,
        "validate_every": 250,
        "max_minutes": None,
        "seed": 0,
        "num_workers": 0,
        "grad_clip": 1.0,
        "exclusive_weight": 0.0,  # the label map's cross-prompt cross-entropy (training/loss.py)
        # Train against the fraction of each model voxel inside the structure (the cache's
        # coverage) instead of its nearest-neighbour label, so that the loss sees the edge move by
        # less than a model voxel (training/loss.py). Gestures are still placed on the labels.
        "partial_volume_targets": False,
        "dataset_weights": {},
        # The click prior's learning rate as a multiple of lr (model/click_prior.py): its few
        # numbers are margins in logits and log-sigmas, which Adam moves by about lr per step, so
        # at lr 3e-4 a 700-step run barely moves them (refsam3d-small-v10: margin 4.0 -> 4.1).
        "click_prior_lr_scale": 1.0,
        # Parameter-name prefixes that this run trains; the rest stay as --init gave them. Empty:
        # all. ["spatial_prompts", "mask_decoder.click_prior"] trains the gestures' own
        # parameters only, so that text alone answers exactly as before (and steps are faster:
        # no gradient flows through the image encoder).
        "trainable": [],
    },
    "augment": {},
    # Simulated gestures (training/gestures.py), trained with text on the same encoder pass.
    "interactive": {
        "enabled": False,
        "rounds": 3,          # gesture rounds per window after the text-only round
        "box_prob": 0.5,      # probability that the first round carries a jittered box
        "box_jitter": 0.1,    # box faces move by up to this fraction of the box's extent
        "max_structures": 4,  # present structures refined per window (bounds the decoding cost)
        "weight": 1.0,        # weight of the mean gesture loss against the text-only loss
        # Fraction of windows whose gesture rounds get no text (NO_TEXT_PROMPT) and start from an
        # empty mask, so that points and boxes must carry the structure alone.
        "no_text_prob": 0.0,
        # Fraction of windows whose first click is a positive click anywhere inside the structure
        # (a user's first click) instead of on the text answer's error.
        "inside_click_prob": 0.0,
        # Fraction of the first rounds with a box that carry no click: a box drawn alone.
        "box_alone_prob": 0.0,
        # Fraction of windows whose clicks land at the most interior voxels of their region (the
        # structure, or the error) instead of uniformly in it: where a careful user clicks.
        "interior_click_prob": 0.0,
    },
}

_INTERACTIVE_RANGES = {"rounds": (1, 20), "box_prob": (0.0, 1.0), "box_jitter": (0.0, 1.0),
                       "max_structures": (1, 64), "weight": (0.0, 100.0), "no_text_prob": (0.0, 1.0),
                       "inside_click_prob": (0.0, 1.0), "box_alone_prob": (0.0, 1.0),
                       "interior_click_prob": (0.0, 1.0)}


def load_config(source: dict | str | Path) -> dict:
    """A training config with defaults filled in and paths made absolute.

    Args:
        source: a dict (paths relative to the current folder) or a ``.yaml``/``.yml``/``.json`` file.
    Returns:
        the config dict; ``config["_key"]`` fingerprints what the data cache depends on and
        ``config["_source"]`` is the file's name.
    """
    if isinstance(source, dict):
        raw, base, name = copy.deepcopy(source), Path.cwd(), ""
    else:
        path = Path(source)
        raw, base, name = _read_with_base(path, ()), path.resolve().parent, path.name
    if not isinstance(raw, dict):
        raise RefSAM3DError("a training config must be a mapping of sections (model, datasets, training, ...)")
    raw = {k: v for k, v in raw.items() if not str(k).startswith("_")}  # a loaded config's own fields
    unknown = set(raw) - set(TRAINING_DEFAULTS)
    if unknown:
        raise RefSAM3DError(f"unknown config sections {sorted(unknown)}; known: {sorted(TRAINING_DEFAULTS)}")

    config = copy.deepcopy(TRAINING_DEFAULTS)
    for key, value in raw.items():
        if isinstance(config.get(key), dict) and isinstance(value, dict):
            unknown = set(value) - set(config[key]) if key in ("training", "prompts", "split", "interactive") else set()
            if unknown:
                raise RefSAM3DError(f"unknown keys {sorted(unknown)} in section '{key}'; known: {sorted(config[key])}")
            config[key].update(value)
        else:
            config[key] = value
    if not config["datasets"]:
        raise RefSAM3DError("the config lists no datasets; add a 'datasets' section")
    _check_interactive(config["interactive"])
    weight = config["training"]["exclusive_weight"]
    if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not 0 <= weight <= 100:
        raise RefSAM3DError(f"training.exclusive_weight must be a number in 0..100, not {weight!r}; fix the config")
    scale = config["training"]["click_prior_lr_scale"]
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not 0 < scale <= 1000:
        raise RefSAM3DError(f"training.click_prior_lr_scale must be a number in (0, 1000], not {scale!r}; fix the config")
    if not isinstance(config["training"]["partial_volume_targets"], bool):
        raise RefSAM3DError("training.partial_volume_targets must be true or false; fix the config")
    trainable = config["training"]["trainable"]
    if not isinstance(trainable, list) or not all(isinstance(p, str) and p for p in trainable):
        raise RefSAM3DError(f"training.trainable must be a list of parameter-name prefixes, not {trainable!r}; fix the config")

    config["output"] = str((base / config["output"]).resolve())
    config["cache"] = str((base / config["cache"]).resolve()) if config["cache"] else str(Path(config["output"]) / "cache")
    config["data_root"] = str((base / config["data_root"]).resolve())
    config["_source"] = name
    config["_key"] = hashlib.sha256(
        json.dumps([config["model"], config["datasets"], config["split"]], sort_keys=True).encode()
    ).hexdigest()[:16]
    return config


def _check_interactive(section: dict) -> None:
    """The ``interactive`` section's values: a boolean switch and numbers in their ranges."""
    if not isinstance(section.get("enabled"), bool):
        raise RefSAM3DError(f"interactive.enabled must be true or false, not {section.get('enabled')!r}")
    for key, (low, high) in _INTERACTIVE_RANGES.items():
        value = section[key]
        integer = key in ("rounds", "max_structures")
        if isinstance(value, bool) or not isinstance(value, int if integer else (int, float)) or not low <= value <= high:
            kind = "an integer" if integer else "a number"
            raise RefSAM3DError(f"interactive.{key} must be {kind} in {low}..{high}, not {value!r}; fix the config")


def _read_file(path: Path) -> dict:
    if not path.is_file():
        raise RefSAM3DError(f"training config {path} not found; give a YAML or JSON file (see configs/)")
    text = path.read_text(encoding="utf-8")
    try:
        if path.suffix.lower() in (".yaml", ".yml"):
            try:
                import yaml
            except ImportError:
                raise RefSAM3DError("YAML training configs need PyYAML: pip install 'refsam3d[train]' (or use JSON).") from None
            raw = yaml.safe_load(text)
        else:
            raw = json.loads(text)
    except RefSAM3DError:
        raise
    except Exception as error:  # noqa: BLE001 -- any parser error is the user's file
        raise RefSAM3DError(f"{path} is not valid YAML/JSON ({str(error).splitlines()[0]}); fix the file") from None
    if not isinstance(raw, dict):
        raise RefSAM3DError(f"{path}: a training config must be a mapping of sections (model, datasets, training, ...)")
    return raw


def _read_with_base(path: Path, chain: tuple[Path, ...]) -> dict:
    """A config file merged onto the file its ``base`` names (as MONAI bundle configs merge files):
    sections that are mappings merge key by key, anything else (a list, a value) replaces the
    base's. Relative paths, inherited ones too, are read against the folder of the file given to
    :func:`load_config`, so a base lives beside the configs that name it."""
    raw = _read_file(path)
    if "base" not in raw:
        return raw
    base_path = (path.resolve().parent / str(raw.pop("base"))).resolve()
    if base_path in chain + (path.resolve(),):
        raise RefSAM3DError(f"{path}: its 'base' chain comes back to {base_path.name}; remove the loop")
    merged = _read_with_base(base_path, chain + (path.resolve(),))
    for key, value in raw.items():
        if isinstance(merged.get(key), dict) and isinstance(value, dict):
            merged[key] = {**merged[key], **value}
        else:
            merged[key] = value
    return merged


def model_config(config: dict):
    """The ModelConfig a training config names (a MODEL_CONFIGS name, or a base name with overrides)."""
    spec = config["model"]
    if isinstance(spec, dict):
        overrides = {k: v for k, v in spec.items() if k != "base"}
        base = get_config(spec.get("base", "small"))
        try:
            spec = dataclasses.replace(base, **{k: tuple(v) if isinstance(v, list) else v for k, v in overrides.items()})
        except TypeError as error:
            raise RefSAM3DError(f"model overrides {sorted(overrides)} do not fit ModelConfig ({error})") from None
    return get_config(spec)
