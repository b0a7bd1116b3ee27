"""Training samples: one augmented window of a cached case plus the prompts it trains.

Sample ``i`` is a pure function of ``(seed, i)``: the case, the augmentation draws, the structures
and their phrasings all come from a generator seeded with both. A resumed run therefore sees
exactly the samples the uninterrupted run would have seen, whatever the number of DataLoader
workers, and distributed ranks simply take disjoint sample ids.

Per sample, up to ``per_step`` structures present in the window are drawn (uniformly, so small
organs train as often as the liver) and, with probability ``absent_prob``, one annotated
structure that is not in the window (an empty target: the model must learn to answer "none").
One encoder pass then trains all of them.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from .augment import training_transforms, validation_window
from .cache import IMAGE_LEVELS, load_case

# The word vocabulary.training_phrasings puts in its templates for the OTHER modality: a CT window
# is never prompted "... in MRI" (structures seen in both modalities have phrasings of both).
_OTHER_MODALITY = {"CT": re.compile(r"\bMRI\b"), "MR": re.compile(r"\bCT\b")}


class CaseStore:
    """Decoded cached cases, loaded lazily and kept (each process holds its own copy).

    Args:
        cache_dir: the cache folder.
        entries: manifest entries of the cases to serve.
    """

    def __init__(self, cache_dir: Path | str, entries: list[dict]) -> None:
        self.cache_dir = Path(cache_dir)
        self.entries = entries
        self._cases: dict[int, dict] = {}

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, index: int) -> dict:
        if index not in self._cases:
            self._cases[index] = load_case(self.cache_dir / self.entries[index]["file"])
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
        per_step: structures present in the window to train per sample (at most).
        absent_prob: probability of adding one annotated structure absent from the window.
        augment: overrides for ``augment.training_transforms``.

    Items: ``image`` (1, D, H, W) float32, ``target`` (P, D, H, W) uint8, ``texts`` (P phrasings),
    ``keys`` (P structure keys), ``case_id``.
    """

    def __init__(self, store: CaseStore, phrasings: dict[str, list[str]], window_size_vox: int, spacing_mm: float,
                 seed: int, length: int, offset: int = 0, case_weights=None, per_step: int = 4,
                 absent_prob: float = 0.25, augment: dict | None = None) -> None:
        self.store = store
        self.phrasings = phrasings
        self.seed = int(seed)
        self.length = int(length)
        self.offset = int(offset)
        weights = np.ones(len(store)) if case_weights is None else np.asarray(case_weights, dtype=float)
        self.case_p = weights / weights.sum()
        self.per_step = per_step
        self.absent_prob = absent_prob
        self.transforms = training_transforms(window_size_vox, spacing_mm, IMAGE_LEVELS, augment)

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
        self.transforms.set_random_state(seed=int(rng.integers(2**31 - 1)))
        window = self.transforms({
            "image": case["image"][None], "label": case["label"][None],
            "mirror_lut": case["mirror_lut"], "annotated": case["annotated"],
        })[0]
        label = window["label"][0]
        annotated = np.asarray(window["annotated"], dtype=bool)
        # a flip can name a mirror structure that no dataset phrases (lung_left from lung_right)
        annotated[1:] &= np.array([key in self.phrasings for key in case["structures"]], dtype=bool)
        indices = choose_structures(label, annotated, rng, self.per_step, self.absent_prob)
        keys = [case["structures"][i - 1] for i in indices]
        texts = [str(rng.choice(self._phrasings(k, case["modality"]))) for k in keys]
        target = torch.stack([label == i for i in indices]).to(torch.uint8)
        return {"image": window["image"], "target": target, "texts": texts, "keys": keys,
                "case_id": case["case_id"]}


def choose_structures(label: torch.Tensor, annotated: np.ndarray, rng: np.random.Generator,
                      per_step: int, absent_prob: float) -> list[int]:
    """Label indices to train in one window: up to ``per_step`` present ones, maybe one absent.

    Only annotated indices are eligible: a structure this dataset does not label may be in the
    image, so it is never trained as empty.
    """
    present_all = set(torch.unique(label).tolist()) - {0}
    eligible = np.flatnonzero(annotated)
    present = [int(i) for i in eligible if i in present_all]
    absent = [int(i) for i in eligible if i not in present_all]
    chosen = [int(i) for i in rng.permutation(present)[:per_step]] if present else []
    if absent and (not chosen or rng.random() < absent_prob):
        chosen.append(int(rng.choice(absent)))
    return chosen


def collate(items: list[dict]) -> dict:
    """Stack images (B, 1, D, H, W); per-window prompts stay lists (their counts differ)."""
    return {
        "image": torch.stack([it["image"] for it in items]),
        "target": [it["target"] for it in items],
        "texts": [it["texts"] for it in items],
        "keys": [it["keys"] for it in items],
        "case_id": [it["case_id"] for it in items],
    }


def validation_windows(store: CaseStore, window_size_vox: int, per_case: int, seed: int = 0) -> list[dict]:
    """Fixed validation windows: per case, one centred on all its labels, then on random structures.

    Returns:
        dicts with ``image`` (1, 1, D, H, W) float32, ``target`` (1, P, D, H, W) uint8 for the
        annotated structures present in the window, ``keys`` and ``case_id``.
    """
    rng = np.random.default_rng(seed)
    windows = []
    for index in range(len(store)):
        case = store[index]
        label = case["label"]
        centres = [np.argwhere(label > 0).mean(axis=0)]
        present = [i for i in np.unique(label) if i > 0 and case["annotated"][i]]
        for i in rng.permutation(present)[: max(0, per_case - 1)]:
            centres.append(np.argwhere(label == i).mean(axis=0))
        for centre in centres:
            image, lab = validation_window(case["image"], label, centre, window_size_vox)
            inside = [int(i) for i in np.unique(lab) if i > 0 and case["annotated"][i]]
            if not inside:
                continue
            windows.append({
                "image": torch.from_numpy(image.astype(np.float32) / IMAGE_LEVELS)[None, None],
                "target": torch.from_numpy(np.stack([lab == i for i in inside]).astype(np.uint8))[None],
                "keys": [case["structures"][i - 1] for i in inside],
                "case_id": case["case_id"],
            })
    return windows
