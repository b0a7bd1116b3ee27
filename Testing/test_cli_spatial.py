"""``refsam3d segment`` with --point / --negative-point / --box: RAS mm in, one refined structure out."""

import json
import re

import numpy as np
import pytest
import SimpleITK as sitk

from RefSAM3DLib.cli import main
from RefSAM3DLib.volume_reader import read_volume

from test_cli import small_ct  # noqa: F401 -- the fixture: the bundled CT cropped to 40 slices


@pytest.fixture(scope="module")
def centre(small_ct):
    volume = read_volume(small_ct)
    middle = (np.array(volume.shape_kji[::-1]) - 1) / 2.0
    return (volume.ijk_to_ras @ np.append(middle, 1.0))[:3]


def csv(values) -> str:
    return ",".join(f"{v:.2f}" for v in values)


def run(args, capsys):
    code = main(args)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_text_with_clicks_and_box_writes_one_structure_on_the_input_grid(untrained_model_dir, small_ct, centre,
                                                                         tmp_path, capsys):
    output = tmp_path / "spleen.nii.gz"
    code, out, err = run(["segment", str(small_ct), "-p", "spleen", "--point", csv(centre),
                          "--negative-point", csv(centre + [5, 0, 0]), "--box", csv(np.r_[centre + 20, centre - 20]),
                          "--model", str(untrained_model_dir), "-o", str(output)], capsys)
    assert code == 0, err
    assert sitk.ReadImage(str(output)).GetSize() == sitk.ReadImage(str(small_ct)).GetSize()
    summary = json.loads(output.with_name("spleen.json").read_text(encoding="utf-8"))
    assert "untrained-small" in json.dumps(summary) and "Spleen" in out
    assert "not trained with points or boxes" in err


def test_a_point_without_text_segments_the_structure_there(untrained_model_dir, small_ct, centre, tmp_path, capsys):
    output = tmp_path / "there.nii.gz"
    code, out, err = run(["segment", str(small_ct), "--point", csv(centre), "--model", str(untrained_model_dir),
                          "-o", str(output)], capsys)
    assert code == 0, err
    assert output.is_file() and "the structure at this point" in out


@pytest.mark.parametrize("extra, message", [
    (["-p", "liver, spleen", "--point", "CENTRE"], "refine ONE structure"),
    (["-p", "liver", "-p", "spleen", "--box", "BOX"], "refine ONE structure"),
    (["-p", "liver", "--point", "FAR"], "lies outside crop.nii.gz"),
    (["--box", "FARBOX"], "box .* lies outside"),
    ([], "No prompt given"),
])
def test_spatial_requests_that_cannot_work_are_one_clear_line_before_any_encoding(
        extra, message, untrained_model_dir, small_ct, centre, tmp_path, capsys, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the volume was encoded although the request is refused first")

    monkeypatch.setattr("RefSAM3DLib.interactive.InteractiveSession.__init__", refuse)
    values = {"CENTRE": csv(centre), "FAR": csv(centre + 900), "BOX": csv(np.r_[centre - 5, centre + 5]),
              "FARBOX": csv(np.r_[centre + 900, centre + 950])}
    output = tmp_path / "x.nii.gz"
    code, _, err = run(["segment", str(small_ct), *[values.get(e, e) for e in extra],
                        "--model", str(untrained_model_dir), "-o", str(output)], capsys)
    assert code == 2
    assert "Traceback" not in err and re.search(message, err.strip().splitlines()[-1]), err
    assert not output.exists()


def test_points_with_several_volumes_are_refused(untrained_model_dir, small_ct, centre, tmp_path, capsys):
    code, _, err = run(["segment", str(small_ct), str(small_ct), "-p", "liver", "--point", csv(centre),
                        "--model", str(untrained_model_dir), "-o", str(tmp_path / "out")], capsys)
    assert code == 2 and "ONE volume" in err


def test_negative_coordinates_after_a_space_are_values_not_options(small_ct, tmp_path):
    from RefSAM3DLib.cli import build_parser, coordinates_attached

    argv = coordinates_attached(["segment", str(small_ct), "--point", "-5,-3.5,2", "--negative-point", "-1,2,3",
                                 "--box", "-10,-10,-10,5,5,5", "-o", "x.nii.gz"])
    args = build_parser().parse_args(argv)
    assert args.point == [(-5.0, -3.5, 2.0)] and args.negative_point == [(-1.0, 2.0, 3.0)]
    assert args.box == (-10.0, -10.0, -10.0, 5.0, 5.0, 5.0) and args.prompt is None


@pytest.mark.parametrize("bad", ["1,2", "1,2,x", "1,2,3,4"])
def test_malformed_point_names_the_expected_form(bad, small_ct, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["segment", str(small_ct), "--point", bad, "-o", str(tmp_path / "x.nii.gz")])
    assert exit_info.value.code == 2
    assert "R,A,S" in capsys.readouterr().err
