"""Parameters, FLOPs and CPU time per model window for each RefSAM3D config (a table, not a test).

    python benchmarks/bench_model.py                     # small and vit_b, 1 thread (package installed,
                                                         # or PYTHONPATH=. from the repository root)
    python benchmarks/bench_model.py --configs small --threads 2 --repeats 3

Weights are random (vit_b's SAM and CLIP weights are not needed to time it). "encode" is one
``encode_image`` pass (ViT + neck + shared up-sampling), "decode xP" one ``decode`` of P
prompts; "8 vs 1" is (encode + decode x8) / (encode + decode x1), the product's cost rule
(<= 1.3). FLOPs come from torch.utils.flop_counter (matmuls and convolutions).
"""

from __future__ import annotations

import argparse
import platform
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

from RefSAM3DLib.model import MODEL_CONFIGS, build_model, parameter_report

PROMPTS = ["liver", "spleen", "left kidney", "right kidney", "aorta", "pancreas", "stomach", "gallbladder"]


def _seconds(fn, repeats: int) -> float:
    fn()  # warm-up
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def _gflops(fn) -> float:
    counter = FlopCounterMode(display=False)
    with counter:
        fn()
    return counter.get_total_flops() / 1e9


def bench(name: str, repeats: int) -> dict:
    report = parameter_report(name)
    torch.manual_seed(0)
    model = build_model(name).eval()
    size = model.config.window_size_vox
    image = torch.rand(1, 1, size, size, size)
    with torch.no_grad():
        one, eight = model.encode_prompts(PROMPTS[:1]), model.encode_prompts(PROMPTS)
        features = model.encode_image(image)
        row = {
            "config": name,
            "window": f"{size}^3 @ {model.config.spacing_mm[0]:g} mm",
            "params_M": report["total"]["total"] / 1e6,
            "trainable_M": report["total"]["trainable"] / 1e6,
            "encode_GFLOP": _gflops(lambda: model.encode_image(image)),
            "decode1_GFLOP": _gflops(lambda: model.decode(image, features, one)),
            "encode_s": _seconds(lambda: model.encode_image(image), repeats),
            "decode1_s": _seconds(lambda: model.decode(image, features, one), repeats),
            "decode8_s": _seconds(lambda: model.decode(image, features, eight), repeats),
        }
    row["ratio_8_vs_1"] = (row["encode_s"] + row["decode8_s"]) / (row["encode_s"] + row["decode1_s"])
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", nargs="+", default=list(MODEL_CONFIGS), choices=list(MODEL_CONFIGS))
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"machine: {platform.processor() or platform.machine()}, torch {torch.__version__}, "
          f"{args.threads} thread(s), best of {args.repeats}")
    columns = ["config", "window", "params_M", "trainable_M", "encode_GFLOP", "decode1_GFLOP",
               "encode_s", "decode1_s", "decode8_s", "ratio_8_vs_1"]
    print(" | ".join(columns))
    for name in args.configs:
        row = bench(name, args.repeats)
        print(" | ".join(f"{row[c]:.2f}" if isinstance(row[c], float) else str(row[c]) for c in columns), flush=True)


if __name__ == "__main__":
    main()
