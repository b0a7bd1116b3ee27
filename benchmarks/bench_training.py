"""Training throughput: the window loader alone and whole training steps (a table, not a test).

    python benchmarks/bench_training.py --config configs/train_small.yaml        # after `... prepare`
    python benchmarks/bench_training.py --config configs/train_small.yaml --device cuda --batch-size 8

With the config's ``interactive`` section enabled, a second "step" row adds the simulated
gestures (:class:`~RefSAM3DLib.training.loop.GestureStep`) on the same samples.

"loader" draws samples from the training cache exactly as the loop does (class-balanced crop,
MONAI augmentation, every annotated structure) in this process; "step" is forward + per-prompt
loss + backward + AdamW on the same samples, so "step" minus "loader" is the network's share.
Reports windows per second for both, and the prompts per window.
"""

from __future__ import annotations

import argparse
import platform
import time

import torch

from RefSAM3DLib.checkpoint import build_untrained
from RefSAM3DLib.training.cache import read_manifest
from RefSAM3DLib.training.config import load_config, model_config
from RefSAM3DLib.training.loop import GestureStep, MultiPromptStep, gesture_loss
from RefSAM3DLib.training.loss import PromptLoss
from RefSAM3DLib.training.prepare import PROMPT_TABLE
from RefSAM3DLib.training.prompts import PromptTable, TableTextEncoder
from RefSAM3DLib.training.windows import CaseStore, WindowDataset, collate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/train_small.yaml")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--samples", type=int, default=12, help="windows drawn per measurement")
    args = parser.parse_args()

    cfg = load_config(args.config)
    manifest = read_manifest(cfg["cache"])
    if manifest is None:
        raise SystemExit(f"no cache at {cfg['cache']}: run `python -m RefSAM3DLib.training prepare --config {args.config}`")
    entries = [e for e in manifest["cases"] if e["split"] == "train"]
    table = PromptTable(f"{cfg['cache']}/{PROMPT_TABLE}")
    architecture = model_config(cfg)
    phrasings = {k: table.phrasings(k) for k in table.structures}
    weights = [cfg["training"]["dataset_weights"].get(e["dataset"], 1.0) for e in entries]
    dataset = WindowDataset(CaseStore(cfg["cache"], entries), phrasings, architecture.window_size_vox,
                            architecture.spacing_mm[0], seed=0, length=10**6, case_weights=weights,
                            max_prompts=cfg["prompts"]["max_prompts"], background_prob=cfg["prompts"]["background_prob"],
                            augment=cfg["augment"])
    for i in range(len(dataset.store)):  # decode the cache first: the loop does that once per run
        dataset.store[i]

    start = time.perf_counter()
    items = [dataset[i] for i in range(args.samples)]
    loader_s = (time.perf_counter() - start) / args.samples
    prompts = sum(len(it["texts"]) for it in items) / len(items)

    device = torch.device(args.device)
    model = build_untrained(architecture, text_encoder=TableTextEncoder(table, architecture.text_context_length))
    model.to(device).train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    loss_fn = PromptLoss()
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else torch.autocast("cpu", enabled=False)
    batches = [collate(items[i:i + args.batch_size]) for i in range(0, len(items), args.batch_size)]

    text_only = MultiPromptStep(model)
    gestures = GestureStep(model, cfg["interactive"])

    def text_step(batch) -> torch.Tensor:
        with autocast:
            logits = text_only(batch["image"].to(device), batch["texts"])
        return sum(loss_fn(lg.float(), tg.to(device)[None].float()) for lg, tg in zip(logits, batch["target"])) / len(logits)

    def gesture_step(batch) -> torch.Tensor:
        targets = [tg.to(device) for tg in batch["target"]]
        with autocast:
            windows = gestures(batch["image"].to(device), batch["texts"], targets)
        weight = cfg["interactive"]["weight"]
        return sum(gesture_loss(loss_fn, pairs, weight, device) for pairs in windows) / len(windows)

    def seconds_per_window(compute_loss) -> float:
        def step(batch) -> None:
            loss = compute_loss(batch)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()

        step(batches[0])  # warm-up
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        for batch in batches:
            step(batch)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return (time.perf_counter() - start) / len(items)

    rows = [("training step, text only (forward + loss + backward + AdamW)", seconds_per_window(text_step))]
    if cfg["interactive"]["enabled"]:
        rows.append((f"training step, text + {cfg['interactive']['rounds']} gesture rounds",
                     seconds_per_window(gesture_step)))

    print(f"machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, device {device}")
    print(f"config {cfg['_source']}: model {architecture.name}, window {architecture.window_size_vox}^3 at "
          f"{architecture.spacing_mm[0]} mm, batch {args.batch_size}, {prompts:.1f} prompts per window")
    print("| part | s per window | windows per s |")
    print("|---|---|---|")
    print(f"| loader (crop + MONAI augmentation, 1 process) | {loader_s:.2f} | {1 / loader_s:.2f} |")
    for what, step_s in rows:
        print(f"| {what} | {step_s:.2f} | {1 / step_s:.2f} |")


if __name__ == "__main__":
    main()
