"""The sliding-window inference engine: a Volume and text prompts in, a LabelResult out.

The 3D version of SAM's "encode once, prompt many" contract:

1. every prompt is parsed by the vocabulary and encoded once (text embeddings are cached);
2. the volume is resampled once into model space (:mod:`RefSAM3DLib.preprocess`);
3. MONAI's ``sliding_window_inference`` visits each window once; per window the image encoder
   runs ONCE and every prompt is decoded from the shared features;
4. each prompt's probability map goes back to the input grid on its own, and only inside the
   box where it can reach the threshold (:func:`preprocess.input_box`): resampling, thresholding,
   clean-up and the label map then cost the structure's size, not the whole grid's.
"""

from __future__ import annotations

import dataclasses
import math
import time
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import SimpleITK as sitk
import torch

from . import preprocess
from .checkpoint import load_model
from .errors import Cancelled, RefSAM3DError
from .result import LabelResult, Segment
from .run_options import RunOptions, check_device
from .sliding_window import LabelMapComposer, model_space_probabilities
from .vocabulary import Prompt, parse_prompts
from .volume import Volume, guess_modality
from .volume_reader import available_memory_bytes

ProgressCallback = Callable[[float, str], None]
CancelCheck = Callable[[], bool]

def resolve_device(device: str) -> torch.device:
    """``auto`` picks CUDA when present; asking for a GPU without one is an error, not a fallback.

    Apple's MPS runs only when asked for by name: no MPS run of this engine has been checked yet,
    so ``auto`` never picks it.
    """
    name = check_device(device)
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise RefSAM3DError(
            "CUDA was requested but no CUDA GPU is usable by this PyTorch build; "
            "use --device cpu (slower) or install a CUDA build of torch."
        )
    if name == "mps" and not torch.backends.mps.is_available():
        raise RefSAM3DError("MPS (Apple GPU) was requested but this PyTorch build or machine has none; use --device cpu.")
    return torch.device(name)


def expand_prompts(prompts: Sequence[str] | str) -> tuple[list[Prompt], list[str]]:
    """Split every prompt text into structures; return them and the warnings for unknown text."""
    if isinstance(prompts, str):
        prompts = [prompts]
    parsed: list[Prompt] = []
    for text in prompts:
        parsed.extend(parse_prompts(text))
    if not parsed:
        raise RefSAM3DError("No prompt given: name at least one structure, e.g. --prompt liver.")
    warnings = [
        f"'{p.text}' is outside the trained vocabulary: the model is asked anyway, "
        "but the result is likely to be poor."
        for p in parsed
        if p.structure is None
    ]
    return parsed, warnings


def untrained_structure_warnings(model, parsed: Sequence[Prompt]) -> list[str]:
    """A warning per vocabulary structure the model's training never showed it (when the model
    records what it was trained on, as every checkpoint written by ``refsam3d train`` does)."""
    trained = model.metadata.get("structures")
    if not trained:
        return []
    return [
        f"'{p.text}' ({p.structure.name}) is not among the structures this model was trained on; "
        "the model is asked anyway, but the result is likely to be poor."
        for p in parsed
        if p.structure is not None and p.structure.key not in set(trained)
    ]


def count_windows(shape_dhw: Sequence[int], window_size_vox: int, overlap: float) -> int:
    """The number of windows MONAI's sliding window visits (same stride rule as MONAI)."""
    stride = max(int(window_size_vox * (1.0 - overlap)), 1)
    total = 1
    for size in shape_dhw:
        total *= 1 if size <= window_size_vox else math.ceil((size - window_size_vox) / stride) + 1
    return total


def check_memory(volume: Volume, model_shape_dhw: Sequence[int], n_prompts: int) -> None:
    """Refuse up front, before the resampling allocates, a run whose arrays cannot fit.

    ``model_shape_dhw`` comes from ``preprocess.model_grid`` (no allocation): a volume with huge
    voxels is small on disk and huge in model space.
    """
    model_voxels = int(np.prod(model_shape_dhw, dtype=object))
    input_voxels = int(np.prod(volume.shape_kji, dtype=object))
    # Model space, float32: the resampled image and its copies on the way to a tensor (measured
    # peak ~17 B/voxel), blended probabilities and weights per prompt (~7.5 B/voxel); then one
    # full-resolution float32 map at a time plus the uint8 masks of all prompts.
    estimate = model_voxels * 4 * (5 + 2 * n_prompts) + input_voxels * (8 + n_prompts)
    available = available_memory_bytes()
    if available is not None and estimate > available:
        raise RefSAM3DError(
            f"Not enough memory: this volume with {n_prompts} prompts needs about "
            f"{estimate / 2**30:.1f} GiB and {available / 2**30:.1f} GiB is free; "
            "use fewer prompts per run or crop the volume."
        )


