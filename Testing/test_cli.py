"""The ``refsam3d`` command: outputs, batch behaviour, and one clear line for each kind of bad input."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from RefSAM3DLib.cli import main
from RefSAM3DLib.model import MODEL_CONFIGS, parameter_report

SAMPLES = Path(__file__).resolve().parents[1] / "RefSAM3DLib" / "samples"


@pytest.fixture(scope="module")
def model_dir(untrained_model_dir):
    return untrained_model_dir


@pytest.fixture(scope="module")
def small_ct(tmp_path_factory):
    """A small real CT: the bundled sample cropped to 40 slices (keeps the test fast)."""
    image = sitk.ReadImage(str(SAMPLES / "ts_example_ct_image.nii.gz"))
    path = tmp_path_factory.mktemp("ct") / "crop.nii.gz"
    sitk.WriteImage(image[20:100, 10:90, 40:80], str(path))
    return path


def run(args, capsys):
    code = main(args)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_segment_writes_labelmap_json_and_overlay(model_dir, small_ct, tmp_path, capsys):
    output = tmp_path / "out.nii.gz"
    overlay = tmp_path / "out.png"
    code, out, err = run(
        ["segment", str(small_ct), "-p", "liver, spleen", "-p", "hepatic", "--model", str(model_dir), "-o", str(output),
         "--overlay", str(overlay)],
        capsys,
    )
    assert code == 0, err
    written = sitk.ReadImage(str(output))
    source = sitk.ReadImage(str(small_ct))
    assert written.GetSize() == source.GetSize()
    np.testing.assert_allclose(written.GetDirection(), source.GetDirection(), atol=1e-6)
    np.testing.assert_allclose(written.GetOrigin(), source.GetOrigin(), atol=1e-4)
    summary = json.loads(output.with_name("out.json").read_text())
    assert "untrained-small" in json.dumps(summary)
    # every --prompt is read by the vocabulary as a line of one text: "hepatic" repeats the liver
    assert [label["key"] for label in summary["labels"].values()] == ["liver", "spleen"]
    assert overlay.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "Liver" in out and "Spleen" in out


def test_refuses_to_overwrite_without_flag(model_dir, small_ct, tmp_path, capsys):
    output = tmp_path / "exists.nii.gz"
    output.write_bytes(b"keep me")
    code, _, err = run(["segment", str(small_ct), "-p", "liver", "--model", str(model_dir), "-o", str(output)], capsys)
    assert code == 2 and "--overwrite" in err
    assert output.read_bytes() == b"keep me"


def test_batch_reports_one_failure_and_processes_the_rest(model_dir, small_ct, tmp_path, capsys):
    folder = tmp_path / "batch"
    folder.mkdir()
    (folder / "a.nii.gz").write_bytes(small_ct.read_bytes())
    (folder / "broken.nii.gz").write_text("not an image")
    code, out, err = run(["segment", str(folder), "-p", "liver", "--model", str(model_dir), "-o", str(tmp_path / "results")], capsys)
    assert code == 1
    assert (tmp_path / "results" / "a.nii.gz").exists()
    assert not (tmp_path / "results" / "broken.nii.gz").exists()
    assert "1 of 2 volumes segmented, 1 failed" in out
    assert "broken.nii.gz" in err


def write_nifti(path, array, spacing=(1.0, 1.0, 1.0)):
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(spacing)
    sitk.WriteImage(image, str(path))
    return path


BAD_INPUTS = {
    "missing file": lambda d: d / "nope.nii.gz",
    "text file named .nii.gz": lambda d: (d / "t.nii.gz").write_text("hello") and d / "t.nii.gz",
    "truncated file": lambda d: (d / "cut.nii.gz").write_bytes((SAMPLES / "ct3slice_image.nii.gz").read_bytes()[:5000]) and d / "cut.nii.gz",
    "2D image": lambda d: write_nifti(d / "flat.nii.gz", np.zeros((20, 20), np.int16)),
    "4D image without --frame": lambda d: write_4d(d / "four.nii.gz"),
    "NaN voxels": lambda d: write_nifti(d / "nan.mha", np.full((8, 8, 8), np.nan, np.float32)),
    "empty DICOM folder": lambda d: (d / "empty_dicom").mkdir() or d / "empty_dicom",
}


def kind_word(kind):
    """A word the error message must contain, so that it names the problem."""
    return {"missing file": "not found", "text file named .nii.gz": "t.nii.gz", "truncated file": "cut.nii.gz",
            "2D image": "2d", "4D image without --frame": "frame", "NaN voxels": "nan",
            "empty DICOM folder": "dicom"}[kind]


def write_4d(path):
    image = sitk.JoinSeries([sitk.Image(8, 8, 8, sitk.sitkInt16)] * 2)
    sitk.WriteImage(image, str(path))
    return path


@pytest.mark.parametrize("kind", sorted(BAD_INPUTS))
def test_bad_input_gives_one_clear_line(kind, model_dir, tmp_path, capsys):
    path = BAD_INPUTS[kind](tmp_path)
    output = tmp_path / "out.nii.gz"
    code, _, err = run(["segment", str(path), "-p", "liver", "--model", str(model_dir), "-o", str(output)], capsys)
    assert code == 2
    errors = [line for line in err.splitlines() if "refsam3d: error:" in line]
    assert len(errors) == 1 and kind_word(kind) in errors[0].lower(), err
    assert "Traceback" not in err
    assert not output.exists()


def test_empty_prompt_unknown_device_and_missing_model(model_dir, small_ct, tmp_path, capsys):
    cases = [
        (["-p", "  "], "prompt"),
        (["-p", "liver", "--device", "tpu"], "device"),
        (["-p", "liver", "--model", str(tmp_path / "no_model")], "model"),
    ]
    for extra, word in cases:
        args = ["segment", str(small_ct), "-o", str(tmp_path / "x.nii.gz")]
        if "--model" not in extra:
            extra = extra + ["--model", str(model_dir)]
        code, _, err = run(args + extra, capsys)
        assert code == 2 and word in err.lower(), err


def test_output_folder_that_cannot_be_created(model_dir, small_ct, tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("a file where the output folder should be")
    output = blocker / "sub" / "o.nii.gz"
    code, _, err = run(["segment", str(small_ct), "-p", "liver", "--model", str(model_dir), "-o", str(output)], capsys)
    assert code == 2 and "refsam3d: error:" in err and "Traceback" not in err
    assert blocker.read_text().startswith("a file")


def test_help_shows_examples():
    completed = subprocess.run([sys.executable, "-m", "RefSAM3DLib.cli", "segment", "--help"], capture_output=True, text=True)
    assert completed.returncode == 0 and "examples:" in completed.stdout


@pytest.fixture(scope="module")
def parameter_reports():
    """``parameter_report`` building each config once for the whole module (vit_b: 158 M parameters)."""
    reports = {}

    def report(name):
        if name not in reports:
            reports[name] = parameter_report(name)
        return reports[name]

    return report


# what each form must say about the parts: the paper's vit_b uses CLIP's ViT-B/16 text tower
IMAGE_ENCODER_WORDS = {"small": "convolutional stem [8, 16, 32] + 3D ViT", "vit_b": "SAM 3D ViT"}
TEXT_ENCODER_WORDS = {"minilm": "all-MiniLM-L6-v2", "clip": "CLIP ViT-B/16 text tower"}


@pytest.mark.parametrize("name", sorted(MODEL_CONFIGS))
def test_info_prints_a_table_and_json_naming_both_encoders_for_every_config(name, parameter_reports, monkeypatch, capsys):
    monkeypatch.setattr("RefSAM3DLib.model.build.parameter_report", parameter_reports)
    config = MODEL_CONFIGS[name]
    code, table, _ = run(["info", "--config", name], capsys)
    assert code == 0
    code, text, _ = run(["info", "--config", name, "--json"], capsys)
    assert code == 0
    report = json.loads(text)

    image_words = IMAGE_ENCODER_WORDS.get(name, "3D ViT")
    text_words = TEXT_ENCODER_WORDS[config.text_encoder]
    assert report["config"] == name
    assert image_words in report["image_encoder"] and text_words in report["text_encoder"]
    lines = table.splitlines()
    assert lines[0].split() == ["config", name]
    assert lines[1].startswith("image encoder ") and image_words in lines[1]
    assert lines[2].startswith("text encoder ") and text_words in lines[2]
    # one row per component and a total row, each: name, total, trainable, frozen -- the JSON's numbers
    header = lines.index(next(line for line in lines if line.split() == ["component", "total", "trainable", "frozen"]))
    rows = {}
    for line in lines[header + 1:]:
        if not line.strip():
            break
        component, *numbers = line.split()
        rows[component] = dict(zip(("total", "trainable", "frozen"), (int(n.replace(",", "")) for n in numbers)))
    assert rows == {**report["components"], "total": report["total"]}
    assert all(row["total"] == row["trainable"] + row["frozen"] for row in rows.values())
    assert 0 < report["total"]["trainable"] < report["total"]["total"]
    assert rows["text_encoder"]["trainable"] == 0  # frozen in every config
    assert lines[-1] == f"trainable fraction {report['trainable_fraction']:.1%}"
    if name == "vit_b":
        assert report["total"]["total"] > 100_000_000


def test_info_of_an_unknown_config_names_the_registered_ones(capsys):
    code, out, err = run(["info", "--config", "vit_h"], capsys)
    assert code == 2 and not out
    assert "vit_h" in err and all(name in err for name in MODEL_CONFIGS)


def test_train_options_reach_the_training_entry_point(capsys):
    with pytest.raises(SystemExit) as stop:
        main(["train", "--help"])
    assert stop.value.code == 0
    assert "--max-minutes" in capsys.readouterr().out


# ---- issue 13: nothing lost, nothing written before every output is known to be writable ----


@pytest.fixture()
def no_inference(monkeypatch):
    """Fail the test if inference starts: these runs must stop at the output checks."""

    def refuse(*args, **kwargs):
        raise AssertionError("inference started although an output check must fail first")

    monkeypatch.setattr("RefSAM3DLib.inference.segment", refuse)


@pytest.mark.parametrize("layout", ["same name in two folders", "a.nii and a.nii.gz", "same input twice"])
def test_batch_outputs_that_would_collide_are_refused_before_any_work(layout, model_dir, small_ct, tmp_path,
                                                                     capsys, no_inference):
    if layout == "same name in two folders":
        inputs = [tmp_path / "b1" / "ct.nii.gz", tmp_path / "b2" / "ct.nii.gz"]
    elif layout == "a.nii and a.nii.gz":
        inputs = [tmp_path / "in" / "a.nii", tmp_path / "in" / "a.nii.gz"]
    else:
        inputs = [tmp_path / "in" / "ct.nii.gz"] * 2
    for path in inputs:
        path.parent.mkdir(exist_ok=True)
        sitk.WriteImage(sitk.ReadImage(str(small_ct)), str(path))
    arguments = [str(inputs[0].parent)] if layout == "a.nii and a.nii.gz" else [str(p) for p in inputs]
    results = tmp_path / "results"
    code, out, err = run(["segment", *arguments, "-p", "liver", "--model", str(model_dir), "-o", str(results),
                          "--overwrite"], capsys)
    assert code == 2 and "Traceback" not in err
    (line,) = [line for line in err.splitlines() if line.startswith("refsam3d: error:")]
    expected = results / ("a.nii.gz" if layout == "a.nii and a.nii.gz" else "ct.nii.gz")
    assert f"would both write {expected}" in line
    assert not results.exists()


OUTPUT_PROBLEMS = {
    # name: (make the problem in tmp_path -> (output, overlay or None), word the error must contain)
    "existing overlay": (lambda d: (d / "o.nii.gz", (d / "o.png").write_bytes(b"old png") and d / "o.png"), "o.png"),
    "existing sidecar JSON": (lambda d: ((d / "o.json").write_text("{}") and d / "o.nii.gz", None), "o.json"),
    # procfs takes no new files, not even from root (chmod does not stop root in CI containers)
    "read-only folder": (lambda d: (Path("/proc/self/o.nii.gz"), None), "not writable"),
    "non-UTF-8 output name": (lambda d: (d / os.fsdecode(b"o\xff.nii.gz"), None), "utf-8"),
}


@pytest.mark.parametrize("problem", sorted(OUTPUT_PROBLEMS))
def test_every_output_is_checked_before_inference_and_nothing_is_written(problem, model_dir, small_ct, tmp_path,
                                                                        capsys, no_inference):
    make, word = OUTPUT_PROBLEMS[problem]
    output, overlay = make(tmp_path)
    before = {p: p.read_bytes() for p in tmp_path.iterdir()}
    args = ["segment", str(small_ct), "-p", "liver", "--model", str(model_dir), "-o", str(output)]
    code, _, err = run(args + (["--overlay", str(overlay)] if overlay else []), capsys)
    assert code == 2 and "Traceback" not in err
    (line,) = [line for line in err.splitlines() if line.startswith("refsam3d: error:")]
    assert word in line.lower() or word in line, line
    assert {p: p.read_bytes() for p in tmp_path.iterdir()} == before  # nothing written, nothing changed


@pytest.mark.parametrize("overlap", ["0.99", "-0.1", "nan"])
def test_absurd_overlap_is_refused_before_any_work(overlap, model_dir, small_ct, tmp_path, capsys, no_inference):
    code, _, err = run(["segment", str(small_ct), "-p", "liver", "--model", str(model_dir), "-o",
                        str(tmp_path / "o.nii.gz"), f"--overlap={overlap}"], capsys)
    assert code == 2 and "Traceback" not in err
    (line,) = [line for line in err.splitlines() if line.startswith("refsam3d: error:")]
    assert "overlap" in line.lower() and "0.9" in line
    assert list(tmp_path.iterdir()) == []


def test_dicom_folder_with_two_series_names_the_option_that_chooses_one(model_dir, small_ct, tmp_path, capsys,
                                                                        make_dicom_series):
    image = sitk.Cast(sitk.ReadImage(str(small_ct)), sitk.sitkInt16)
    folder = make_dicom_series(image, tmp_path / "dicom", series_uid="1.2.826.0.1.3680043.2.1125.9.1")
    second = make_dicom_series(image[:, :, :20], tmp_path / "second", series_uid="1.2.826.0.1.3680043.2.1125.9.2")
    for path in second.iterdir():
        path.rename(folder / f"second_{path.name}")
    base = ["segment", str(folder), "-p", "liver", "--model", str(model_dir)]
    code, _, err = run(base + ["-o", str(tmp_path / "a.nii.gz")], capsys)
    assert code == 2 and "--series-uid" in err
    code, _, err = run(base + ["-o", str(tmp_path / "b.nii.gz"), "--series-uid", "1.2.826.0.1.3680043.2.1125.9.2"],
                       capsys)
    assert code == 0, err
    assert sitk.ReadImage(str(tmp_path / "b.nii.gz")).GetSize() == (image.GetWidth(), image.GetHeight(), 20)


def test_batch_of_hostile_files_fails_each_alone_and_segments_the_rest(model_dir, small_ct, tmp_path):
    """Run as a child: on a regression ITK kills that process (SIGSEGV, abort), not the test run."""
    folder = tmp_path / "batch"
    folder.mkdir()
    (folder / "good.nii.gz").write_bytes(small_ct.read_bytes())
    with open(os.path.join(os.fsencode(folder), b"name\xff.nii.gz"), "wb") as handle:  # not UTF-8
        handle.write(small_ct.read_bytes())
    nrrd_head = "NRRD0004\ntype: short\ndimension: 3\nendian: little\nencoding: raw\n"
    (folder / "bomb.nrrd").write_bytes((nrrd_head + "sizes: 1100 1100 1100\n\n").encode() + bytes(128))
    (folder / "junk.nrrd").write_bytes((nrrd_head + "sizes: 4 4 4\n" + "x" * 1000 + "\n\n").encode() + bytes(128))
    results = tmp_path / "results"
    child = subprocess.run([sys.executable, "-m", "RefSAM3DLib.cli", "segment", str(folder), "-p", "liver",
                            "--model", str(model_dir), "-o", str(results)], capture_output=True, encoding="utf-8",
                           timeout=600)
    assert child.returncode == 1, child.stderr
    assert "1 of 4 volumes segmented, 3 failed" in child.stdout and "Traceback" not in child.stderr
    for word in ("name\\xff.nii.gz: the file name is not valid UTF-8", "bomb.nrrd: the header declares",
                 "junk.nrrd: line 7 of the NRRD header"):
        assert word in child.stderr
    assert sorted(p.name for p in results.iterdir()) == ["good.json", "good.nii.gz"]


@pytest.mark.parametrize("threshold", ["1.5", "0", "nan"])
def test_absurd_threshold_is_refused_before_any_work(threshold, model_dir, small_ct, tmp_path, capsys, no_inference):
    code, _, err = run(["segment", str(small_ct), "-p", "liver", "--model", str(model_dir), "-o",
                        str(tmp_path / "o.nii.gz"), f"--threshold={threshold}"], capsys)
    assert code == 2
    (line,) = [line for line in err.splitlines() if line.startswith("refsam3d: error:")]
    assert "threshold" in line.lower() and "0.5" in line


def test_segment_as_a_command_writes_what_a_library_call_writes(model_dir, small_ct, tmp_path, capsys):
    """The `refsam3d segment` process (argv from the command line) imports MONAI without its
    optional extras (RefSAM3DLib.monai_import) and freezes the garbage collector for a quick exit;
    its outputs are those of main() called in this process."""
    arguments = [str(small_ct), "--prompt", "liver", "--prompt", "spleen", "--model", str(model_dir)]
    assert main(["segment", *arguments, "--output", str(tmp_path / "here.nii.gz")]) == 0
    capsys.readouterr()
    code = f"""
import gc, json, sys
from RefSAM3DLib.cli import main
sys.argv = ["refsam3d", "segment", *{arguments!r}, "--output", {str(tmp_path / "there.nii.gz")!r},
            "--overlay", {str(tmp_path / "there.png")!r}]
status = main()
import monai.networks.nets.transchex as transchex  # optional_import's (module, found)
print(json.dumps({{"status": status, "transformers_for_monai": transchex.transformers[1],
                  "frozen": gc.get_freeze_count() > 0}}))
"""
    child = subprocess.run([sys.executable, "-c", code], capture_output=True, encoding="utf-8", timeout=600)
    assert child.returncode == 0, child.stderr[-3000:]
    seen = json.loads(child.stdout.strip().splitlines()[-1])
    assert seen == {"status": 0, "transformers_for_monai": False, "frozen": True}
    here = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "here.nii.gz")))
    there = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "there.nii.gz")))
    assert np.array_equal(here, there) and (tmp_path / "there.png").stat().st_size > 0
    assert json.loads((tmp_path / "there.json").read_text())["labels"] == \
        json.loads((tmp_path / "here.json").read_text())["labels"]
