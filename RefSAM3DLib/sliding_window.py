"""The model-space half of the engine: sliding-window probabilities and the label-map rule.

Kept apart from :mod:`RefSAM3DLib.inference` (which reads, resamples and writes with SimpleITK)
so that training validates through exactly this code on a GPU machine that has only torch, numpy
and MONAI.
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np
import torch
from monai.inferers import sliding_window_inference


def network_precision(device: torch.device) -> torch.autocast:
    """The autocast every network pass of a run uses: bfloat16 where the hardware computes it
    natively (CUDA; a CPU with AVX512-BF16 or AMX, through oneDNN), float32 elsewhere.

    On our 2-core Xeon (AMX) bfloat16 makes a window about 1.3x faster; on the held-out whole
    volumes the Dice stays the same (README, "Speed"). Training's validation and the warm worker
    use the same rule, so every path gives the same masks on the same machine.
    """
    if device.type == "cpu":
        native = [getattr(torch.cpu, name, lambda: False)() for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
        return torch.autocast("cpu", dtype=torch.bfloat16, enabled=any(native))
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")


def windows_per_batch(device: torch.device, window_size_vox: int) -> int:
    """How many windows to run at once: 1 on CPU, as many as free GPU memory allows on CUDA."""
    if device.type != "cuda":
        return 1
    free_bytes, _ = torch.cuda.mem_get_info(device)
    # ~2 KiB of activations per window voxel for the small and vit_b decoders, measured loosely;
    # keep half of the free memory as head-room for the allocator and other processes.
    per_window = window_size_vox**3 * 2048
    return int(max(1, min(8, (free_bytes // 2) // per_window)))


def model_space_probabilities(model, image_dhw: np.ndarray, prompt_embeddings, device: torch.device,
                              overlap: float = 0.25, on_window: Callable[[int], None] | None = None) -> torch.Tensor:
    """Sliding-window probabilities of every prompt over a whole model-space volume.

    Per window the image encoder runs ONCE and every prompt is decoded from its features; windows
    are blended with MONAI's Gaussian weights. Training validates through this same function.

    Args:
        model: a RefSAM3D in eval mode on ``device``.
        image_dhw: (D, H, W) model-space intensities in [0, 1].
        prompt_embeddings: ``model.encode_prompts(texts)`` for P prompts.
        device: where the windows run (the blended volume stays on the CPU).
        overlap: fraction of a window shared with its neighbours.
        on_window: called with the number of windows done so far (may raise to stop).
    Returns:
        (P, D, H, W) float32 probabilities on the CPU.
    """
    window = int(model.config.window_size_vox)
    done = [0]

    def predict(windows: torch.Tensor) -> torch.Tensor:
        """(n, 1, w, w, w) image windows -> (n, P, w, w, w) probabilities, one encoder pass."""
        with network_precision(device):
            features = model.encode_image(windows)
            logits = model.decode(windows, features, prompt_embeddings)
        done[0] += windows.shape[0]
        if on_window is not None:
            on_window(done[0])
        return torch.sigmoid(logits.float())

    inputs = torch.from_numpy(np.ascontiguousarray(image_dhw, dtype=np.float32))[None, None]
    with torch.inference_mode():  # no autograd records at all (no_grad still tracks versions)
        return blend_windows(inputs, window, predict, device, overlap, windows_per_batch(device, window))


def blend_windows(inputs: torch.Tensor, window: int, predictor, device: torch.device, overlap: float,
                  batch: int, with_coord: bool = False) -> torch.Tensor:
    """MONAI's sliding window as the engine runs it: ``window``-cubes, Gaussian blending, windows on
    ``device``, the blended ``(C, D, H, W)`` result on the CPU. ``inputs`` is ``(1, 1, D, H, W)``;
    with ``with_coord`` the predictor also receives each window's slices."""
    return sliding_window_inference(
        inputs, roi_size=(window, window, window), sw_batch_size=batch, predictor=predictor, overlap=overlap,
        mode="gaussian", sw_device=device, device=torch.device("cpu"), with_coord=with_coord,
    )[0]


class LabelMapComposer:
    """One label map from several prompts' masks: each voxel goes to the prompt with the highest
    probability among those whose mask holds it (unlabelled where no mask does).

    Built one prompt at a time so that memory does not grow with the number of prompts: it keeps
    the labels and the winning probability (quantised to uint8) only.

    Args:
        shape: the label map's shape.
        count: the number of prompts (sets the dtype: uint8 below 256 prompts, else uint16).
    """

    def __init__(self, shape: Sequence[int], count: int) -> None:
        self.labels = np.zeros(tuple(shape), dtype=np.uint8 if count < 256 else np.uint16)
        self._best = np.zeros(tuple(shape), dtype=np.uint8)

    def add(self, value: int, mask: np.ndarray, probability: np.ndarray, box: tuple[slice, ...] | None = None) -> None:
        """Offer ``mask`` (0/1) with its ``probability`` map (floats in [0, 1]) as label ``value``.

        With ``box`` (slices of the label map), ``mask`` and ``probability`` cover only that box:
        the work then scales with the structure, not with the whole grid.
        """
        box = box if box is not None else tuple(slice(None) for _ in self.labels.shape)
        labels, best = self.labels[box], self._best[box]  # views: written through
        level = np.round(np.clip(probability, 0.0, 1.0) * 255.0).astype(np.uint8)
        claim = (mask > 0) & (level > best)
        labels[claim] = value
        best[claim] = level[claim]
