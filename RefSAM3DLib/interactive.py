"""Interactive refinement: encode a volume once, then answer text and spatial prompts from the cache.

The 3D version of SAM's ``SamPredictor`` (``set_image`` once, ``predict`` many times)::

    session = InteractiveSession(volume)                     # every window encoded once
    first = session.segment("spleen")                       # text alone
    fixed = session.segment("spleen", points_ras=[(r, a, s)], point_labels=[0])   # "not here"
    boxed = session.segment(None, box_ras=(r1, a1, s1, r2, a2, s2))   # "the structure in this box"

Spatial prompts are RAS millimetres (Slicer's world space); :mod:`RefSAM3DLib.geometry` takes
them to model-space voxels. Windows are those of the engine (MONAI's sliding window with Gaussian
blending), so a text-only answer equals :func:`RefSAM3DLib.inference.segment`'s.

A gesture with a box is answered by the windows that hold the whole of it (the box and every
click), blended with the same Gaussian weights: only they see it as training showed it (every
gestured training window held its structure's whole box and click; a window holding part of the
box reads the clipped box's edge as the structure's). On the interactive protocol this raised
text + box + click from 0.798 to 0.801 (pancreas and stomach, which span windows), README. Where
no window holds the gesture (a box larger than a window), each window is decoded with the points
that fall inside it and the box clipped to it; a window the gesture does not touch answers from
the text alone (kept from the prompt's first answer), or, with no text or beyond a box's reach,
contributes nothing.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import torch
from monai.data.utils import compute_importance_map

from . import geometry, preprocess
from .errors import RefSAM3DError
from .inference import (check_memory, count_windows, decide_modality, expand_prompts, model_name, model_version,
                        resolve_device, run_model, segments_on_input, untrained_structure_warnings)
from .model.prompt_encoder import NO_TEXT_PROMPT
from .result import LabelResult
from .run_options import RunOptions
from .sliding_window import blend_windows, network_precision, windows_per_batch
from .vocabulary import Prompt
from .volume import Volume
from .volume_reader import available_memory_bytes


BOX_MARGIN = 0.1
"""How far beyond a box (a fraction of its extent per side) a structure may still reach."""


def pad_to_window(image_dhw: np.ndarray, window_size_vox: int) -> tuple[np.ndarray, np.ndarray]:
    """Pad each axis shorter than a window up to it, as MONAI's sliding window would (zeros, the
    shortfall split ``half`` before and the rest after), so that window slices need no shift.

    Returns:
        the padded ``(D', H', W')`` array and the padding before each axis ``(3,)``.
    """
    shortfall = np.maximum(window_size_vox - np.asarray(image_dhw.shape), 0)
    before = shortfall // 2
    padded = np.pad(image_dhw, [(b, s - b) for b, s in zip(before, shortfall)])
    return padded, before


def spatial_prompts_on_grid(volume: Volume, grid, points_ras, box_ras) -> tuple[np.ndarray, np.ndarray | None]:
    """Points ``(N, 3)`` and box ``(6,)`` (or None) from RAS mm to voxels of the model-space
    ``grid`` (a ``geometry.Grid``); RefSAM3DError for one outside ``volume``. Cheap: callers check
    a gesture with it before the volume is encoded."""
    points_dhw = geometry.ras_points_to_dhw(np.asarray(points_ras, dtype=np.float64).reshape(-1, 3), volume, grid)
    box_dhw = None if box_ras is None else geometry.box_ras_to_dhw(box_ras, volume, grid)
    return points_dhw, box_dhw


def box_reach(box_dhw: np.ndarray, shape_dhw, margin: float = BOX_MARGIN) -> tuple[slice, slice, slice]:
    """The voxels of a ``shape_dhw`` grid that a box ``(d0, h0, w0, d1, h1, w1)`` (voxels) keeps:
    the box grown by ``margin`` of its extent on each side (at least 2 voxels).

    A box says where the structure is, as SAM's box prompt does: windows the box misses would
    otherwise answer from the text alone and keep whatever the text found far away. The margin
    forgives a box drawn a little tight."""
    low, high = np.asarray(box_dhw[:3], dtype=np.float64), np.asarray(box_dhw[3:], dtype=np.float64)
    grow = np.maximum(margin * (high - low + 1.0), 2.0)
    start = np.maximum(np.floor(low - grow), 0).astype(int)
    stop = np.minimum(np.ceil(high + grow) + 1, shape_dhw).astype(int)
    return tuple(slice(int(a), int(b)) for a, b in zip(start, stop))


def inside_box(probabilities_dhw: torch.Tensor, box_dhw: np.ndarray, margin: float = BOX_MARGIN) -> torch.Tensor:
    """``probabilities_dhw`` (D, H, W) with everything outside ``box_reach`` of the box set to 0."""
    kept = torch.zeros_like(probabilities_dhw)
    region = box_reach(box_dhw, probabilities_dhw.shape, margin)
    kept[region] = probabilities_dhw[region]
    return kept


def check_cache_memory(shape_dhw, config, overlap: float, device: torch.device) -> None:
    """Refuse, before encoding, a feature cache that cannot fit where it is kept (``device``).

    Per window: the full-resolution pixel features and image fusion term (float32) dominate, with
    one prompt's text-only answer (``InteractiveSession._PromptCache``).
    """
    window = config.window_size_vox
    per_window = 4 * window**3 * (config.upsample_channels[-1] + config.fusion_channels + 1)
    needed = count_windows([max(s, window) for s in shape_dhw], window, overlap) * per_window
    free = torch.cuda.mem_get_info(device)[0] if device.type == "cuda" else available_memory_bytes()
    if free is not None and needed > free:
        raise RefSAM3DError(
            f"The interactive cache of this volume needs about {needed / 2**30:.1f} GiB and "
            f"{free / 2**30:.1f} GiB is free on {device}; crop the volume, lower the overlap, or use "
            "segment() (it keeps no cache).")


class InteractiveSession:
    """One volume, encoded once; text and spatial prompts answered from the cached features.

    Args:
        volume: the input image (any orientation and spacing).
        model: a loaded RefSAM3D, or None for ``options.model``.
        options: the run's options, as in ``inference.segment``; every answer uses its threshold
            and clean-up.
        progress: called with ``(fraction, message)`` as windows are encoded.

    Memory: the cache holds each window's ImageFeatures on ``device`` and, for the prompt being
    refined, its text-only answer (small config: ~34 MB per 96^3 window with bfloat16 features;
    vit_b: ~170 MB per 128^3 window), checked against the free memory before encoding.

    Speed: a gesture decodes only the windows it needs (those holding a box gesture whole; else a
    click's windows, a box's windows with those within its reach); the others give the prompt's
    text-only answer, kept from its first answer, and text embeddings are kept per window too.
    Every answer equals one computed afresh.
    """

    def __init__(self, volume: Volume, model=None, options: RunOptions = RunOptions(), progress=None) -> None:
        started = time.perf_counter()
        self.device = resolve_device(options.device)
        self.model = run_model(options, model)
        self.volume, self.warnings = decide_modality(volume)
        self.options = options
        config = self.model.config
        self.window = int(config.window_size_vox)
        model_shape = preprocess.model_grid(volume, config.spacing_mm).shape_dhw
        check_memory(volume, model_shape, 1)
        check_cache_memory(model_shape, config, options.overlap, self.device)
        image_dhw, self.grid = preprocess.to_model_space(
            self.volume, config.spacing_mm, preprocess.IntensitySettings.from_config(config, self.volume.modality))
        padded, self.pad_before = pad_to_window(image_dhw, self.window)
        self.model_shape_dhw = image_dhw.shape
        self._image = torch.from_numpy(np.ascontiguousarray(padded, dtype=np.float32))[None, None]
        self._features: dict[tuple[int, int, int], object] = {}
        self._cache: _PromptCache | None = None
        self._encode_all_windows(progress)
        self.encode_s = time.perf_counter() - started

    def _sliding(self, predictor, batch: int) -> torch.Tensor:
        """MONAI's sliding window over the padded model-space image, with the engine's blending."""
        with torch.no_grad():
            return blend_windows(self._image, self.window, predictor, self.device, self.options.overlap, batch,
                                 with_coord=True)

    def _encode_all_windows(self, progress) -> None:
        total = count_windows(self._image.shape[2:], self.window, self.options.overlap)

        def encode(windows: torch.Tensor, slices) -> torch.Tensor:
            with network_precision(self.device):
                features = self.model.encode_image(windows)
            # The fusion reads the image term in float32 at every answer: convert it once here.
            features.image_term = features.image_term.float()
            for b, window_slices in enumerate(slices):
                self._features[_window_start(window_slices)] = features.select(b)
            if progress is not None:
                progress(len(self._features) / total, f"Encoding window {len(self._features)}/{total}")
            return torch.zeros((windows.shape[0], 1) + windows.shape[2:], device=windows.device)

        self._sliding(encode, windows_per_batch(self.device, self.window))

    @property
    def window_count(self) -> int:
        return len(self._features)

    def segment(
        self,
        prompt: str | Sequence[str] | None,
        points_ras: Sequence[Sequence[float]] = (),
        point_labels: Sequence[int] | None = None,
        box_ras: Sequence[float] | None = None,
    ) -> LabelResult:
        """Structures from a text prompt, spatial prompts, or both, without re-encoding.

        Args:
            prompt: text naming the structures (several only without spatial prompts, as
                ``inference.segment`` reads them), or None for "the structure at these points /
                in this box" (then a spatial prompt is required).
            points_ras: clicks ``(N, 3)`` in RAS mm.
            point_labels: ``(N,)`` 1 = inside the structure, 0 = not part of it; default all 1.
            box_ras: ``(R1, A1, S1, R2, A2, S2)``, two opposite corners in any order.

        Returns:
            a LabelResult with one segment per structure on the input volume's grid, and the label
            map that gives each voxel to the most probable one (the engine's, voxel for voxel).
        """
        started = time.perf_counter()
        points_ras = np.asarray(points_ras, dtype=np.float64).reshape(-1, 3)
        labels = np.ones(len(points_ras), dtype=np.int64) if point_labels is None else np.asarray(point_labels)
        if labels.shape != (len(points_ras),) or not np.isin(labels, (0, 1)).all():
            raise RefSAM3DError(
                f"point_labels needs one 0 (negative) or 1 (positive) per point: {len(points_ras)} points, "
                f"labels {labels.tolist()}.")
        spatial = len(points_ras) > 0 or box_ras is not None
        warnings = list(self.warnings)
        texts = [prompt] if isinstance(prompt, str) else list(prompt or [])
        if not any(text.strip() for text in texts):
            if not spatial:
                raise RefSAM3DError("Nothing to segment: give a text prompt, points or a box.")
            parsed, has_text = [Prompt(NO_TEXT_PROMPT, None)], False
        else:
            prompts, prompt_warnings = expand_prompts(texts)
            if len(prompts) > 1 and spatial:
                raise RefSAM3DError(
                    f"Points and boxes refine ONE structure, but '{'; '.join(texts)}' names {len(prompts)}; "
                    "give one structure per refinement.")
            parsed, has_text = prompts, True
            warnings += prompt_warnings + untrained_structure_warnings(self.model, prompts)
        if spatial and not self.model.metadata.get("spatial_prompts"):
            warnings.append("This model was not trained with points or boxes: they are passed to it, "
                            "but its answer to them is unreliable.")
        # RAS -> model-space voxels -> the padded array the windows are cut from.
        points_dhw, box_model_dhw = spatial_prompts_on_grid(self.volume, self.grid.model, points_ras, box_ras)
        points_dhw = points_dhw + self.pad_before
        box_dhw = None if box_model_dhw is None else box_model_dhw + np.tile(self.pad_before, 2)
        cache = self._prompt_cache(tuple(p.text for p in parsed))
        reach = None if box_dhw is None else box_reach(box_dhw, self._image.shape[2:])

        def decode(windows: torch.Tensor, slices) -> torch.Tensor:
            start = _window_start(slices[0])
            spatial_args = self._window_prompts(start, points_dhw, labels, box_dhw)
            if (not has_text and not spatial_args) or not _meets(start, self.window, reach):
                # No text and nothing here: not the structure. Beyond the box's reach: cleared anyway.
                return torch.zeros((1, 1) + windows.shape[2:], device=windows.device)
            if spatial_args or start not in cache.answers:
                if start not in cache.dense:
                    cache.dense[start] = self.model.text_dense(self._features[start], cache.embeddings)
                logits = self.model.decode(windows, self._features[start], cache.embeddings,
                                           dense=cache.dense[start], **spatial_args)
                probabilities = torch.sigmoid(logits.float())
                if spatial_args:
                    return probabilities
                cache.answers[start] = probabilities
            return cache.answers[start].clone()  # MONAI weights what it is given in place

        holding = [] if box_dhw is None else self._windows_holding(points_dhw, box_dhw)
        # One autocast for every window: its cache of the weights' bfloat16 copies lives as long as
        # the context (one per window cast them again: ~3000 copies, 30 ms of a 0.25 s gesture).
        with network_precision(self.device):
            # (P, D, H, W), padded
            probabilities = self._blend_windows(decode, holding) if holding else self._sliding(decode, 1)
        d, h, w = self.pad_before
        probabilities = probabilities[:, d:d + self.model_shape_dhw[0], h:h + self.model_shape_dhw[1],
                                      w:w + self.model_shape_dhw[2]]
        if box_model_dhw is not None:  # one structure
            probabilities = inside_box(probabilities[0], box_model_dhw)[None]
        positive_kji = [geometry.nearest_voxel_kji(point, self.volume) for point in points_ras[labels == 1]]
        segments, label_map = segments_on_input(probabilities.numpy(), parsed, self.grid, self.options,
                                                keep_kji=positive_kji)
        return LabelResult(
            reference=self.volume, segments=segments,
            model_name=model_name(self.model), model_version=model_version(self.model),
            elapsed_s=time.perf_counter() - started, warnings=warnings, label_map=label_map,
        )

    def _prompt_cache(self, texts: tuple[str, ...]) -> "_PromptCache":
        """What the prompt ``texts`` costs once per window, kept while it is refined: a gesture
        recomputes only the windows it touches. One prompt is kept (the next replaces it); several
        structures at once cannot be refined, so theirs is not kept (nor does it replace it), and
        the cache stays at one channel per window whatever is asked."""
        if self._cache is None or self._cache.texts != texts:
            with torch.no_grad():
                cache = _PromptCache(texts, self.model.encode_prompts(list(texts)))
            if len(texts) > 1:
                return cache
            self._cache = cache
        return self._cache

    def _windows_holding(self, points_dhw: np.ndarray, box_dhw: np.ndarray) -> list[tuple[int, int, int]]:
        """Starts of the windows that hold the whole box and every point (padded voxels)."""
        return [start for start in self._features
                if geometry.window_holds_box(box_dhw, start, self.window)
                and geometry.points_in_window(points_dhw, start, self.window).all()]

    def _blend_windows(self, decode, starts) -> torch.Tensor:
        """``decode``'s answers for the windows at ``starts``, blended with the Gaussian weights the
        engine's sliding window gives a window (MONAI's, sigma 1/8 of the window): ``(P, D, H, W)``
        over the padded image, 0 where none of them reaches."""
        weight = compute_importance_map((self.window,) * 3, mode="gaussian", sigma_scale=0.125).float()
        total = weights = None
        for start in starts:
            region = (slice(None), slice(None)) + tuple(slice(s, s + self.window) for s in start)
            with torch.no_grad():
                answer = decode(self._image[region].to(self.device), [region])[0].float().cpu()  # (P, w, w, w)
            if total is None:
                total = torch.zeros((answer.shape[0],) + tuple(self._image.shape[2:]))
                weights = torch.zeros((1,) + tuple(self._image.shape[2:]))
            total[region[1:]] += answer * weight
            weights[region[1:]] += weight
        return total / weights.clamp_min(torch.finfo(torch.float32).tiny)

    def _window_prompts(self, start, points_dhw: np.ndarray, labels: np.ndarray, box_dhw) -> dict:
        """The decoder's spatial arguments for the window at ``start``: its points and its part of
        the box, in window voxels (batch of one prompt); empty when the gesture misses it."""
        args = {}
        inside = geometry.points_in_window(points_dhw, start, self.window)
        if inside.any():
            local = points_dhw[inside] - np.asarray(start)
            args["points_dhw"] = torch.as_tensor(local, dtype=torch.float32, device=self.device)[None]
            args["point_labels"] = torch.as_tensor(labels[inside], device=self.device)[None]
        local_box = None if box_dhw is None else geometry.box_in_window(box_dhw, start, self.window)
        if local_box is not None:
            args["boxes_dhw"] = torch.as_tensor(local_box, dtype=torch.float32, device=self.device)[None]
        return args


@dataclass
class _PromptCache:
    """One set of prompts' embeddings, per-window text dense embeddings ``(1, P, N, C)`` and
    text-only answers ``(1, P, D, H, W)``, keyed by window start."""

    texts: tuple[str, ...]
    embeddings: object
    dense: dict = field(default_factory=dict)
    answers: dict = field(default_factory=dict)


def _meets(start, window_size_vox: int, region) -> bool:
    """Whether the window at ``start`` meets ``region`` (slices; None = everywhere)."""
    return region is None or all(s < r.stop and s + window_size_vox > r.start for s, r in zip(start, region))


def _window_start(window_slices) -> tuple[int, int, int]:
    """(d, h, w) start of one window from MONAI's slices ``[batch, channel, d, h, w]``."""
    return tuple(int(s.start) for s in window_slices[2:])

