"""Copy a trained checkpoint into the package as a named, versioned bundled model.

    python scripts/bundle_model.py runs/small-v20/checkpoint RefSAM3DLib/models/refsam3d-small-v12 \
        --name refsam3d-small-v12 --version 12.0 --evaluation eval-btcv/report.csv eval-chaos/report.csv

The weights are copied byte for byte (their SHA-256 in config.json stays valid); the metadata gains
the model's name and version, which every output then carries, and ``held_out_dice``
(``{modality: {structure: mean Dice}}``) from the ``refsam3d evaluate`` reports of patients the
model never trained on, which the Slicer panel shows. The text-embedding cache is written for the
folder. The model card is written by hand.
"""

from __future__ import annotations

import argparse
import csv
import json
import shutil
from collections import defaultdict
from pathlib import Path

from RefSAM3DLib.atomic import atomic_write
from RefSAM3DLib.checkpoint import CONFIG_FILE, load_model, read_checkpoint_record, write_text_embedding_cache


def held_out_dice(reports: list[Path]) -> dict[str, dict[str, float]]:
    """Mean Dice per modality and structure over the rows of ``refsam3d evaluate`` reports."""
    scores: dict[tuple[str, str], list[float]] = defaultdict(list)
    for report in reports:
        with report.open(encoding="utf-8", newline="") as handle:
            for row in csv.DictReader(handle):
                scores[(row["modality"], row["structure"])].append(float(row["dice"]))
    table: dict[str, dict[str, float]] = defaultdict(dict)
    for (modality, structure), values in sorted(scores.items()):
        table[modality][structure] = round(sum(values) / len(values), 3)
    return dict(table)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source", type=Path, help="checkpoint folder written by training")
    parser.add_argument("destination", type=Path, help="bundled model folder")
    parser.add_argument("--name", required=True)
    parser.add_argument("--version", required=True)
    parser.add_argument("--evaluation", nargs="+", type=Path, required=True,
                        help="report.csv files of refsam3d evaluate on held-out patients")
    args = parser.parse_args()

    record = read_checkpoint_record(args.source)
    args.destination.mkdir(parents=True, exist_ok=True)
    weights = args.destination / record["weights_file"]
    with atomic_write(weights) as temporary:
        shutil.copyfile(args.source / record["weights_file"], temporary)
    record["metadata"] = {**record["metadata"], "name": args.name, "version": args.version,
                          "held_out_dice": held_out_dice(args.evaluation)}
    with atomic_write(args.destination / CONFIG_FILE) as temporary:
        temporary.write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
    write_text_embedding_cache(args.destination)
    model = load_model(args.destination)  # verifies the SHA-256 and that the weights fit the config
    print(f"{model.metadata['name']} {model.metadata['version']}: {weights} sha256 {record['weights_sha256']}")


if __name__ == "__main__":
    main()
