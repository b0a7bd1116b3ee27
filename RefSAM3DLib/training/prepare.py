"""Everything a training machine needs, made once where the raw data and text weights are:
the preprocessed case cache and the prompt table (``<cache>/manifest.json``, ``*.npz``,
``prompts.safetensors``).

A machine without the raw data (a GPU box that got only the cache) reuses a cache whose
fingerprint matches the config; anything else is an error that says where to run ``prepare``.
"""

from __future__ import annotations

from pathlib import Path

from ..checkpoint import build_untrained
from ..datasets import load_cases, split_by_patient
from ..errors import RefSAM3DError
from ..model import build_model
from ..model.prompt_encoder import NO_TEXT_PROMPT
from ..model.text_encoder import find_clip_weights, load_clip_text_weights
from .cache import CACHE_VERSION, build_cache, model_space, read_manifest
from .config import model_config as config_model
from .prompts import PromptTable, build_prompt_table, phrasings_for

PROMPT_TABLE = "prompts.safetensors"


def prepare(config: dict, progress: bool = True) -> Path:
    """Build or reuse the cache of a loaded training config (see ``config.load_config``).

    Returns:
        the cache folder.
    """
    model_config = config_model(config)
    cache_dir = Path(config["cache"])
    manifest = read_manifest(cache_dir)
    if not Path(config["data_root"]).is_dir():
        if (manifest is None or manifest.get("version") != CACHE_VERSION or manifest.get("config_key") != config["_key"]
                or manifest.get("model_space") != model_space(model_config)):
            raise RefSAM3DError(
                f"data folder {config['data_root']} is missing and the cache {cache_dir} was not built for this "
                "config (or by an older RefSAM3D); run 'python -m RefSAM3DLib.training prepare --config FILE' where the data is"
            )
        if not (cache_dir / PROMPT_TABLE).is_file():
            raise RefSAM3DError(f"{cache_dir / PROMPT_TABLE} is missing; run 'prepare' where the data is")
        return cache_dir

    cases = [c for spec in config["datasets"] for c in load_cases(spec, config["data_root"])]
    train_cases, val_cases = split_by_patient(
        cases, config["split"].get("validation"), config["split"].get("validation_fraction", 0.0),
        config["split"].get("seed", 0),
    )
    splits = {c.case_id: "train" for c in train_cases} | {c.case_id: "validation" for c in val_cases}
    manifest = build_cache(cases, splits, model_config, cache_dir, progress=progress, config_key=config["_key"])

    modalities: dict[str, set[str]] = {}
    for entry in manifest["cases"]:
        for key in entry["structures"]:
            modalities.setdefault(key, set()).add(entry["modality"])
    absent = {k for c in cases for k in c.absent}
    wanted = phrasings_for(set(modalities) | absent, modalities, config["prompts"]["max_phrasings"])
    table_path = cache_dir / PROMPT_TABLE
    if not table_path.is_file() or not _table_holds(PromptTable(table_path), wanted):
        encoder, base_weights = frozen_text_encoder(model_config)
        build_prompt_table(encoder, wanted, table_path, base_weights=base_weights)
        if progress:
            print(f"prompt table: {sum(map(len, wanted.values()))} phrasings of {len(wanted)} structures", flush=True)
    return cache_dir


def _table_holds(table: PromptTable, wanted: dict[str, list[str]]) -> bool:
    """Whether a built table has exactly the wanted phrasings, and NO_TEXT_PROMPT (older tables lack it)."""
    return {key: table.phrasings(key) for key in table.structures} == wanted and NO_TEXT_PROMPT in table.texts


def frozen_text_encoder(model_config):
    """The config's frozen text encoder with its real weights, and the base-weight hashes to record."""
    if model_config.text_encoder == "clip":
        model = build_model(model_config)
        load_clip_text_weights(model, find_clip_weights())
    else:
        model = build_untrained(model_config)
    return model.text_encoder, {k: v for k, v in model.base_weights.items() if k.endswith("_text")}
