"""Average the weights of several runs from one starting model (a uniform "model soup").

    python scripts/average_checkpoints.py runs/small-v38/best runs/small-v40/best runs/small-v42/best \
        --output runs/soup/best

Runs that start from the same model and train the same few parts land near one another, and their
mean is often better than each (Wortsman et al., "Model soups", ICML 2022): it averages away what
each run's random windows and gestures taught it by chance. On CPU our gesture-only runs differ by
~0.004 Dice from one another on the interactive protocol, as much as any change of recipe;
refsam3d-small-v15 is the mean of three such runs from v13. Every folder must hold the same model
config; weights equal in all of them (the frozen and untrained parts) stay as they are. The
metadata is the first folder's, with the averaged folders named in ``metadata.averaged_from``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from RefSAM3DLib.checkpoint import load_model, save_checkpoint  # noqa: E402
from RefSAM3DLib.errors import RefSAM3DError  # noqa: E402


def average_checkpoints(sources: list[Path], output: Path) -> list[str]:
    """Write the mean of ``sources``' trained weights as a checkpoint folder ``output``.

    Returns:
        the names of the weights that differed between the sources (the averaged ones).
    """
    if len(sources) < 2:
        raise RefSAM3DError("Give at least two checkpoint folders to average.")
    models = [load_model(source) for source in sources]  # each verified (SHA-256, shapes)
    first = models[0]
    for source, model in zip(sources[1:], models[1:]):
        if model.config != first.config:
            raise RefSAM3DError(f"{source} has another model config than {sources[0]}; only runs of one "
                                "model can be averaged.")
    states = [model.trainable_state_dict() for model in models]
    averaged, mean = [], {}
    for name, tensor in states[0].items():
        tensors = [state[name] for state in states]
        if all(torch.equal(tensor, other) for other in tensors[1:]):
            continue
        mean[name] = torch.stack([t.float() for t in tensors]).mean(dim=0).to(tensor.dtype)
        averaged.append(name)
    first.load_state_dict(mean, strict=False)
    metadata = {**first.metadata, "averaged_from": [str(source) for source in sources]}
    save_checkpoint(first, output, metadata)
    return averaged


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("sources", nargs="+", type=Path, help="checkpoint folders of one model config")
    parser.add_argument("--output", required=True, type=Path, help="checkpoint folder to write")
    args = parser.parse_args(argv)
    averaged = average_checkpoints(args.sources, args.output)
    print(f"{args.output}: {len(averaged)} weights averaged over {len(args.sources)} runs "
          f"({', '.join(sorted({'.'.join(name.split('.')[:2]) for name in averaged}))})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
