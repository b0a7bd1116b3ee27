"""Gestures drawn as full-resolution maps and read voxel by voxel with the pixel features.

Why: a box and the clicks reach the mask as sparse tokens (``prompt_encoder.py``), which act
through the mask token and the 8-voxel token grid, and clicks also through the click prior's
fixed-shape term (``click_prior.py``). Measured on refsam3d-small-v10: given the reference box
and a click at its most interior voxel, the btcv_0024 gallbladder (2 ml between the liver and the
portal vein) comes out as mostly portal vein, and a click at the centre of a kidney the text already
covers grows it. Interactive 3D models that fix such cases (nnInteractive, SAM-Med3D, VISTA3D) see
their gestures as dense maps at full resolution, next to the image.

So, per prompt, the gesture is drawn on the window's voxels as channels::

    box        +1 inside the box, -1 outside, 0 without a box
    near+/-    exp(-d^2 / (2 * 2^2)), d = voxel distance to the nearest positive / negative click
    far+/-     the same with sigma 6 voxels
    like+/-    cosine similarity of the pixel features to those at the nearest positive / negative click

and a pointwise MLP reads them with the shared pixel features and the prompt's current coarse
logit (squashed, ``tanh(z / LOGIT_SQUASH)``: text logits run from -70 to +10 and would swamp the
maps), adding its output, in units of ``OUTPUT_SCALE`` logits, to that logit. With ``text_biases``
the MLP also knows whether the prompt has text: a prompt with text gets its own biases in the
first and the last layer. With text a gesture corrects an answer that is mostly right; without it
the gesture must draw the whole structure; one MLP that could not tell them apart learned to push
every gestured logit up (refsam3d-small-v11: text + box + click grew the kidneys of the very
patients it trained on to 1.1-1.3x their volume). The MLP's last layer
starts at zero, so a model that gains this part answers exactly as before until it trains. A
prompt without a click in the window gets no term (text-only answers never depend on it): a box
alone acts through its sparse tokens (and the session's clipping) only. Why: every box the maps
trained on came with a click, and on the held-out patients refsam3d-small-v13's maps shrank what
text found under a box alone (BTCV text + box 0.728 against text 0.767 on the interactive issue's
structures, every one below text, volumes 0.46-0.87x; CHAOS liver 0.909 against 0.934); without
their term a box alone scores 0.771 (CHAOS: every structure at or above text), and text + box +
click is unchanged (0.793). The term is computed only on the crop of the window that the gesture
reaches (the box grown by ``BOX_REACH_VOX``, each click within 3 far sigmas): a gesture costs a
few crops, not the window.

With ``intensity`` (config ``gesture_intensity``) the MLP's first layer also reads three
intensity channels, through its own weights (zero at first)::

    image      the window's intensity (model space: the CT window or the MR percentiles in [0, 1])
    same+/-    exp(-(I(x) - I(c))^2 / (2 * 0.05^2)), I(c) the mean intensity around the nearest
               positive / negative click c (3^3 voxels)

Why: the pixel features are learned from text answers, and where text fails they blur what a
radiologist sees at once. On btcv_0024 (held out) the gallbladder's bile reads 4 HU and the tissue
that refsam3d-small-v13's box + click answer took instead 85 HU (liver, portal vein): a click
says "this intensity", which a region grower would follow and the maps alone could not.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .click_prior import inverse_lengths
from .prompt_encoder import click_labels

NEAR_SIGMA_VOX = 2.0
"""Gaussian reach of a click's near map, in model voxels (6 mm for ``small``)."""
FAR_SIGMA_VOX = 6.0
"""Gaussian reach of a click's far map (18 mm for ``small``); its term stops at 3 sigmas (1 %)."""
BOX_REACH_VOX = 4
"""How far beyond a box its term is computed (voxels): a box drawn a little tight still shapes its edge."""
OUTPUT_SCALE = 8.0
"""Logits per unit of the MLP's output. Its last layer starts at zero and Adam moves a weight by
about lr per step; unscaled, 250 steps at lr 1e-3 moved the btcv_0024 gallbladder's logits by a
fraction of one, where a corrective gesture must move them by tens."""
LOGIT_SQUASH = 4.0
"""The current logit enters the MLP as ``tanh(z / LOGIT_SQUASH)``: a clear yes or no saturates."""
MAP_CHANNELS = 7
"""box, near+, near-, far+, far-, like+, like-."""
INTENSITY_CHANNELS = 3
"""image, same+, same-."""
INTENSITY_SIGMA = 0.05
"""Width of the same+/- maps in model-space intensity units: 20 HU of the CT window's 400."""


