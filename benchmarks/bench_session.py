"""Warm worker benchmark: what a Slicer user waits for, through the client, on one volume.

    python benchmarks/bench_session.py                       # CPU, bundled model, bundled sample CT
    python benchmarks/bench_session.py --device cuda --input ct.nii.gz --repeats 5

Rows: the first run (server start with torch import and model load, open = read + encode, first
prompt), a repeat text prompt, and a gesture (text + box + a negative click) on the same volume,
all answered by one server. Every answer is written as a .seg.nrrd and timed end to end (request
sent to reply read), as the Slicer module would see it.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from RefSAM3DLib.run_options import RunOptions  # noqa: E402
from RefSAM3DLib.session_client import SessionClient  # noqa: E402
from RefSAM3DLib.volume_reader import read_volume  # noqa: E402

SAMPLE_CT = ROOT / "RefSAM3DLib" / "samples" / "ts_example_ct_image.nii.gz"


def timed(function) -> tuple[float, dict]:
    started = time.perf_counter()
    reply = function()
    return time.perf_counter() - started, reply


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", default=str(SAMPLE_CT))
    parser.add_argument("--prompt", default="spleen")
    parser.add_argument("--model", default=None, help="model name or folder (default: bundled)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch threads in the server")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    volume = read_volume(args.input, modality="CT")  # only for the gesture's coordinates
    point = (volume.ijk_to_ras @ np.append((np.array(volume.shape_kji[::-1]) - 1) / 2.0, 1.0))[:3]
    box = np.concatenate([point - 30.0, point + 30.0])
    with SessionClient(RunOptions(device=args.device, model=args.model), threads=args.threads) as client:
        started = time.perf_counter()
        ready = client.wait(client.start())
        load = time.perf_counter() - started
        open_s, opened = timed(lambda: client.open(args.input, modality="CT"))
        first_s, _ = timed(lambda: client.segment(args.prompt))
        repeat = [timed(lambda: client.segment(args.prompt)) for _ in range(args.repeats)]
        gesture = [timed(lambda: client.segment(args.prompt, points_ras=[point + [10.0, 0.0, 0.0]], point_labels=[0],
                                                box_ras=box)) for _ in range(args.repeats)]
    first = load + open_s + first_s
    rows = [
        ("server start + model load", load),
        (f"open: read + encode ({opened['windows']} windows)", open_s),
        ("first prompt from the cache", first_s),
        ("FIRST RUN (the three above)", first),
        ("repeat text prompt", statistics.median(s for s, _ in repeat)),
        ("gesture: text + box + negative click", statistics.median(s for s, _ in gesture)),
    ]
    encodes = gesture[-1][1]["encodes"]
    print(f"input {Path(args.input).name} {volume.shape_kji}, model {ready['model']}, device {ready['device']}, "
          f"threads {args.threads or 'default'}, median of {args.repeats}, encodings {encodes}")
    print(f"{'what':<44}{'seconds':>10}{'x first run':>13}")
    for what, seconds in rows:
        print(f"{what:<44}{seconds:>10.2f}{seconds / first:>13.3f}")


if __name__ == "__main__":
    main()
