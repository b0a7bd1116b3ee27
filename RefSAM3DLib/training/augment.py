"""The training augmentation pipeline (paper section 4.1.2), as one MONAI Compose.

Input: a cached case as channel-first model-space arrays: ``image`` (1, D, H, W) uint8 levels
0..``image_levels`` (the cache's quantisation; intensity = level / image_levels), ``label``
(1, D, H, W) uint8 label indices, ``mirror_lut`` (256,) the label index of each index's
left/right mirror, and ``annotated`` (N + 1,) bool flags. Output: one window, ``image``
(1, D, H, W) float32 in [0, 1] and ``label`` (1, D, H, W) uint8 (plus the flags, flipped along).
The array axes are (D, H, W) = (k, j, i) of the LPS model grid, so W runs to the patient's left.

The paper's list -- rotation, flipping, erasing, shearing, scaling, translation, posterisation,
contrast, brightness, sharpness -- maps onto the transforms below; foreground and background
windows are sampled 1:1. Flipping is only ever left/right and swaps left/right labels with it, so
"left kidney" stays the kidney on the patient's left: laterality is never learned wrong.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from monai.transforms import (
    Compose,
    EnsureTyped,
    Flip,
    MapTransform,
    RandAdjustContrastd,
    RandAffined,
    RandCoarseDropoutd,
    RandCropByPosNegLabeld,
    RandGaussianSharpend,
    RandomizableTransform,
    RandScaleIntensityd,
    RandShiftIntensityd,
    ScaleIntensityRanged,
    SpatialPadd,
    ThresholdIntensityd,
)

KEYS = ("image", "label")


class RandLateralFlipd(RandomizableTransform, MapTransform):
    """Mirror the window along the patient's left-right axis and swap left/right labels.

    Args:
        keys: image-like keys to flip (channel-first, W = left-right last axis).
        label_key: the label key, flipped and then remapped through ``data[lut_key]``.
        lut_key: key of the (256,) mirror table of label indices.
        annotated_key: key of the (N + 1,) bool flags of annotated indices, remapped alike
            (a structure without a mirror loses its annotation).
        prob: probability of flipping.
    """

    def __init__(self, keys=("image",), label_key: str = "label", lut_key: str = "mirror_lut",
                 annotated_key: str = "annotated", prob: float = 0.5):
        MapTransform.__init__(self, keys)
        RandomizableTransform.__init__(self, prob)
        self.label_key = label_key
        self.lut_key = lut_key
        self.annotated_key = annotated_key
        self.flip = Flip(spatial_axis=2)

    def __call__(self, data):
        d = dict(data)
        self.randomize(None)
        if not self._do_transform:
            return d
        for key in self.key_iterator(d):
            d[key] = self.flip(d[key])
        lut = np.asarray(d[self.lut_key])
        flipped = torch.as_tensor(self.flip(d[self.label_key]))
        d[self.label_key] = torch.as_tensor(lut, dtype=torch.long)[flipped.long()].to(flipped.dtype)
        if self.annotated_key in d:
            annotated = np.asarray(d[self.annotated_key], dtype=bool)
            moved = lut[np.flatnonzero(annotated)]
            d[self.annotated_key] = np.zeros_like(annotated)
            d[self.annotated_key][moved[moved > 0]] = True
        return d


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


def training_transforms(window_size_vox: int, spacing_mm: float, image_levels: int,
                        options: dict | None = None) -> Compose:
    """The augmentation pipeline for one model-space training window.

    Args:
        window_size_vox: output window edge D = H = W.
        spacing_mm: model spacing, to express translations and erasing holes in mm.
        image_levels: the cached image's top level (intensity 1.0).
        options: overrides of the probabilities/ranges below (config ``augment`` section).
    Returns:
        a Compose mapping a case dict (whole cached volume) to a list of one window dict with
        ``image`` (1, D, H, W) float32 and ``label`` (1, D, H, W) uint8.
    """
    o = {
        "flip_lr_prob": 0.5,
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
        **(options or {}),
    }
    window = (int(window_size_vox),) * 3
    # Crop a margin larger than the window so rotations and shifts do not pull in padding corners.
    crop = (int(math.ceil(window_size_vox * 1.25)),) * 3
    hole_vox = max(2, int(round(10.0 / spacing_mm)))
    return Compose(
        [
            SpatialPadd(KEYS, spatial_size=crop, mode="constant"),
            RandCropByPosNegLabeld(KEYS, label_key="label", spatial_size=crop, pos=1, neg=1, num_samples=1),
            ScaleIntensityRanged("image", a_min=0.0, a_max=float(image_levels), b_min=0.0, b_max=1.0, dtype=np.float32),
            RandAffined(
                KEYS,
                spatial_size=window,
                prob=o["affine_prob"],
                rotate_range=[math.radians(o["rotate_deg"])] * 3,
                shear_range=[o["shear"]] * 6,
                scale_range=[o["scale"]] * 3,
                translate_range=[o["translate_mm"] / spacing_mm] * 3,
                mode=("bilinear", "nearest"),
                padding_mode="zeros",
            ),
            RandLateralFlipd(("image",), label_key="label", prob=o["flip_lr_prob"]),
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
        ]
    )


def validation_window(image: np.ndarray, label: np.ndarray, center_dhw, window_size_vox: int):
    """A fixed window of a cached volume centred (as far as the bounds allow) on a voxel.

    Args:
        image: (D, H, W) array.
        label: (D, H, W) array.
        center_dhw: the voxel to centre on.
        window_size_vox: window edge; volumes smaller than that are zero-padded.
    Returns:
        (image, label) windows, each (window, window, window).
    """
    w = int(window_size_vox)
    pad = [(0, max(0, w - s)) for s in image.shape]
    image, label = np.pad(image, pad), np.pad(label, pad)
    starts = [int(min(max(0, round(c) - w // 2), s - w)) for c, s in zip(center_dhw, image.shape)]
    sl = tuple(slice(s, s + w) for s in starts)
    return image[sl], label[sl]
