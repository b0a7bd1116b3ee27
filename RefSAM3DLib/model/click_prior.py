"""Clicks as local corrections: a click sets the mask at itself and at nearby look-alike voxels.

Why: a click's sparse token reaches the mask only through the mask token and the token-grid
logits (``mask_decoder.py``), whose cells are 8 voxels wide (24 mm for ``small``). Measured on
refsam3d-small-v9: a positive click at the most interior voxel of a pancreas that the text prompt
had missed left the probability AT THE CLICK at 0.00 (btcv_0005), and three corrective clicks
moved the mean Dice of the issue's structures by 0.004. A user expects the clicked voxel, and the
similar tissue around it, to change.

So each click corrects its prompt's coarse logit ``z`` by what the click says is wrong there,
spread to the voxels that resemble the clicked one (the prototype idea of few-shot segmentation,
PANet: Wang et al., ICCV 2019) and fading with distance, so that a click acts locally::

    amount = softplus(margin - z(c))     for a positive click c (how far z(c) is below +margin)
    term(x) = amount * exp(-|x - c|^2 / (2 sigma^2)) * relu((cos(f(x), f(c)) - floor) / (1 - floor))

and the mirror image for a negative click (``softplus(margin + z(c))``, subtracted). ``f`` is a
learned linear map of the shared pixel features; ``margin``, ``sigma`` (voxels, log-parametrised)
and ``floor`` are learned for each kind of click. A click where the mask is already right
changes almost nothing; one in a miss or a leak moves the logit at the click to about the margin.
A prompt without clicks gets no term, so text-only answers do not depend on this module.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .prompt_encoder import click_labels

INITIAL_MARGIN = 4.0
"""Logit a click brings its own voxel to (sign of the click), before training."""
INITIAL_SIGMA_VOX = 6.0
"""Gaussian reach of a click before training, in model voxels (18 mm for ``small``)."""
INITIAL_FLOOR = 0.5
"""Cosine similarity below which a voxel is not moved by a click, before training."""
REACH_SIGMAS = 3.0
"""A click's term is computed within this many sigmas of it, where its Gaussian has fallen to
exp(-4.5) = 1.1 % of its peak: a click costs a crop of the window, not the window (the third click
of a gesture took 0.49 s on the bundled sample CT when every click projected the whole window's
features, 0.37 s with the crop; the first run takes 4.3-4.7 s). 3, not 4 (3e-4 of the peak): the
positive clicks' sigma trained to ~12 voxels, and 4 sigmas made their crop the whole window; with 3,
text + 3 clicks on the sample CT takes 0.21-0.22 s instead of 0.25 s, and refsam3d-small-v15's
figures on the interactive protocol moved by at most 0.0002 Dice (21 of 126)."""


class ClickPrior(nn.Module):
    """Per-prompt logit corrections of positive and negative clicks.

    Args:
        pixel_dim: channels C_pix of the shared full-resolution pixel features.
    """

    def __init__(self, pixel_dim: int) -> None:
        super().__init__()
        self.projection = nn.Linear(pixel_dim, pixel_dim, bias=False)
        nn.init.eye_(self.projection.weight)
        # Index 0: negative clicks, 1: positive clicks (the point-label values).
        self.margin = nn.Parameter(torch.full((2,), INITIAL_MARGIN))
        self.log_sigma_vox = nn.Parameter(torch.full((2,), math.log(INITIAL_SIGMA_VOX)))
        self.floor = nn.Parameter(torch.full((2,), INITIAL_FLOOR))

    def forward(self, pixel_features: torch.Tensor, coarse: torch.Tensor, points_dhw: torch.Tensor,
                point_labels: torch.Tensor | None) -> torch.Tensor:
        """
        Args:
            pixel_features: (B, C_pix, D, H, W) shared pixel features of B windows.
            coarse: (B, P, D, H, W) float32 coarse logits of the P prompts.
            points_dhw: (P, N, 3) click voxel coordinates (d, h, w) in the window.
            point_labels: (P, N) 1 positive, 0 negative, -1 padding; None = all positive.

        Returns:
            (B, P, D, H, W) float32: ``coarse`` plus the clicks' terms.
        """
        with torch.autocast(pixel_features.device.type, enabled=False):
            batch, p = coarse.shape[:2]
            size = coarse.shape[2:]
            labels = click_labels(points_dhw, point_labels)
            limit = torch.tensor(size, device=points_dhw.device) - 1
            voxels = torch.minimum(points_dhw.round().long().clamp(min=0), limit)  # (P, N, 3)
            sigmas = torch.exp(self.log_sigma_vox)  # (2,) negative, positive
            reaches = [math.ceil(REACH_SIGMAS * float(sigma)) for sigma in sigmas.detach()]
            corrected = list(coarse.unbind(dim=1))
            for i in range(p):
                clicks = torch.nonzero(labels[i] >= 0)[:, 0].tolist()
                if not clicks:
                    continue
                # Every click of the prompt reads one crop's features (clicks of a gesture are
                # close: three clicks cost one crop, not three).
                crops = [self._click_crop(voxels[i, j].tolist(), reaches[int(labels[i, j])], size) for j in clicks]
                low = [min(crop[0][axis] for crop in crops) for axis in range(3)]
                high = [max(crop[1][axis] for crop in crops) for axis in range(3)]
                features = self._projected(pixel_features[(slice(None), slice(None)) + _slices(low, high)])
                inverse_length = inverse_lengths(features)  # (B, 1, d, h, w)
                term = torch.zeros((batch, *[z - a for a, z in zip(low, high)]), device=coarse.device)
                at_clicks = [(slice(None), slice(None), *[c - o for c, o in zip(voxels[i, j].tolist(), low)])
                             for j in clicks]
                units = torch.stack([features[at] * inverse_length[at] for at in at_clicks], dim=-1)  # (B, C, N)
                # Every click's dot products in one product over the contiguous crop (einsum would
                # copy a strided sub-crop of the C channels for each click); (B, N, d, h, w).
                dots = torch.einsum("bcdhw,bcn->bndhw", features, units)
                for n, (j, (click_low, click_high)) in enumerate(zip(clicks, crops)):
                    kind = int(labels[i, j])
                    centre = voxels[i, j].tolist()
                    sign = 1.0 if kind == 1 else -1.0
                    # How wrong the mask is at the click, measured, not learned through.
                    amount = F.softplus(self.margin[kind] - sign * coarse[(slice(None), i, *centre)].detach())  # (B,)
                    local = (slice(None),) + _slices([a - o for a, o in zip(click_low, low)],
                                                     [z - o for z, o in zip(click_high, low)])
                    floor = self.floor[kind].clamp(max=0.95)
                    # cos - floor, then relu; the scalars ride on the nearness (fewer passes).
                    pull = torch.addcmul(-floor, dots[:, n][local], inverse_length[:, 0][local]).relu_()
                    nearness = _nearness(click_low, click_high, points_dhw[i, j].tolist(), sigmas[kind],
                                         sign * amount / (1.0 - floor))
                    term[local].addcmul_(pull, nearness)
                # F.pad lists the last axis first: (w before, w after, h before, ..., d after).
                padding = [n for a, z, s in reversed(list(zip(low, high, size))) for n in (a, s - z)]
                corrected[i] = corrected[i] + F.pad(term, padding)
            return torch.stack(corrected, dim=1)

    @staticmethod
    def _click_crop(centre: list[int], reach: int, size) -> tuple[list[int], list[int]]:
        """First and one-past-last voxel (d, h, w) of the window within ``reach`` of ``centre``."""
        return [max(c - reach, 0) for c in centre], [min(c + reach + 1, s) for c, s in zip(centre, size)]

    def _projected(self, pixel_features: torch.Tensor) -> torch.Tensor:
        """(B, C, d, h, w) pixel features -> (B, C, d, h, w) projected, in float32.

        Channels first: on CPU, reductions over a last axis of 8 channels ran 2-5x slower (a
        click's 87^3 crop: 20 ms against 8 ms)."""
        return torch.einsum("oc,bcdhw->bodhw", self.projection.weight, pixel_features.float())


def _nearness(low, high, centre, sigma: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``scale * exp(-|x - centre|^2 / (2 sigma^2))`` on the voxels ``low`` to ``high`` (exclusive):
    (B, d, h, w) for ``scale`` (B,). The Gaussian is separable: three 1D factors, one pass."""
    gd, gh, gw = (torch.exp(-(torch.arange(a, z, dtype=torch.float32, device=scale.device) - c) ** 2
                            / (2.0 * sigma ** 2)) for a, z, c in zip(low, high, centre))
    return (scale[:, None] * gd)[:, :, None, None] * (gh[:, None] * gw[None, :])


def _slices(low, high) -> tuple[slice, slice, slice]:
    return tuple(slice(a, z) for a, z in zip(low, high))


def inverse_lengths(x: torch.Tensor) -> torch.Tensor:
    """``1 / |x|`` along the channels of ``x`` (B, C, ...), lengths at least 1e-6: (B, 1, ...).

    Callers scale the 1-channel dot products by it rather than dividing the C channels (one pass
    over the crop fewer). The length is summed by hand: on CPU (torch 2.14), ``Tensor.norm`` and
    ``torch.linalg.vector_norm`` over the 8 channels of a gesture's crop take ~45-90 ms where the
    sum of squares takes ~1.5 ms.
    """
    return (x * x).sum(dim=1, keepdim=True).sqrt().clamp(min=1e-6).reciprocal()
