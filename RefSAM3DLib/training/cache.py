"""Preprocess every training case ONCE into model space and keep it as a compact ``.npz``.

The cache is what a training machine receives: it needs numpy and torch only (no SimpleITK, no
raw data). Each case goes through the same :func:`preprocess.to_model_space` /
:func:`preprocess.labels_to_model_space` as inference (so it arrives cropped to its body's
bounding box, as every run's volume is) and is stored as

* ``image``: the [0, 1] model intensities quantised to ``IMAGE_LEVELS`` + 1 levels (CT: 6.3 HU
  steps of the 400 HU window, below CT noise; MR: 1/63 of the percentile range), differenced
  along D (the slice axis, where resampling from thick slices makes neighbours predictable) and
  xz-compressed: 2-3x smaller than 8-bit deflate, which is what keeps the whole cache near 40 MB;
* ``label`` uint8 (D, H, W): index i >= 1 is ``structures[i - 1]``;
* ``coverage`` uint8 (N, D, H, W), N the annotated structures present: how many of a voxel's
  ``coverage_levels`` sub-voxels lie inside ``structures[n]`` (partial-volume targets,
  :func:`preprocess.label_coverage_in_model_space`);
* ``structures``: vocabulary keys, the case's annotated structures, then the dataset's
  certainly-absent structures (no voxels: trained as empty targets);
* ``annotated`` bool (N + 1,): which indices are known to be labelled or absent in this image;
* ``case_id``, ``patient_id``, ``dataset``, ``modality``, ``spacing_mm``.

``manifest.json`` lists the cases with their split; a case is rebuilt only when its source or the
model space changes.
"""

from __future__ import annotations

import hashlib
import json
import lzma
from dataclasses import asdict
from pathlib import Path

import numpy as np

from ..errors import RefSAM3DError
from ..datasets import Case

MANIFEST = "manifest.json"
CACHE_VERSION = 3
IMAGE_LEVELS = 63


def model_space(model_config) -> dict:
    """The preprocessing parameters a cache depends on."""
    return {
        "spacing_mm": [float(v) for v in model_config.spacing_mm],
        "ct_window_hu": [float(v) for v in model_config.ct_window_hu],
        "mr_percentiles": [float(v) for v in model_config.mr_percentiles],
    }


def _case_key(case: Case, space: dict) -> str:
    source = {k: str(v) for k, v in asdict(case).items() if k not in ("patient_id", "fixed_split")}
    for path in (case.image_path, case.label_path):
        stat = Path(path).stat()
        source[str(path)] = f"{stat.st_size}:{int(stat.st_mtime)}"
    text = json.dumps({"v": CACHE_VERSION, "case": source, "space": space}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def read_manifest(cache_dir: Path | str) -> dict | None:
    path = Path(cache_dir) / MANIFEST
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def build_cache(cases: list[Case], splits: dict[str, str], model_config, cache_dir: Path | str,
                progress: bool = True, config_key: str = "") -> dict:
    """Preprocess the cases that are missing or stale and write the manifest.

    Args:
        cases: all cases of the config.
        splits: ``{case_id: "train" | "validation"}``.
        model_config: the ModelConfig whose model space (spacing, intensity) to use.
        cache_dir: the cache folder (created).
        progress: print one line per preprocessed case.
        config_key: fingerprint of the training config, checked where the raw data is absent.
    Returns:
        the manifest.
    """
    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    space = model_space(model_config)
    old = {c["case_id"]: c for c in (read_manifest(cache_dir) or {}).get("cases", [])}
    entries = []
    for case in cases:
        key = _case_key(case, space)
        file = f"{case.case_id}.npz"
        if old.get(case.case_id, {}).get("key") != key or not (cache_dir / file).is_file():
            structures = preprocess_case(case, model_config, cache_dir / file)
            if progress:
                print(f"cached {case.case_id}: {(cache_dir / file).stat().st_size / 1e6:.2f} MB", flush=True)
        else:
            structures = old[case.case_id]["structures"]
        entries.append({
            "case_id": case.case_id, "patient_id": case.patient_id, "dataset": case.dataset,
            "modality": case.modality, "split": splits[case.case_id], "file": file, "key": key,
            "structures": structures,
        })
    manifest = {"version": CACHE_VERSION, "config_key": config_key, "model_space": space, "cases": entries}
    tmp = cache_dir / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=1))
    tmp.replace(cache_dir / MANIFEST)
    return manifest