def decide_modality(volume: Volume) -> tuple[Volume, list[str]]:
    """The volume as a run treats it: with its stated modality (``--modality``, the DICOM tag,
    Slicer's DICOM record), else CT when its values look like Hounsfield units, else MR with a
    warning; the one decision, so the result's ``reference.modality`` says what was used.

    MR is the default because its intensity scaling (percentiles) fits any value range, while the
    CT window would clip values that are not Hounsfield units to nothing. Only the default warns:
    Hounsfield values are strong evidence (an MR almost never has them), their absence is none.
    """
    if volume.modality is not None:
        return volume, []
    modality = guess_modality(volume.array) or "MR"
    warnings = [] if modality == "CT" else [
        "Modality not given; treated as MR from its intensities (pass --modality to choose)."]
    return dataclasses.replace(volume, modality=modality), warnings


def postprocess_mask(mask: np.ndarray, largest_component: bool, fill_holes: bool, keep_kji=()) -> np.ndarray:
    """Optional clean-up of one binary uint8 mask ``(K, J, I)`` with SimpleITK (face connectivity).

    ``keep_kji``: voxels ``(N, 3)`` of the mask's array whose components stay besides the largest
    one: a user's positive clicks. A click says "this is the structure", so the clean-up must not
    take back what it added (on btcv_0005 the pancreas a box and click found in two pieces lost the
    clicked one, and three corrective clicks then changed nothing).

    SimpleITK is loaded for reading and resampling anyway; SciPy's ndimage gives the same masks but
    costs a quarter of a second to import. (MONAI's KeepLargestConnectedComponent would need
    scikit-image or cuCIM besides.) Of equal-sized largest components, the first in voxel order stays.
    """
    if not (largest_component or fill_holes) or not mask.any():
        return mask
    image = sitk.GetImageFromArray(mask)
    if largest_component:
        components = sitk.RelabelComponent(sitk.ConnectedComponent(image), sortByObjectSize=True)
        clicked = {int(components.GetPixel(int(i), int(j), int(k))) for k, j, i in np.asarray(keep_kji).reshape(-1, 3)}
        image = components == 1
        for label in clicked - {0, 1}:
            image = image | (components == label)
    if fill_holes:
        image = sitk.BinaryFillhole(image)
    return sitk.GetArrayFromImage(image).astype(np.uint8)


def mask_on_input(channel_dhw: np.ndarray, grid: preprocess.ModelGrid, options: RunOptions, one_piece: bool = False,
                  keep_kji=()):
    """One prompt's model-space probabilities -> its binary mask on the input grid.

    Resampled, thresholded and cleaned only inside the box where the probabilities can reach the
    threshold (:func:`preprocess.input_box`); the mask is the same as from the whole grid.

    Args:
        channel_dhw: (D, H, W) float32 probabilities on ``grid.model``.
        grid: the ModelGrid of the run.
        options: the run's threshold and clean-up.
        one_piece: the structure is one piece (``Structure.one_piece``): only then does
            ``options.largest_component`` apply.
        keep_kji: input-grid voxels ``(N, 3)`` of positive clicks, whose components the
            clean-up keeps (:func:`postprocess_mask`).

    Returns:
        ``(mask, box, probabilities)``: uint8 (K, J, I) mask on the whole input grid; the box
        (``(k, j, i)`` slices, None when nothing reaches the threshold) and the float32
        probabilities inside it (None without a box).
    """
    mask = np.zeros(grid.input.shape_kji, dtype=np.uint8)
    box = preprocess.input_box(channel_dhw >= options.threshold, grid)
    if box is None:
        return mask, None, None
    on_input = preprocess.from_model_space(channel_dhw, grid, interpolation="linear", box=box)
    low = np.array([s.start for s in box])
    high = np.array([s.stop for s in box])
    keep = np.asarray(keep_kji, dtype=np.int64).reshape(-1, 3)
    keep = keep[np.all((keep >= low) & (keep < high), axis=1)] - low
    mask[box] = postprocess_mask((on_input >= options.threshold).astype(np.uint8),
                                 options.largest_component and one_piece, options.fill_holes, keep)
    return mask, box, on_input