class GestureMaps(nn.Module):
    """Per-prompt logit corrections read from dense gesture maps.

    Args:
        pixel_dim: channels C_pix of the shared full-resolution pixel features.
        hidden: width of the pointwise MLP.
        text_biases: prompts with text get their own first- and last-layer biases (added to the
            shared ones). Zero at first, so that a model gaining them (``checkpoint.upgrade``)
            answers as before until it trains.
        intensity: the first layer also reads the ``INTENSITY_CHANNELS`` (through its own
            weights, zero at first for the same reason).
    """

    def __init__(self, pixel_dim: int, hidden: int = 16, text_biases: bool = False, intensity: bool = False) -> None:
        super().__init__()
        # Pointwise layers (and ``intensity_in`` below), kept as 1x1x1 convolutions for their
        # weights' names in checkpoints; forward runs them as matrix products (``_pointwise``).
        self.head = nn.Sequential(
            nn.Conv3d(pixel_dim + MAP_CHANNELS + 1, hidden, kernel_size=1), nn.GELU(),
            nn.Conv3d(hidden, hidden, kernel_size=1), nn.GELU(),
            nn.Conv3d(hidden, 1, kernel_size=1),
        )
        nn.init.zeros_(self.head[-1].weight)
        nn.init.zeros_(self.head[-1].bias)
        self.text_first_bias = nn.Parameter(torch.zeros(hidden)) if text_biases else None
        self.text_last_bias = nn.Parameter(torch.zeros(1)) if text_biases else None
        self.intensity_in = nn.Conv3d(INTENSITY_CHANNELS, hidden, kernel_size=1, bias=False) if intensity else None
        if intensity:
            nn.init.zeros_(self.intensity_in.weight)

    def forward(self, pixel_features: torch.Tensor, coarse: torch.Tensor, points_dhw: torch.Tensor | None,
                point_labels: torch.Tensor | None, boxes_dhw: torch.Tensor | None,
                has_text: Sequence[bool] | None = None, image: torch.Tensor | None = None) -> torch.Tensor:
        """
        Args:
            pixel_features: (B, C_pix, D, H, W) shared pixel features of B windows.
            coarse: (B, P, D, H, W) float32 coarse logits of the P prompts.
            points_dhw: (P, N, 3) click voxels (d, h, w) in the window, or None.
            point_labels: (P, N) 1 positive, 0 negative, -1 padding; None = all positive.
            boxes_dhw: (P, 6) boxes (d0, h0, w0, d1, h1, w1) in window voxels, or None.
            has_text: P bools, whether each prompt has text; None = all have.
            image: (B, 1, D, H, W) the windows' intensities; needed with ``intensity``.

        Returns:
            (B, P, D, H, W) float32: ``coarse`` plus each gestured prompt's term on its crop.
        """
        if self.intensity_in is not None and image is None:
            raise ValueError("GestureMaps with intensity needs the windows' image")
        with torch.autocast(pixel_features.device.type, enabled=False):
            size = coarse.shape[2:]
            corrected = list(coarse.unbind(dim=1))
            for i in range(coarse.shape[1]):
                clicks, labels = _prompt_clicks(points_dhw, point_labels, i)
                if not len(clicks):  # no click (padding only, or a box alone): no term
                    continue
                box = None if boxes_dhw is None else boxes_dhw[i].float()
                crop = _reach(clicks, box, size)
                region = (slice(None), slice(None)) + crop
                features = pixel_features[region].float()
                crop_image = None if self.intensity_in is None else image[region].float()
                maps = draw_maps(features, clicks, labels, box, [s.start for s in crop], crop_image)
                answer = torch.tanh(corrected[i][:, None][region] / LOGIT_SQUASH)
                inputs = torch.cat([features, maps[:, :MAP_CHANNELS], answer, maps[:, MAP_CHANNELS:]], dim=1)
                bias = self.head[0].bias
                with_text = self.text_first_bias is not None and (has_text is None or bool(has_text[i]))
                if with_text:
                    bias = bias + self.text_first_bias
                hidden = F.gelu(_pointwise(inputs, self._first_weight(), bias))
                hidden = F.gelu(_pointwise(hidden, self.head[2].weight, self.head[2].bias))
                term = _pointwise(hidden, self.head[4].weight, self.head[4].bias)[:, 0]
                if with_text:
                    term = term + self.text_last_bias
                term = OUTPUT_SCALE * term
                padding = [n for s, length in reversed(list(zip(crop, size))) for n in (s.start, length - s.stop)]
                corrected[i] = corrected[i] + F.pad(term, padding)
            return torch.stack(corrected, dim=1)


    def _first_weight(self) -> torch.Tensor:
        """The first layer's weights over [features, maps, answer(, intensity channels)]: one
        convolution of the crop (a second one for the intensity channels cost ~1 ms a window)."""
        if self.intensity_in is None:
            return self.head[0].weight
        return torch.cat([self.head[0].weight, self.intensity_in.weight], dim=1)


