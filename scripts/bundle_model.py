"""Copy a trained checkpoint into the package as a named, versioned bundled model.

    python scripts/bundle_model.py runs/small/best RefSAM3DLib/models/refsam3d-small-v2 \
        --name refsam3d-small-v2 --version 2.0

The weights are copied byte for byte (their SHA-256 in config.json stays valid); the metadata gains
the model's name and version, which every output then carries. The model card is written by hand.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

from RefSAM3DLib.atomic import atomic_write
from RefSAM3DLib.checkpoint import CONFIG_FILE, load_model, read_checkpoint_record


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source", type=Path, help="checkpoint folder written by training")
    parser.add_argument("destination", type=Path, help="bundled model folder")
    parser.add_argument("--name", required=True)
    parser.add_argument("--version", required=True)
    args = parser.parse_args()

    record = read_checkpoint_record(args.source)
    args.destination.mkdir(parents=True, exist_ok=True)
    weights = args.destination / record["weights_file"]
    with atomic_write(weights) as temporary:
        shutil.copyfile(args.source / record["weights_file"], temporary)
    record["metadata"] = {**record["metadata"], "name": args.name, "version": args.version}
    with atomic_write(args.destination / CONFIG_FILE) as temporary:
        temporary.write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
    model = load_model(args.destination)  # verifies the SHA-256 and that the weights fit the config
    print(f"{model.metadata['name']} {model.metadata['version']}: {weights} sha256 {record['weights_sha256']}")


if __name__ == "__main__":
    main()
