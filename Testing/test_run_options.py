"""RunOptions: one value for a run's options, its checks, and its round trip through a command line."""

import math

import pytest

from RefSAM3DLib.cli import build_parser
from RefSAM3DLib.errors import RefSAM3DError
from RefSAM3DLib.run_options import RunOptions


def test_defaults_and_normalised_values():
    assert RunOptions() == RunOptions(device="auto", overlap=0.25, threshold=0.5, model=None,
                                      largest_component=True, fill_holes=False)
    options = RunOptions(device="CUDA:1", overlap="0.5", model="", largest_component=0)
    assert (options.device, options.overlap, options.model, options.largest_component) == ("cuda:1", 0.5, None, False)


@pytest.mark.parametrize("field, value, words", [
    ("device", "tpu", "auto, cpu, cuda"),
    ("device", "cuda:x", "cuda:N"),
    ("overlap", 0.99, "0.9"),
    ("overlap", -0.1, "0.9"),
    ("overlap", math.nan, "0.9"),
    ("overlap", "much", "number"),
    ("threshold", 0.0, "0 to 1"),
    ("threshold", 1.0, "0 to 1"),
    ("threshold", math.nan, "0 to 1"),
    ("model", 3, "name or a folder"),
])
def test_bad_values_are_refused_with_what_to_use(field, value, words):
    with pytest.raises(RefSAM3DError, match=words.replace("(", r"\(")):
        RunOptions(**{field: value})


@pytest.mark.parametrize("options", [
    RunOptions(),
    RunOptions(device="cpu", overlap=0.1 + 0.2, threshold=0.35, model="-folder with spaces/m",
               largest_component=False, fill_holes=True),
])
def test_command_line_round_trip_is_exact(options):
    for command in ("segment", "evaluate"):
        extra = ["in.nii.gz", "--output", "o"] if command == "segment" else ["--data", "d", "--output", "o"]
        args = build_parser().parse_args([command, *extra, *options.to_cli_args()])
        assert RunOptions.from_cli_args(args) == options
