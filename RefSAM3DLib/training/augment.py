"""The training augmentation pipeline (paper section 4.1.2), as one MONAI Compose.

Input: a crop of a cached case (a little larger than the window, centred by
:func:`.windows.crop_centre`) as channel-first model-space arrays: ``image`` (1, D, H, W) uint8
levels 0..``image_levels`` (the cache's quantisation; intensity = level / image_levels) and
``label`` (1, D, H, W) uint8 label indices, and optionally ``coverage`` (N, D, H, W) float32
fractions in [0, 1] (partial-volume targets). Output: one window, ``image`` (1, D, H, W)
float32 in [0, 1], ``label`` (1, D, H, W) uint8 and ``coverage`` (N, D, H, W) float32 fractions in
[0, 1] (moved by the same affine, linearly interpolated), the window centred in the crop.

The paper's list -- rotation, flipping, erasing, shearing, scaling, translation, posterisation,
contrast, brightness, sharpness -- maps onto the transforms below, with one exception: **no
flips**. Mirroring shows a liver on the left; with left/right labels swapped the kidney beside it
becomes "left", and the model loses the only cue that tells the sides apart (after training with
flips, "left kidney" and "right kidney" got identical masks). TotalSegmentator and nnU-Net's
abdominal models train without mirroring for the same reason.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from monai.transforms import (
    Compose,
    EnsureTyped,
    MapTransform,
    RandAdjustContrastd,
    RandAffined,
    RandCoarseDropoutd,
    RandGaussianSharpend,
    RandomizableTransform,
    RandScaleIntensityd,
    RandShiftIntensityd,
    ScaleIntensityRanged,
    ThresholdIntensityd,
)

from ..errors import RefSAM3DError

KEYS = ("image", "label")


class RandPosterized(RandomizableTransform, MapTransform):
    """Posterise: quantise [0, 1] intensities to 2**bits levels (bits drawn per call).

    Args:
        keys: intensity keys.
        bits: (low, high) inclusive range of bits.
        prob: probability of posterising.
    """

    def __init__(self, keys=("image",), bits: tuple[int, int] = (3, 6), prob: float = 0.1):
        MapTransform.__init__(self, keys)
        RandomizableTransform.__init__(self, prob)
        self.bits = bits
        self._bits = bits[1]

    def randomize(self, data=None) -> None:
        super().randomize(None)
        self._bits = int(self.R.randint(self.bits[0], self.bits[1] + 1))

    def __call__(self, data):
        d = dict(data)
        self.randomize()
        if not self._do_transform:
            return d
        levels = float(2 ** self._bits - 1)
        for key in self.key_iterator(d):
            d[key] = torch.round(d[key] * levels) / levels
        return d


DEFAULT_OPTIONS = {
    "affine_prob": 0.8,
    "rotate_deg": 15.0,
    "shear": 0.1,
    "scale": 0.15,
    "translate_mm": 20.0,
    "erase_prob": 0.2,
    "contrast_prob": 0.3,
    "brightness_prob": 0.3,
    "sharpen_prob": 0.1,
    "posterize_prob": 0.1,
}


def training_transforms(window_size_vox: int, spacing_mm: float, image_levels: int,
                        options: dict | None = None, coverage: bool = False) -> Compose:
    """The augmentation pipeline for one model-space training window.

    Args:
        window_size_vox: output window edge D = H = W.
        spacing_mm: model spacing, to express translations and erasing holes in mm.
        image_levels: the cached image's top level (intensity 1.0).
        options: overrides of the probabilities/ranges below (config ``augment`` section).
        coverage: carry a ``coverage`` entry along (same affine, linear interpolation).
    Returns:
        a Compose mapping a crop dict to one window dict with ``image`` (1, D, H, W) float32,
        ``label`` (1, D, H, W) uint8 and, with ``coverage``, ``coverage`` (N, D, H, W) float32.
    """
    o = {**DEFAULT_OPTIONS, **(options or {})}
    unknown = set(o) - set(DEFAULT_OPTIONS)
    if unknown:
        raise RefSAM3DError(f"unknown augment options {sorted(unknown)}; known: {sorted(DEFAULT_OPTIONS)}")
    window = (int(window_size_vox),) * 3
    hole_vox = max(2, int(round(10.0 / spacing_mm)))
    # The same draws with or without coverage: RandAffined draws one affine for all its keys.
    spatial_keys, modes = ((*KEYS, "coverage"), ("bilinear", "nearest", "bilinear")) if coverage else (
        KEYS, ("bilinear", "nearest"))
    return Compose(
        [
            ScaleIntensityRanged("image", a_min=0.0, a_max=float(image_levels), b_min=0.0, b_max=1.0, dtype=np.float32),
            RandAffined(
                spatial_keys,
                spatial_size=window,
                prob=o["affine_prob"],
                rotate_range=[math.radians(o["rotate_deg"])] * 3,
                shear_range=[o["shear"]] * 6,
                scale_range=[o["scale"]] * 3,
                translate_range=[o["translate_mm"] / spacing_mm] * 3,
                mode=modes,
                padding_mode="zeros",
            ),
            RandCoarseDropoutd(
                "image", holes=1, max_holes=4, spatial_size=(hole_vox,) * 3, max_spatial_size=(3 * hole_vox,) * 3,
                fill_value=0.0, prob=o["erase_prob"],
            ),
            RandAdjustContrastd("image", gamma=(0.7, 1.5), prob=o["contrast_prob"]),
            RandScaleIntensityd("image", factors=0.15, prob=o["brightness_prob"]),
            RandShiftIntensityd("image", offsets=0.1, prob=o["brightness_prob"]),
            RandGaussianSharpend("image", prob=o["sharpen_prob"]),
            RandPosterized("image", bits=(3, 6), prob=o["posterize_prob"]),
            # Back into the model's [0, 1] intensity range after brightness/contrast changes.
            ThresholdIntensityd("image", threshold=1.0, above=False, cval=1.0),
            ThresholdIntensityd("image", threshold=0.0, above=True, cval=0.0),
            EnsureTyped("image", data_type="tensor", dtype=torch.float32, track_meta=False),
            EnsureTyped("label", data_type="tensor", dtype=torch.uint8, track_meta=False),
            *([] if not coverage else [
                EnsureTyped("coverage", data_type="tensor", dtype=torch.float32, track_meta=False)]),
        ]
    )


def crop_around(arrays, center_dhw, window_size_vox: int) -> list[np.ndarray]:
    """The same window of several arrays of a cached volume, centred (as far as the bounds allow)
    on a voxel.

    Args:
        arrays: (..., D, H, W) arrays of one volume (the image, its label map, its coverage).
        center_dhw: the voxel to centre on.
        window_size_vox: window edge; volumes smaller than that are zero-padded.
    Returns:
        the windows, each (..., window, window, window).
    """
    w = int(window_size_vox)
    shape = arrays[0].shape[-3:]
    pad = [(0, max(0, w - s)) for s in shape]
    starts = [int(min(max(0, round(c) - w // 2), max(s, w) - w)) for c, s in zip(center_dhw, shape)]
    sl = tuple(slice(s, s + w) for s in starts)
    return [np.pad(a, [(0, 0)] * (a.ndim - 3) + pad)[(..., *sl)] for a in arrays]
