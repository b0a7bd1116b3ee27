"""Does the first gesture grow what text already gets right, on the windows it trained on?

    python scripts/gesture_growth_on_windows.py --config configs/train_small_v16.yaml \
        --model RefSAM3DLib/models/refsam3d-small-v15 --windows 40

Windows are drawn as training draws them (the config's cache and split, crops centred on a
structure) but not augmented. For every structure of ``--structures`` lying whole inside a window,
the window is decoded from the text alone and from the text + the structure's exact bounding box +
one positive click at its most interior voxel (the interactive issue's first gesture); printed per
structure, summed over windows: predicted / true volume and Dice of both, in model space (the
3 mm voxels the loss scores). Growth seen here is the gesture training's own, not generalisation
nor the sliding-window blend; ``scripts/evaluate_interactive.py`` scores whole held-out volumes.
About 1.5 minutes for 40 windows on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from evaluate_interactive import most_interior_voxel  # noqa: E402
from RefSAM3DLib.checkpoint import load_model  # noqa: E402
from RefSAM3DLib.training.augment import DEFAULT_OPTIONS  # noqa: E402
from RefSAM3DLib.training.cache import read_manifest  # noqa: E402
from RefSAM3DLib.training.config import load_config, model_config  # noqa: E402
from RefSAM3DLib.training.gestures import jittered_box, subset  # noqa: E402
from RefSAM3DLib.training.prepare import PROMPT_TABLE  # noqa: E402
from RefSAM3DLib.training.prompts import PromptTable, TableTextEncoder  # noqa: E402
from RefSAM3DLib.training.windows import CaseStore, WindowDataset  # noqa: E402

NO_AUGMENTATION = {key: 0.0 for key in DEFAULT_OPTIONS if key.endswith("_prob")}


def whole_in_window(mask: torch.Tensor) -> bool:
    """True when a ``(D, H, W)`` bool mask touches no face of its window."""
    return not any(mask.select(axis, index).any() for axis in range(3) for index in (0, -1))


def first_gesture(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The exact box ``(1, 6)`` and the most interior voxel ``(1, 1, 3)`` of a ``(D, H, W)`` mask."""
    box = jittered_box(mask, 0.0)[None]
    click = torch.tensor(most_interior_voxel(mask.numpy()), dtype=torch.float32)[None, None]
    return box, click


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True, help="the training config (its cache and split)")
    parser.add_argument("--model", required=True, help="model folder or checkpoint")
    parser.add_argument("--windows", type=int, default=40)
    parser.add_argument("--split", choices=["train", "validation"], default="train")
    parser.add_argument("--structures", nargs="+", default=["kidney_left", "kidney_right", "spleen"])
    parser.add_argument("--seed", type=int, default=11)
    args = parser.parse_args(argv)

    cfg = load_config(args.config)
    cache = Path(cfg["cache"])
    entries = [e for e in read_manifest(cache)["cases"] if e["split"] == args.split]
    table = PromptTable(cache / PROMPT_TABLE)
    text_encoder = TableTextEncoder(table, model_config(cfg).text_context_length)
    model = load_model(args.model, device="cpu", text_encoder=text_encoder).eval()
    windows = WindowDataset(
        CaseStore(cache, entries), {k: table.phrasings(k) for k in table.structures}, model.config.window_size_vox,
        model.config.spacing_mm[0], seed=args.seed, length=args.windows, max_prompts=cfg["prompts"]["max_prompts"],
        background_prob=0.0, augment={**cfg["augment"], **NO_AUGMENTATION})
    # Per structure: predicted voxels (text, gesture), true voxels, overlaps (text, gesture), windows.
    counts = {key: np.zeros(6) for key in args.structures}
    for index in range(len(windows)):
        item = windows[index]
        image = item["image"][None]
        with torch.no_grad():
            features = model.encode_image(image)
            prompts = model.encode_prompts(item["texts"])
            text_logits = model.decode(image, features, prompts)[0]
            for p, (key, target) in enumerate(zip(item["keys"], item["target"].bool())):
                if key not in counts or not target.any() or not whole_in_window(target):
                    continue
                box, click = first_gesture(target)
                gesture_logits = model.decode(image, features, subset(prompts, [p]), points_dhw=click,
                                              point_labels=torch.ones(1, 1, dtype=torch.long), boxes_dhw=box)[0, 0]
                text, gesture = text_logits[p] > 0, gesture_logits > 0
                counts[key] += [text.sum(), gesture.sum(), target.sum(), (text & target).sum(),
                                (gesture & target).sum(), 1]
    print(f"{args.model}: {args.windows} un-augmented {args.split} windows, model space")
    print("| structure | windows | text volume | text Dice | box + click volume | box + click Dice |")
    print("|---|---|---|---|---|---|")
    for key, (text, gesture, true, text_hit, gesture_hit, n) in counts.items():
        if n:
            print(f"| {key} | {int(n)} | {text / true:.3f} | {2 * text_hit / (text + true):.3f} "
                  f"| {gesture / true:.3f} | {2 * gesture_hit / (gesture + true):.3f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