def segment(
    volume: Volume,
    prompts: Sequence[str] | str,
    model=None,
    options: RunOptions = RunOptions(),
    progress: ProgressCallback | None = None,
    cancel: CancelCheck | None = None,
) -> LabelResult:
    """Segment every structure named in ``prompts`` in ``volume``.

    Args:
        volume: the input image (any orientation and spacing).
        prompts: free text; each string may name several structures ("liver, spleen").
        model: a loaded ``RefSAM3D`` model (a batch loads it once), or ``None`` for ``options.model``.
        options: device, overlap, threshold and clean-up of the run (:class:`RunOptions`).
        progress: called with (fraction in [0, 1], message).
        cancel: polled once per window; when it returns True the run stops with ``Cancelled``.

    Returns:
        a LabelResult with one uint8 mask ``(K, J, I)`` per structure, on ``volume``'s own grid.
    """
    started = time.perf_counter()
    report = progress or (lambda fraction, message: None)
    parsed, warnings = expand_prompts(prompts)
    torch_device = resolve_device(options.device)
    model = run_model(options, model)
    config = model.config
    warnings.extend(untrained_structure_warnings(model, parsed))

    volume, modality_warnings = decide_modality(volume)
    warnings.extend(modality_warnings)

    report(0.0, "Preparing the volume")
    intensity = preprocess.IntensitySettings.from_config(config, volume.modality)
    check_memory(volume, preprocess.model_grid(volume, config.spacing_mm).shape_dhw, len(parsed))
    image_dhw, grid = preprocess.to_model_space(volume, config.spacing_mm, intensity)

    texts = [p.text for p in parsed]
    # no_grad, not inference_mode: the text encoder caches these tensors, and a cached inference
    # tensor would break a later training step that projects the same text.
    with torch.no_grad():
        prompt_embeddings = model.encode_prompts(texts)

    total_windows = count_windows(image_dhw.shape, config.window_size_vox, options.overlap)

    def on_window(done: int) -> None:
        if cancel is not None and cancel():
            raise Cancelled("Segmentation cancelled; nothing was written.")
        report(0.05 + 0.85 * done / total_windows, f"Window {done}/{total_windows}")

    probabilities = model_space_probabilities(model, image_dhw, prompt_embeddings, torch_device, options.overlap,
                                              on_window)

    def on_prompt(index: int, text: str) -> None:
        if cancel is not None and cancel():
            raise Cancelled("Segmentation cancelled; nothing was written.")
        report(0.9 + 0.1 * index / len(parsed), f"Resampling '{text}' to the input grid")

    segments, label_map = segments_on_input(probabilities, parsed, grid, options, on_prompt)
    report(1.0, "Done")
    return LabelResult(
        reference=volume,
        segments=segments,
        model_name=model_name(model),
        model_version=model_version(model),
        elapsed_s=time.perf_counter() - started,
        warnings=warnings,
        label_map=label_map,
    )


def segments_on_input(probabilities, parsed: Sequence[Prompt], grid: preprocess.ModelGrid, options: RunOptions,
                      on_prompt: Callable[[int, str], None] | None = None, keep_kji=()
                      ) -> tuple[list[Segment], np.ndarray]:
    """Every prompt's mask on the input grid, and the label map that gives each voxel to the most
    probable prompt whose mask holds it.

    Args:
        probabilities: (P, D, H, W) model-space probabilities, one channel per prompt of ``parsed``.
        parsed: the P prompts.
        grid: the run's ModelGrid.
        options: threshold and clean-up.
        on_prompt: called with ``(index, text)`` before each prompt (may raise to stop).
        keep_kji: input-grid voxels ``(N, 3)`` of positive clicks (spatial prompts refine one
            prompt), whose components the clean-up keeps.
    Returns:
        ``(segments, label_map)``: one Segment per prompt and the (K, J, I) label map (value
        ``index + 1``).
    """
    segments = []
    label_map = LabelMapComposer(grid.input.shape_kji, len(parsed))
    for index, prompt in enumerate(parsed):
        if on_prompt is not None:
            on_prompt(index, prompt.text)
        one_piece = prompt.structure is not None and prompt.structure.one_piece
        mask, box, on_input = mask_on_input(np.asarray(probabilities[index]), grid, options, one_piece, keep_kji)
        if box is not None:
            label_map.add(index + 1, mask[box], on_input, box)
        del on_input
        segments.append(Segment(prompt.text, prompt.structure, mask))
    return segments, label_map.labels


def model_name(model) -> str:
    """What every output names as its maker: the bundled name, a training run, or untrained."""
    metadata = model.metadata
    if metadata.get("name"):
        return metadata["name"]
    if "step" in metadata:  # a checkpoint written by `refsam3d train`, not yet bundled
        return f"refsam3d-{model.config.name}-run-{getattr(model, 'checkpoint_dir', Path('?')).parent.name}"
    return f"refsam3d-{model.config.name}-untrained"


def model_version(model) -> str:
    metadata = model.metadata
    if metadata.get("version"):
        return str(metadata["version"])
    return f"step {metadata['step']}" if "step" in metadata else "untrained"


def run_model(options: RunOptions, model=None):
    """The model of a run, on its device, in eval mode: ``model`` when the caller has one loaded,
    else ``options.model`` loaded (``None``: the bundled default; a name or folder as
    ``model_info.model_folder`` reads it). Every entry point gets its model here."""
    device = resolve_device(options.device)
    if model is None:
        model = load_model(options.model, device=device)
    return model.to(device).eval()
