"""Training samples: one augmented window of a cached case plus the prompts it trains.

Sample ``i`` is a pure function of ``(seed, i)``: the case, the augmentation draws, the structures
and their phrasings all come from a generator seeded with both. A resumed run therefore sees
exactly the samples the uninterrupted run would have seen, whatever the number of DataLoader
workers, and distributed ranks simply take disjoint sample ids.

Crop centres are class-balanced: a structure of the case is drawn uniformly (so the adrenal
glands are visited as often as the liver), then a voxel of it; with probability
``background_prob`` any voxel of the volume. Every annotated structure of the case is then
trained in that window, present or absent (an empty target: the model must learn to answer
"none"), because one encoder pass costs as much as ~100 prompt decodings and a left/right pair
must meet in one step to learn its sides. ``max_prompts`` caps the count for richly labelled
cases (a random subset, present structures first).
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from .augment import crop_around, training_transforms
from .cache import IMAGE_LEVELS, load_case

# The word vocabulary.training_phrasings puts in its templates for the OTHER modality: a CT window
# is never prompted "... in MRI" (structures seen in both modalities have phrasings of both).
_OTHER_MODALITY = {"CT": re.compile(r"\bMRI\b"), "MR": re.compile(r"\bCT\b")}


class CaseStore:
    """Decoded cached cases, loaded lazily and kept (each process holds its own copy).

    Args:
        cache_dir: the cache folder.
        entries: manifest entries of the cases to serve.
        with_coverage: also decode each case's coverage (partial-volume targets).
    """

    def __init__(self, cache_dir: Path | str, entries: list[dict], with_coverage: bool = False) -> None:
        self.cache_dir = Path(cache_dir)
        self.entries = entries
        self.with_coverage = with_coverage
        self._cases: dict[int, dict] = {}

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, index: int) -> dict:
        if index not in self._cases:
            self._cases[index] = load_case(self.cache_dir / self.entries[index]["file"], self.with_coverage)
        return self._cases[index]


class WindowDataset(Dataset):
    """Map-style dataset over global sample ids (``offset + index``).

    Args:
        store: the training cases.
        phrasings: ``{structure key: [phrasings]}`` from the prompt table.
        window_size_vox: model window edge.
        spacing_mm: model spacing (mm).
        seed: run seed.
        length: number of sample ids served.
        offset: first sample id (a resumed run starts past the samples already trained on).
        case_weights: relative probability of drawing each case (default uniform).
        max_prompts: structures trained per sample (at most).
        background_prob: probability of a crop centred anywhere rather than on a structure.
        augment: overrides for ``augment.training_transforms``.
        partial_volume: also serve each prompt's partial-volume target (the fraction of each voxel
            inside the structure, from the cache's coverage).

    Items: ``image`` (1, D, H, W) float32, ``target`` (P, D, H, W) uint8, ``texts`` (P phrasings),
    ``keys`` (P structure keys), ``case_id``; with ``partial_volume`` also ``fraction`` (P, D, H, W)
    float32 in [0, 1].
    """

    def __init__(self, store: CaseStore, phrasings: dict[str, list[str]], window_size_vox: int, spacing_mm: float,
                 seed: int, length: int, offset: int = 0, case_weights=None, max_prompts: int = 16,
                 background_prob: float = 0.1, augment: dict | None = None, partial_volume: bool = False) -> None:
        self.store = store
        self.phrasings = phrasings
        self.seed = int(seed)
        self.length = int(length)
        self.offset = int(offset)
        weights = np.ones(len(store)) if case_weights is None else np.asarray(case_weights, dtype=float)
        self.case_p = weights / weights.sum()
        self.max_prompts = max_prompts
        self.background_prob = background_prob
        # Crop a margin larger than the window so rotations and shifts do not pull in padding.
        self.crop_vox = int(np.ceil(window_size_vox * 1.25))
        self.partial_volume = partial_volume
        self.transforms = training_transforms(window_size_vox, spacing_mm, IMAGE_LEVELS, augment, partial_volume)

    def __len__(self) -> int:
        return self.length

    def _phrasings(self, key: str, modality: str) -> list[str]:
        other = _OTHER_MODALITY[modality]
        return [p for p in self.phrasings[key] if not other.search(p)] or self.phrasings[key]

    def __getitem__(self, index: int) -> dict:
        sample_id = self.offset + int(index)
        rng = np.random.default_rng([self.seed, sample_id])
        case_index = int(rng.choice(len(self.store), p=self.case_p))
        case = self.store[case_index]
        centre = crop_centre(case, rng, self.background_prob)
        arrays = [case["image"][None], case["label"][None]] + ([case["coverage"]] if self.partial_volume else [])
        crops = dict(zip(("image", "label", "coverage"), crop_around(arrays, centre, self.crop_vox)))
        if self.partial_volume:
            crops["coverage"] = crops["coverage"].astype(np.float32) / case["coverage_levels"]
        self.transforms.set_random_state(seed=int(rng.integers(2**31 - 1)))
        window = self.transforms(crops)
        label = window["label"][0]
        annotated = case["annotated"].copy()
        annotated[1:] &= np.array([key in self.phrasings for key in case["structures"]], dtype=bool)
        indices = choose_structures(label, annotated, rng, self.max_prompts)
        keys = [case["structures"][i - 1] for i in indices]
        texts = [str(rng.choice(self._phrasings(k, case["modality"]))) for k in keys]
        target = torch.stack([label == i for i in indices]).to(torch.uint8)
        item = {"image": window["image"], "target": target, "texts": texts, "keys": keys, "case_id": case["case_id"]}
        if self.partial_volume:
            # The cache holds coverage for the present structures only (the first ones); absent: 0.
            coverage, empty = window["coverage"], torch.zeros_like(window["image"][0])
            item["fraction"] = torch.stack([coverage[i - 1] if i <= len(coverage) else empty for i in indices])
        return item


def crop_centre(case: dict, rng: np.random.Generator, background_prob: float) -> np.ndarray:
    """A class-balanced crop centre (D, H, W): a voxel of a uniformly drawn labelled structure,
    or with probability ``background_prob`` (or when nothing is labelled) any voxel."""
    if "voxels" not in case:  # flat indices per label value, computed once per case
        flat = case["label"].ravel()
        order = np.argsort(flat, kind="stable")
        bounds = np.searchsorted(flat[order], np.arange(flat.max() + 2))
        case["voxels"] = {int(v): order[bounds[v]:bounds[v + 1]] for v in range(1, flat.max() + 1)
                          if bounds[v + 1] > bounds[v]}
    shape = case["label"].shape
    if not case["voxels"] or rng.random() < background_prob:
        return np.array([rng.integers(s) for s in shape])
    voxels = case["voxels"][int(rng.choice(sorted(case["voxels"])))]
    return np.array(np.unravel_index(int(voxels[rng.integers(len(voxels))]), shape))


def choose_structures(label: torch.Tensor, annotated: np.ndarray, rng: np.random.Generator,
                      max_prompts: int) -> list[int]:
    """Label indices to train in one window: every annotated one, present or absent, at most
    ``max_prompts`` (then a random subset, present ones first).

    Only annotated indices are eligible: a structure this dataset does not label may be in the
    image, so it is never trained as empty.
    """
    present_all = set(torch.unique(label).tolist()) - {0}
    eligible = np.flatnonzero(annotated)
    present = [int(i) for i in rng.permutation([i for i in eligible if i in present_all])]
    absent = [int(i) for i in rng.permutation([i for i in eligible if i not in present_all])]
    return sorted((present + absent)[:max_prompts])


def collate(items: list[dict]) -> dict:
    """Stack images (B, 1, D, H, W); per-window prompts stay lists (their counts differ)."""
    return {
        "image": torch.stack([it["image"] for it in items]),
        "target": [it["target"] for it in items],
        "texts": [it["texts"] for it in items],
        "keys": [it["keys"] for it in items],
        "case_id": [it["case_id"] for it in items],
        **({"fraction": [it["fraction"] for it in items]} if "fraction" in items[0] else {}),
    }
