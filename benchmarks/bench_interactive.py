"""Interactive refinement benchmark: one gesture from cached features against a full first run.

    python benchmarks/bench_interactive.py                       # CPU, bundled model, bundled sample CT
    python benchmarks/bench_interactive.py --device cuda --input ct.nii.gz --repeats 5

Rows: the engine's full run of one text prompt (``segment``), the session's encoding (every window
once), the session's first text-only answer to a prompt, and gestures (text + box + positive click;
text + 3 clicks) answered from the cache after that first answer, as a user refines it. The ratio of
a gesture to the full run is what the issue bounds (<= 0.1). The gestures sit at the volume's
centre, where they touch the most windows (all 8 of the bundled sample CT's).
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from RefSAM3DLib.inference import run_model, segment  # noqa: E402
from RefSAM3DLib.interactive import InteractiveSession  # noqa: E402
from RefSAM3DLib.run_options import RunOptions  # noqa: E402
from RefSAM3DLib.volume_reader import read_volume  # noqa: E402

SAMPLE_CT = ROOT / "RefSAM3DLib" / "samples" / "ts_example_ct_image.nii.gz"


def timed(function, repeats: int) -> float:
    """Median seconds of ``repeats`` calls."""
    seconds = []
    for _ in range(repeats):
        started = time.perf_counter()
        function()
        seconds.append(time.perf_counter() - started)
    return statistics.median(seconds)


def first_answers(session: InteractiveSession, prompt: str, other_prompt: str, repeats: int) -> float:
    """Median seconds of ``prompt``'s first text-only answer: each is preceded by an untimed answer
    to ``other_prompt``, so the session has kept nothing of ``prompt``."""
    seconds = []
    for _ in range(repeats):
        session.segment(other_prompt)
        seconds.append(timed(lambda: session.segment(prompt), 1))
    return statistics.median(seconds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", default=str(SAMPLE_CT))
    parser.add_argument("--prompt", default="spleen")
    parser.add_argument("--model", default=None, help="model name or folder (default: bundled)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    volume = read_volume(args.input, modality="CT")
    options = RunOptions(device=args.device, model=args.model)
    model = run_model(options)
    centre = volume.ijk_to_ras @ np.append((np.array(volume.shape_kji[::-1]) - 1) / 2.0, 1.0)
    point = centre[:3]
    box = np.concatenate([point - 30.0, point + 30.0])
    clicks = [point, point + [10.0, 0.0, 0.0], point - [0.0, 10.0, 5.0]]

    other_prompt = "liver" if args.prompt != "liver" else "spleen"
    full = timed(lambda: segment(volume, args.prompt, model=model, options=options), args.repeats)
    started = time.perf_counter()
    session = InteractiveSession(volume, model=model, options=options)
    encode = time.perf_counter() - started
    rows = [
        ("full first run (segment, 1 prompt)", full),
        (f"session encoding ({session.window_count} windows)", encode),
        ("cached: text alone, first answer", first_answers(session, args.prompt, other_prompt, args.repeats)),
        ("cached: text + box + 1 click", timed(lambda: session.segment(args.prompt, points_ras=[point], box_ras=box),
                                               args.repeats)),
        ("cached: text + 3 clicks (+/-)", timed(lambda: session.segment(args.prompt, points_ras=clicks,
                                                                         point_labels=[1, 0, 1]), args.repeats)),
    ]
    device = torch.cuda.get_device_name() if args.device.startswith("cuda") else \
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, {torch.get_num_threads()} threads"
    print(f"input {Path(args.input).name} {volume.shape_kji}, model {session.model.metadata.get('name', args.model)}, "
          f"device {args.device} ({device}), median of {args.repeats}")
    print(f"{'what':<42}{'seconds':>10}{'x full run':>12}")
    for what, seconds in rows:
        print(f"{what:<42}{seconds:>10.3f}{seconds / full:>12.3f}")
    print(f"peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB")


if __name__ == "__main__":
    main()