def _pointwise(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """A 1x1x1 convolution ``weight`` (O, C, 1, 1, 1) of ``x`` (B, C, d, h, w) as one matrix
    product: ~1.6x faster than ``conv3d`` on a gesture's crop on our CPU (0.8 against 1.3 ms for
    19 -> 16 channels on 42^3 voxels), and the MLP runs on every window a gesture touches."""
    batch, channels, *shape = x.shape
    out = torch.matmul(weight.flatten(1), x.reshape(batch, channels, -1)) + bias[:, None]
    return out.view(batch, -1, *shape)


def _prompt_clicks(points_dhw, point_labels, i: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompt ``i``'s real clicks ``(N, 3)`` float and labels ``(N,)`` (padding dropped)."""
    if points_dhw is None:
        return torch.zeros(0, 3), torch.zeros(0, dtype=torch.long)
    labels = click_labels(points_dhw, point_labels)[i]
    real = labels >= 0
    return points_dhw[i][real].float(), labels[real]


def _reach(clicks: torch.Tensor, box: torch.Tensor | None, size) -> tuple[slice, slice, slice]:
    """The crop of the window that the term of a gesture with clicks ``(N >= 1, 3)`` covers."""
    reach = 3.0 * FAR_SIGMA_VOX
    lows, highs = [clicks.min(dim=0).values.cpu() - reach], [clicks.max(dim=0).values.cpu() + reach]
    if box is not None:
        lows.append(torch.minimum(box[:3], box[3:]).cpu() - BOX_REACH_VOX)
        highs.append(torch.maximum(box[:3], box[3:]).cpu() + BOX_REACH_VOX)
    low = torch.stack(lows).min(dim=0).values.floor().long().tolist()
    high = torch.stack(highs).max(dim=0).values.ceil().long().tolist()
    return tuple(slice(max(a, 0), min(b + 1, s)) for a, b, s in zip(low, high, size))


def draw_maps(features: torch.Tensor, clicks: torch.Tensor, labels: torch.Tensor, box: torch.Tensor | None,
              origin: list[int], image: torch.Tensor | None = None) -> torch.Tensor:
    """The gesture's ``MAP_CHANNELS`` maps on a crop (module doc for their meaning), and with
    ``image`` the ``INTENSITY_CHANNELS`` after them.

    Args:
        features: (B, C_pix, d, h, w) pixel features of the crop.
        clicks: (N, 3) click voxels in window coordinates; labels: (N,) 1 positive, 0 negative.
        box: (6,) box corners in window voxels, or None.
        origin: the crop's first voxel (d, h, w) in the window.
        image: (B, 1, d, h, w) float32 intensities of the crop, or None.

    Returns:
        (B, MAP_CHANNELS (+ INTENSITY_CHANNELS), d, h, w) float32.
    """
    batch, _, *shape = features.shape
    device = features.device
    axes = _crop_axes(shape, origin, device)
    maps = [torch.zeros(shape, device=device) if box is None else _box_map(axes, box.to(device))]
    inverse_length = inverse_lengths(features)  # (B, 1, d, h, w)
    near, far, like, same = [], [], [], []
    for kind in (1, 0):
        chosen = clicks[labels.to(clicks.device) == kind].to(device)
        if not len(chosen):
            near.append(torch.zeros(shape, device=device))
            far.append(torch.zeros(shape, device=device))
            like.append(torch.zeros((batch, *shape), device=device))
            same.append(torch.zeros((batch, *shape), device=device))
            continue
        nearest_squared, nearest = _nearest_click(axes, chosen)
        near.append(torch.exp(-nearest_squared / (2 * NEAR_SIGMA_VOX ** 2)))
        far.append(torch.exp(-nearest_squared / (2 * FAR_SIGMA_VOX ** 2)))
        inside = _click_voxels(chosen, origin, shape)
        at_clicks = features[:, :, inside[:, 0], inside[:, 1], inside[:, 2]]  # (B, C, N)
        at_clicks = at_clicks * inverse_length[:, :, inside[:, 0], inside[:, 1], inside[:, 2]]
        # Each voxel compared with its nearest click of this kind: cosine similarity.
        similarity = torch.einsum("bcdhw,bcn->bndhw", features, at_clicks)
        if len(chosen) > 1:
            similarity = similarity.gather(1, nearest.expand(batch, 1, *shape))
        like.append(similarity[:, 0] * inverse_length[:, 0])
        if image is not None:
            clicked_intensity = _neighbourhood_means(image[:, 0], inside)  # (B, N)
            reference = clicked_intensity[:, nearest] if len(chosen) > 1 else clicked_intensity[:, :1, None, None]
            same.append(torch.exp(-(image[:, 0] - reference) ** 2 / (2 * INTENSITY_SIGMA ** 2)))
    spatial = torch.stack(maps + near + far)[None].expand(batch, -1, -1, -1, -1)
    channels = [spatial, torch.stack(like, dim=1)]
    if image is not None:
        channels += [image, torch.stack(same, dim=1)]
    return torch.cat(channels, dim=1)


def _neighbourhood_means(image: torch.Tensor, voxels: torch.Tensor) -> torch.Tensor:
    """``(B, N)`` mean intensity of the 3^3 neighbourhood (within the crop) of each of ``voxels``
    ``(N, 3)`` of ``image`` ``(B, d, h, w)``: CT noise at one voxel is of the order of the same
    maps' width."""
    means = []
    for d, h, w in voxels.tolist():
        means.append(image[:, max(d - 1, 0):d + 2, max(h - 1, 0):h + 2, max(w - 1, 0):w + 2].mean(dim=(1, 2, 3)))
    return torch.stack(means, dim=1)


def _crop_axes(shape, origin: list[int], device) -> list[torch.Tensor]:
    """Each axis's window voxel coordinates on a crop starting at ``origin``: distances and the box
    are separable, so they are computed axis by axis and broadcast (no (d, h, w, 3) grid)."""
    return [torch.arange(n, dtype=torch.float32, device=device) + o for n, o in zip(shape, origin)]


def _nearest_click(axes: list[torch.Tensor], clicks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Squared voxel distance ``(d, h, w)`` from each voxel of the crop to its nearest click of
    ``clicks`` ``(N >= 1, 3)``, and that click's index ``(d, h, w)``."""
    d2, h2, w2 = ((axis[None] - clicks[:, k, None]) ** 2 for k, axis in enumerate(axes))  # (N, n_axis)
    squared = d2[:, :, None, None] + h2[:, None, :, None] + w2[:, None, None, :]  # (N, d, h, w)
    return squared.min(dim=0)


def _click_voxels(clicks: torch.Tensor, origin: list[int], shape) -> torch.Tensor:
    """``(N, 3)`` long: the crop voxel of each click (rounded, clamped to the crop)."""
    inside = (clicks.round().long() - torch.tensor(origin, device=clicks.device)).clamp(min=0)
    return torch.minimum(inside, torch.tensor(shape, device=clicks.device) - 1)


def _box_map(axes: list[torch.Tensor], box: torch.Tensor) -> torch.Tensor:
    """+1 on voxels inside ``box`` (d0, h0, w0, d1, h1, w1), -1 outside: (d, h, w) on the crop
    whose voxel coordinates along each axis are ``axes``."""
    low, high = torch.minimum(box[:3], box[3:]), torch.maximum(box[:3], box[3:])
    d, h, w = ((axis >= low[k]) & (axis <= high[k]) for k, axis in enumerate(axes))
    inside = d[:, None, None] & h[None, :, None] & w[None, None, :]
    return inside.float() * 2.0 - 1.0
