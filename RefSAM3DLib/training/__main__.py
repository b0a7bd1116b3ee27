"""``python -m RefSAM3DLib.training {prepare,train} --config FILE ...``: the training entry point.

``prepare`` builds the case cache and prompt table (needs the raw data and the text-encoder
weights); ``train`` trains (preparing first when needed). Options after ``--config`` override the
config's ``training`` section, e.g. ``--steps auto --max-minutes 8 --batch-size 8``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..errors import RefSAM3DError
from .config import load_config
from .loop import train
from .prepare import prepare


def _steps(text: str):
    return text if text == "auto" else int(text)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m RefSAM3DLib.training", description=__doc__.splitlines()[0])
    parser.add_argument("command", choices=["prepare", "train"])
    parser.add_argument("--config", required=True, help="YAML or JSON training config")
    parser.add_argument("--resume", action="store_true", help="continue from <output>/checkpoint")
    parser.add_argument("--init", help="model folder to fine-tune from (few-shot)")
    parser.add_argument("--max-cases", type=int, help="train on only this many training cases")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    parser.add_argument("--output", help="output folder (overrides the config)")
    parser.add_argument("--steps", type=_steps, help="number of steps, or 'auto' with --max-minutes")
    parser.add_argument("--max-minutes", type=float, help="time budget; stops with a checkpoint")
    parser.add_argument("--batch-size", type=int)
    parser.add_argument("--num-workers", type=int, help="DataLoader worker processes")
    parser.add_argument("--validate-every", type=int)
    parser.add_argument("--checkpoint-every", type=int)
    args = parser.parse_args(argv)

    try:
        config = load_config(args.config)
        if args.output:
            config["output"] = str(Path(args.output).resolve())
        for name in ("steps", "max_minutes", "batch_size", "num_workers", "validate_every", "checkpoint_every"):
            if getattr(args, name) is not None:
                config["training"][name] = getattr(args, name)
        if args.command == "prepare":
            print(prepare(config))
            return 0
        print(train(config, resume=args.resume, init=args.init, max_cases=args.max_cases, device=args.device))
        return 0
    except RefSAM3DError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
