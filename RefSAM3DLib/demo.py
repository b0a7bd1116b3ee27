"""``make demo``: segment the bundled sample CT with the bundled model and write every output kind.

Run as ``python -m RefSAM3DLib.demo --output demo_output``. Not for clinical use.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .errors import RefSAM3DError
from .evaluation import case_metrics
from .inference import model_name, model_version, run_model, segment
from .overlay import write_overlay_png
from .result_files import write_result
from .run_options import RunOptions
from .volume import Volume
from .volume_reader import read_volume

SAMPLES = Path(__file__).parent / "samples"
SAMPLE_CT = SAMPLES / "ts_example_ct_image.nii.gz"
SAMPLE_LABEL = SAMPLES / "ts_example_ct_label.nii.gz"
PROMPTS = ["perform liver segmentation", "spleen", "left kidney", "right kidney", "aorta"]


def reference_masks(label: Volume) -> dict[str, object]:
    """Structure key -> boolean mask of the bundled reference label (TotalSegmentator output)."""
    names = json.loads((SAMPLES / "labelmaps.json").read_text(encoding="utf-8"))[SAMPLE_LABEL.name]
    return {key: label.array == int(value) for value, key in names.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--output", default="demo_output")
    parser.add_argument("--device", default="auto")
    args = parser.parse_args(argv)
    output = Path(args.output)
    output.mkdir(parents=True, exist_ok=True)
    try:
        options = RunOptions(device=args.device)
        model = run_model(options)
        volume = read_volume(SAMPLE_CT, modality="CT")
        print(f"Segmenting {SAMPLE_CT.name} {volume.shape_kji[::-1]} voxels with {model_name(model)} {model_version(model)} ...")
        result = segment(volume, PROMPTS, model=model, options=options)
        paths = [output / "ts_example_ct.nii.gz", output / "ts_example_ct.seg.nrrd", output / "ts_example_ct.png"]
        write_result(result, paths[0], overwrite=True)
        write_result(result, paths[1], overwrite=True)
        write_overlay_png(result, paths[2], overwrite=True)
    except RefSAM3DError as error:
        print(f"demo: error: {error}", file=sys.stderr)
        return 2

    references = reference_masks(read_volume(SAMPLE_LABEL))
    print(f"\nDone in {result.elapsed_s:.1f} s.  Structure, volume, Dice of the label map against the bundled "
          "TotalSegmentator reference:")
    for number, seg in enumerate(result.segments, start=1):
        reference = references.get(seg.structure.key) if seg.structure else None
        dice = (case_metrics(result.label_map == number, reference, volume.spacing_mm[::-1])["dice"]
                if reference is not None else float("nan"))
        print(f"  {seg.name:<16} {result.volume_ml(seg):9.1f} mL   Dice {dice:.3f}")
    print("\nNote: this CT was part of the bundled model's training data; see the model card for held-out scores.")
    print("Files:")
    for path in paths + [paths[0].with_name("ts_example_ct.json")]:
        print(f"  {path}")
    print("Not a medical device; not for clinical use.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
