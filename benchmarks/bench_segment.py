"""End-to-end inference benchmark: prints a table of seconds and peak memory.

    python benchmarks/bench_segment.py                 # CPU, bundled model
    python benchmarks/bench_segment.py --device cuda --model vit_b-untrained

Rows: the bundled sample CT with 1 and 8 prompts (their ratio is the multi-prompt amortisation:
one encoder pass per window for all prompts), and a synthetic 512x512x300 CT-like volume with
8 prompts. Each row runs in a fresh subprocess so that its peak RSS is its own.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SAMPLE_CT = ROOT / "RefSAM3DLib" / "samples" / "ts_example_ct_image.nii.gz"
EIGHT = ["liver", "spleen", "left kidney", "right kidney", "aorta", "stomach", "pancreas", "gallbladder"]

ROW_SCRIPT = r"""
import json, sys, time, resource
import numpy as np, torch
sys.path.insert(0, {root!r})
from RefSAM3DLib.inference import run_model, segment
from RefSAM3DLib.run_options import RunOptions
from RefSAM3DLib.volume_reader import read_volume
from RefSAM3DLib.volume import Volume
from RefSAM3DLib.volume_reader import read_volume
args = json.loads(sys.argv[1])
if args["input"] == "synthetic":
    rng = np.random.default_rng(0)
    k, j, i = np.mgrid[0:300, 0:512, 0:512].astype(np.float32)
    body = ((i - 256) / 230) ** 2 + ((j - 256) / 170) ** 2 < 1
    array = np.where(body, 40.0, -1000.0).astype(np.int16)
    array[((i - 180) / 90) ** 2 + ((j - 230) / 70) ** 2 + ((k - 150) / 80) ** 2 < 1] = 60
    array += rng.normal(0, 10, array.shape).astype(np.int16)
    affine = np.diag([-0.78, -0.78, 1.0, 1.0])
    volume = Volume(array, affine, modality="CT", name="synthetic 512x512x300")
else:
    volume = read_volume(args["input"], modality="CT")
options = RunOptions(device=args["device"], model=args["model"])
model = run_model(options)
started = time.perf_counter()
result = segment(volume, args["prompts"], model=model, options=options)
seconds = time.perf_counter() - started
gpu = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else 0.0
rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
print(json.dumps({{"seconds": seconds, "gpu_gib": gpu, "peak_rss_gib": rss, "shape": list(volume.shape_kji)}}))
"""


def run_row(input_name: str, prompts: list[str], model: str | None, device: str) -> dict:
    script = ROW_SCRIPT.format(root=str(ROOT))
    payload = json.dumps({"input": input_name, "prompts": prompts, "model": model, "device": device})
    completed = subprocess.run([sys.executable, "-c", script, payload], capture_output=True, text=True, check=True)
    return json.loads(completed.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--skip-large", action="store_true", help="skip the 512x512x300 row")
    args = parser.parse_args()

    rows = [("sample CT", str(SAMPLE_CT), EIGHT[:1]), ("sample CT", str(SAMPLE_CT), EIGHT)]
    if not args.skip_large:
        rows.append(("512x512x300 CT-like", "synthetic", EIGHT))
    print(f"machine: {platform.processor() or platform.machine()}, device {args.device}, {time.strftime('%Y-%m-%d')}")
    print(f"{'input':<22} {'shape (K,J,I)':<16} {'prompts':>7} {'seconds':>8} {'peak RSS GiB':>13} {'peak GPU GiB':>13}")
    results = []
    for label, source, prompts in rows:
        row = run_row(source, prompts, args.model, args.device)
        results.append(row)
        shape = "x".join(str(n) for n in row["shape"])
        print(f"{label:<22} {shape:<16} {len(prompts):>7} {row['seconds']:>8.1f} {row['peak_rss_gib']:>13.2f} {row['gpu_gib']:>13.2f}")
    print(f"multi-prompt amortisation (8 prompts / 1 prompt, sample CT): {results[1]['seconds'] / results[0]['seconds']:.2f}")


if __name__ == "__main__":
    main()
