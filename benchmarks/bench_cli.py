"""The whole ``refsam3d segment`` run as a user sees it, stage by stage: prints the README table.

    python benchmarks/bench_cli.py                       # CPU, bundled model, the four runs below
    python benchmarks/bench_cli.py --device cuda         # the same on a GPU (adds peak GPU memory)
    python benchmarks/bench_cli.py --model path/to/model --threads 2

Runs (each in a fresh process, so that imports, start-up and peak RSS are its own):

* a BTCV-size CT (``btcv_0010``: 257 x 257 x 148, 1.37 x 1.37 x 3 mm) with the 13 BTCV organ
  prompts, with 8 of them and with 1 (the 8 / 1 ratio is the multi-prompt amortisation);
* a 512 x 512 x 300 CT made by resampling that real CT (linear, SimpleITK) onto a 512 x 512 x 300
  grid over the same field of view (0.69 x 0.69 x 1.48 mm), with 8 prompts.

Each run is ``refsam3d segment CT --prompt ... --output X.nii.gz --overlay X.png`` through
``cli.main`` (label map + JSON + PNG), timed per stage by wrapping the library's own functions;
the seg.nrrd writer is timed after it on the same result. "other" is the rest (interpreter
start, argument checks, output planning). CPU seconds are user + system of the whole process:
on a loaded machine they stay close to what the run costs, while wall seconds do not.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CT = Path(os.environ.get("REFSAM3D_DATA", ROOT.parent / "shared" / "data")) / "btcv_vlalignseg" / "btcv_0010_image.nii.gz"
BTCV_13 = ["spleen", "right kidney", "left kidney", "gallbladder", "esophagus", "liver", "stomach", "aorta",
           "inferior vena cava", "portal vein and splenic vein", "pancreas", "right adrenal gland", "left adrenal gland"]
EIGHT = ["liver", "spleen", "left kidney", "right kidney", "aorta", "stomach", "pancreas", "gallbladder"]
LARGE_SHAPE_IJK = (512, 512, 300)

STAGES = [  # (label, module, attribute): every call of these is timed
    ("model + text-encoder loading", "RefSAM3DLib.inference", "load_model"),
    ("reading the volume", "RefSAM3DLib.cli", "read_volume"),
    ("resampling to model space", "RefSAM3DLib.preprocess", "to_model_space"),
    ("text encoding", "RefSAM3DLib.model.refsam3d", "RefSAM3D.encode_prompts"),
    ("windows (network)", "RefSAM3DLib.inference", "model_space_probabilities"),
    ("resampling back to the input grid", "RefSAM3DLib.preprocess", "from_model_space"),
    ("threshold + post-processing", "RefSAM3DLib.inference", "postprocess_mask"),
    ("label map", "RefSAM3DLib.sliding_window", "LabelMapComposer.add"),
    ("writer: label map + JSON", "RefSAM3DLib.result_files", "write_labelmap"),
    ("writer: PNG overlay", "RefSAM3DLib.cli", "write_overlay_png"),
]
SEG_NRRD = "writer: seg.nrrd (after the run)"


# --------------------------------------------------------------------------------------------
# The child: one CLI run in a fresh interpreter


def child(arguments: dict) -> None:
    started = time.perf_counter()
    import importlib
    import resource

    sys.path.insert(0, str(ROOT))
    if arguments["threads"]:
        import torch

        torch.set_num_threads(arguments["threads"])
    # What `refsam3d segment` imports on its way: MONAI as the command imports it (monai_import),
    # then cli.run_segment's and inference's imports.
    from RefSAM3DLib.monai_import import import_monai_for_segmentation

    import_monai_for_segmentation()
    from RefSAM3DLib import checkpoint, cli, inference, result_files  # noqa: F401

    seconds = {"imports": time.perf_counter() - started}
    results = []

    def timed(label, function):
        def wrapper(*args, **kwargs):
            begin = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                seconds[label] = seconds.get(label, 0.0) + time.perf_counter() - begin
        return wrapper

    for label, module_name, attribute in STAGES:
        owner = importlib.import_module(module_name)
        *path, name = attribute.split(".")
        for part in path:
            owner = getattr(owner, part)
        setattr(owner, name, timed(label, getattr(owner, name)))
    segment = inference.segment
    inference.segment = lambda *args, **kwargs: results.append(segment(*args, **kwargs)) or results[-1]
    # The windows the run visits: those of the (body-cropped) model-space image the engine hands on.
    window_counts = []
    timed_windows = inference.model_space_probabilities

    def counting(model, image_dhw, *args, **kwargs):
        from RefSAM3DLib.run_options import RunOptions

        window_counts.append(inference.count_windows(image_dhw.shape, model.config.window_size_vox, RunOptions().overlap))
        return timed_windows(model, image_dhw, *args, **kwargs)

    inference.model_space_probabilities = counting

    out = Path(arguments["out"])
    argv = ["segment", arguments["input"], "--output", str(out / "ct.nii.gz"), "--overlay", str(out / "ct.png"),
            "--device", arguments["device"], "--progress-lines"]
    for prompt in arguments["prompts"]:
        argv += ["--prompt", prompt]
    if arguments["model"]:
        argv += ["--model", arguments["model"]]
    with open(os.devnull, "w", encoding="utf-8") as quiet:
        stdout, sys.stdout = sys.stdout, quiet  # PROGRESS lines
        try:
            sys.argv = ["refsam3d", *argv]  # main() from the command line, as the console command runs it
            status = cli.main()
        finally:
            sys.stdout = stdout
    if status != 0:
        raise SystemExit(f"refsam3d segment exited with {status}")
    in_run = time.perf_counter() - started
    run_peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # the high-water mark so far: the CLI run's
    begin = time.perf_counter()
    result_files.write_seg_nrrd(results[-1], out / "ct.seg.nrrd")
    seconds[SEG_NRRD] = time.perf_counter() - begin

    windows = window_counts[-1]
    usage = resource.getrusage(resource.RUSAGE_SELF)
    gpu = 0.0
    if arguments["device"].startswith("cuda"):
        import torch

        gpu = torch.cuda.max_memory_allocated() / 2**30
    print(json.dumps({
        "seconds": seconds, "in_run_s": in_run, "cpu_s": usage.ru_utime + usage.ru_stime,
        "peak_rss_gib": run_peak_rss / 2**20, "peak_rss_with_seg_nrrd_gib": usage.ru_maxrss / 2**20,
        "peak_gpu_gib": gpu,
        "shape_kji": list(results[-1].reference.shape_kji),
        "windows": windows, "after_s": time.perf_counter() - started - in_run,
    }))


# --------------------------------------------------------------------------------------------
# The parent: the runs and the table


def make_large_ct(source: Path, target: Path) -> None:
    """``source`` resampled (linear) onto a 512 x 512 x 300 grid over its own field of view."""
    import SimpleITK as sitk

    image = sitk.ReadImage(str(source))
    size, spacing = image.GetSize(), image.GetSpacing()
    new_spacing = [spacing[a] * size[a] / LARGE_SHAPE_IJK[a] for a in range(3)]
    # keep the field of view: the outer faces of the corner voxels stay where they were
    origin = image.TransformContinuousIndexToPhysicalPoint([-0.5 + 0.5 * new_spacing[a] / spacing[a] for a in range(3)])
    resampled = sitk.Resample(image, list(LARGE_SHAPE_IJK), sitk.Transform(), sitk.sitkLinear, origin, new_spacing,
                              image.GetDirection(), -1024.0, sitk.sitkInt16)
    sitk.WriteImage(resampled, str(target), useCompression=True)


def run(label: str, input_path: Path, prompts: list[str], args, work: Path) -> dict:
    out = work / label.replace(" ", "_")
    out.mkdir()
    payload = {"input": str(input_path), "prompts": prompts, "model": args.model, "device": args.device,
               "threads": args.threads, "out": str(out)}
    begin = time.perf_counter()
    completed = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--child", json.dumps(payload)],
                               capture_output=True, text=True, encoding="utf-8")
    wall = time.perf_counter() - begin
    if completed.returncode != 0:
        raise SystemExit(f"{label} failed:\n{completed.stderr[-3000:]}")
    row = json.loads(completed.stdout.strip().splitlines()[-1])
    row["total_s"] = wall
    return row


def machine() -> str:
    name = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8").splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{name}, {os.cpu_count()} cores"


def print_table(runs: list[tuple[str, dict]], args) -> None:
    import torch

    print(f"machine: {machine()}; torch {torch.__version__}, {args.threads or torch.get_num_threads()} threads, "
          f"device {args.device}; {time.strftime('%Y-%m-%d')}")
    print()
    print("| stage (seconds) | " + " | ".join(label for label, _ in runs) + " |")
    print("|---|" + "---:|" * len(runs))
    print("| input (K x J x I), windows | " + " | ".join(
        f"{'x'.join(map(str, row['shape_kji']))}, {row['windows']}" for _, row in runs) + " |")
    for stage in ["imports", *(label for label, _, _ in STAGES)]:
        print(f"| {stage} | " + " | ".join(f"{row['seconds'].get(stage, 0.0):.2f}" for _, row in runs) + " |")
    # the timed stages do not nest, so what they leave of the run is the rest
    print("| other (interpreter start, checks, planning) | " + " | ".join(
        f"{_end_to_end(row) - sum(v for k, v in row['seconds'].items() if k != SEG_NRRD):.2f}" for _, row in runs) + " |")
    print("| **end to end (wall)** | " + " | ".join(f"**{_end_to_end(row):.1f}**" for _, row in runs) + " |")
    print("| CPU seconds (user + system) | " + " | ".join(f"{row['cpu_s']:.1f}" for _, row in runs) + " |")
    print("| **peak RSS (GiB)** | " + " | ".join(f"**{row['peak_rss_gib']:.2f}**" for _, row in runs) + " |")
    if args.device.startswith("cuda"):
        print("| peak GPU memory (GiB) | " + " | ".join(f"{row['peak_gpu_gib']:.2f}" for _, row in runs) + " |")
    print(f"| {SEG_NRRD} | " + " | ".join(f"{row['seconds'][SEG_NRRD]:.2f}" for _, row in runs) + " |")
    print("| peak RSS with the seg.nrrd writer (GiB) | " + " | ".join(
        f"{row['peak_rss_with_seg_nrrd_gib']:.2f}" for _, row in runs) + " |")
    by_label = dict(runs)
    one, eight = by_label.get("BTCV CT, 1 prompt"), by_label.get("BTCV CT, 8 prompts")
    if one and eight:
        wall = _end_to_end(eight) / _end_to_end(one)
        print(f"\n8 prompts / 1 prompt, BTCV CT, end to end: {wall:.2f}x wall, {eight['cpu_s'] / one['cpu_s']:.2f}x CPU")


def _end_to_end(row: dict) -> float:
    """The CLI run's wall seconds: the whole process (interpreter start to exit) without what the
    benchmark does after the run (the seg.nrrd writer, counting windows)."""
    return row["total_s"] - row["after_s"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ct", type=Path, default=DEFAULT_CT, help="BTCV-size CT (default: shared btcv_0010)")
    parser.add_argument("--model", default=None, help="model folder (default: the bundled model)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's own choice)")
    parser.add_argument("--skip-large", action="store_true", help="skip the 512 x 512 x 300 run")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(json.loads(args.child))
        return
    if not args.ct.is_file():
        raise SystemExit(f"{args.ct} not found: pass --ct with a BTCV-size CT (257 x 257 x ~150).")
    runs = []
    with tempfile.TemporaryDirectory(prefix="refsam3d-bench-") as folder:
        work = Path(folder)
        for label, prompts in (("BTCV CT, 13 prompts", BTCV_13), ("BTCV CT, 8 prompts", EIGHT),
                               ("BTCV CT, 1 prompt", EIGHT[:1])):
            runs.append((label, run(label, args.ct, prompts, args, work)))
        if not args.skip_large:
            large = work / "ct_512x512x300.nii.gz"
            make_large_ct(args.ct, large)
            runs.append(("512x512x300 CT, 8 prompts", run("512x512x300 CT, 8 prompts", large, EIGHT, args, work)))
    print_table(runs, args)


if __name__ == "__main__":
    main()