def preprocess_case(case: Case, model_config, path: Path) -> list[str]:
    """Read, resample, normalise, crop and save one case; returns its annotated structure keys."""
    # Only building the cache reads volumes: SimpleITK (volume_reader, preprocess) is not needed,
    # nor installed, where training runs from the cache alone (scripts/gpu_train.sh).
    from ..volume_reader import read_volume
    from ..preprocess import (COVERAGE_LEVELS, IntensitySettings, label_coverage_in_model_space,
                              labels_to_model_space, to_model_space)

    volume = read_volume(case.image_path, modality=case.modality, frame=case.frame)
    labels = read_volume(case.label_path)
    image, grid = to_model_space(volume, model_config.spacing_mm, IntensitySettings.from_config(model_config, case.modality))
    label = labels_to_model_space(labels, grid)

    present = sorted(v for v in case.structures if np.any(label == v))
    keys = [case.structures[v] for v in present]
    structures = keys + [k for k in dict.fromkeys(case.absent) if k not in keys]
    annotated = np.ones(len(structures) + 1, dtype=bool)
    annotated[0] = False  # background
    if len(structures) > 255:
        raise RefSAM3DError(f"{case.case_id}: more than 255 structures; train on fewer with 'structures'")
    lut = np.zeros(256, dtype=np.uint8)
    lut[present] = np.arange(1, len(present) + 1)
    label = lut[label]
    coverage = label_coverage_in_model_space(labels, grid, present)

    np.savez(
        _tmp(path),
        image=_pack(np.round(image * IMAGE_LEVELS).astype(np.uint8)),
        label=_pack(label),
        coverage=_pack(coverage.reshape(-1, *label.shape[1:])),
        coverage_levels=COVERAGE_LEVELS,
        shape=np.asarray(label.shape),
        structures=np.array(structures),
        annotated=annotated,
        case_id=case.case_id, patient_id=case.patient_id, dataset=case.dataset, modality=case.modality,
        spacing_mm=np.asarray(model_config.spacing_mm, dtype=np.float32),
    )
    _tmp(path).replace(path)
    return keys


def _pack(levels_dhw: np.ndarray) -> np.ndarray:
    delta = np.diff(levels_dhw.astype(np.int16), axis=0, prepend=0).astype(np.int8)
    return np.frombuffer(lzma.compress(delta.tobytes(), preset=6), dtype=np.uint8)


def _unpack(packed: np.ndarray, shape) -> np.ndarray:
    delta = np.frombuffer(lzma.decompress(packed.tobytes()), dtype=np.int8).reshape(shape)
    return np.cumsum(delta, axis=0, dtype=np.int16).astype(np.uint8)


def _tmp(path: Path) -> Path:
    # np.savez appends ".npz" to names without it; keep the suffix last.
    return path.with_name(path.stem + ".tmp.npz")


def load_case(path: Path | str, with_coverage: bool = False) -> dict:
    """One cached case: ``image`` uint8 (D, H, W) levels 0..``IMAGE_LEVELS`` (intensity = level /
    IMAGE_LEVELS), ``label`` uint8 (D, H, W), ``structures`` list of keys, ``annotated`` bool (N + 1,)
    and the identity fields; ``with_coverage`` also ``coverage`` uint8 (N, D, H, W)
    0..``coverage_levels`` (int), decoded only then (it is N times the label's size)."""
    with np.load(path, allow_pickle=False) as data:
        case = {k: data[k] for k in data.files}
    shape = tuple(int(n) for n in case["shape"])
    coverage = {}
    if with_coverage:
        coverage = {"coverage": _unpack(case["coverage"], (-1, *shape[1:])).reshape(-1, *shape),
                    "coverage_levels": int(case["coverage_levels"])}
    return {
        "image": _unpack(case["image"], shape),
        "label": _unpack(case["label"], shape),
        **coverage,
        "structures": [str(s) for s in case["structures"]],
        "annotated": case["annotated"].astype(bool),
        **{k: str(case[k]) for k in ("case_id", "patient_id", "dataset", "modality")},
    }
