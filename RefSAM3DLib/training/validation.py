"""Validation as a user meets the model: whole volumes, all their structures in one run.

Windows centred on the labels flatter a model (a right kidney scored 0.54 there and 0.09 on whole
volumes), so each validation case is segmented whole by the inference engine's own sliding window
(:func:`RefSAM3DLib.sliding_window.model_space_probabilities`), every annotated structure of the case
prompted at once by its name, the prompts composed into ONE label map as ``refsam3d segment``
composes them (:class:`RefSAM3DLib.sliding_window.LabelMapComposer`), and that label map scored.
It runs in model space on the cached volumes, which skips only the resampling back to the
input grid.
"""

from __future__ import annotations

import numpy as np
import torch
from monai.metrics import compute_dice

from ..sliding_window import LabelMapComposer, model_space_probabilities
from .cache import IMAGE_LEVELS
from .windows import CaseStore


def dice(prediction: np.ndarray, reference: np.ndarray) -> float:
    """MONAI's Dice of two boolean masks (the metric ``refsam3d evaluate`` reports)."""
    return float(compute_dice(torch.from_numpy(prediction)[None, None], torch.from_numpy(reference)[None, None],
                              include_background=True, ignore_empty=False)[0, 0])


@torch.no_grad()
def validate_whole_volumes(model, store: CaseStore, phrasings: dict[str, list[str]], device: torch.device,
                           threshold: float = 0.5, overlap: float = 0.25) -> dict:
    """Whole-volume Dice of every annotated structure of every case in ``store``.

    Args:
        model: the RefSAM3D being trained (put in eval mode here, then back in train mode).
        store: the validation cases (cached, model space).
        phrasings: ``{structure key: [phrasings]}``; each structure is prompted by its first.
        device: where the windows run.
        threshold: probability threshold of a mask.
        overlap: sliding-window overlap.
    Returns:
        ``{"mean_dice": mean over (case, structure) pairs present in the reference,
        "per_structure": {key: mean}, "per_case": {case_id: {key: dice}}}``.
    """
    was_training = model.training
    model.eval()
    per_case: dict[str, dict[str, float]] = {}
    try:
        for index in range(len(store)):
            case = store[index]
            keys = [k for i, k in enumerate(case["structures"], start=1)
                    if case["annotated"][i] and k in phrasings]
            if not keys:
                continue
            values = [case["structures"].index(k) + 1 for k in keys]
            prompts = model.encode_prompts([phrasings[k][0] for k in keys])
            image = case["image"].astype(np.float32) / IMAGE_LEVELS
            probabilities = model_space_probabilities(model, image, prompts, device, overlap)
            composer = LabelMapComposer(image.shape, len(keys))
            for number, probability in enumerate(probabilities.numpy(), start=1):
                composer.add(number, probability >= threshold, probability)
            per_case[case["case_id"]] = {
                key: dice(composer.labels == number, case["label"] == value)
                for number, (key, value) in enumerate(zip(keys, values), start=1)
                if np.any(case["label"] == value)
            }
    finally:
        model.train(was_training)
    scores: dict[str, list[float]] = {}
    for case_scores in per_case.values():
        for key, value in case_scores.items():
            scores.setdefault(key, []).append(value)
    all_scores = [v for values in scores.values() for v in values]
    return {
        "mean_dice": float(np.mean(all_scores)) if all_scores else 0.0,
        "per_structure": {k: float(np.mean(v)) for k, v in sorted(scores.items())},
        "per_case": per_case,
    }
