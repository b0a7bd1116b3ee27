"""The child-process runner behind the Slicer module: streamed progress, cancel of the whole tree,
one-line errors, temporary files gone in every outcome."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from RefSAM3DLib.cli import build_parser
from RefSAM3DLib.cli_process import (ChildProcess, SegmentationJob, done_line, error_line, error_message,
                                     library_environment, parse_line, progress_line, segment_command)
from RefSAM3DLib.errors import Cancelled, RefSAM3DError
from RefSAM3DLib.geometry import sitk_from_volume, volume_from_sitk
from RefSAM3DLib.run_options import RunOptions


def _alive(pid: int) -> bool:
    """True while ``pid`` runs (a zombie waiting for its parent counts as ended)."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_progress_done_and_other_lines_are_told_apart():
    assert parse_line("PROGRESS 0.5000 window 3/6\n") == parse_line("PROGRESS 0.5 window 3/6")
    progress = parse_line("PROGRESS 0.5 window 3/6")
    assert (progress.kind, progress.fraction, progress.text) == ("progress", 0.5, "window 3/6")
    assert parse_line("PROGRESS 7 too far").fraction == 1.0
    assert parse_line("DONE /tmp/x/result.seg.nrrd").kind == "done"
    assert parse_line("DONE /tmp/x/result.seg.nrrd").text == "/tmp/x/result.seg.nrrd"
    assert parse_line("PROGRESS soon").kind == "log"
    assert parse_line("refsam3d: error: bad", from_stderr=True).kind == "error_log"
    # the worker's writers and the parent's readers are one protocol
    assert parse_line(progress_line(0.25, "window 1/4")) == parse_line("PROGRESS 0.25 window 1/4")
    assert parse_line(done_line("/tmp/x/result.seg.nrrd")) == parse_line("DONE /tmp/x/result.seg.nrrd")
    assert error_message(["log", error_line("the volume is empty; load another one."), ""]) == \
        "the volume is empty; load another one."


def test_command_carries_every_option_and_refuses_empty_prompts():
    # A prompt or model folder starting with '-' must reach the CLI as a value, not as an option.
    options = RunOptions(device="cpu", overlap=0.5, threshold=0.3, model="-models/m", largest_component=True,
                         fill_holes=True)
    command = segment_command("in.nrrd", ["liver", " spleen ", "", "-kidney", "--help"], "out.seg.nrrd", options,
                              python="py", modality="CT")
    assert command[:3] == ["py", "-m", "RefSAM3DLib.cli"]
    args = build_parser().parse_args(command[3:])  # the child's own parser
    assert (args.command, args.inputs, args.output) == ("segment", ["in.nrrd"], "out.seg.nrrd")
    assert args.prompt == ["liver", "spleen", "-kidney", "--help"]
    assert RunOptions.from_cli_args(args) == options and args.modality == "CT" and args.progress_lines
    assert RunOptions.from_cli_args(build_parser().parse_args(segment_command("in", ["liver"], "o", RunOptions())[3:])) \
        == RunOptions()
    with pytest.raises(RefSAM3DError, match="prompt"):
        segment_command("in.nrrd", [" ", ""], "out.seg.nrrd", RunOptions())


def test_child_output_streams_in_order_with_exit_status(tmp_path):
    script = "import sys\nfor n in range(3): print(f'PROGRESS {n / 2} step {n}', flush=True)\n" \
             "print('refsam3d: error: the volume is empty; load another one.', file=sys.stderr)\nsys.exit(2)\n"
    child = ChildProcess([sys.executable, "-c", script])
    child.start()
    events = []
    assert child.wait(events.append) == 2
    progress = [(e.fraction, e.text) for e in events if e.kind == "progress"]
    assert progress == [(0.0, "step 0"), (0.5, "step 1"), (1.0, "step 2")]
    assert child.stderr_lines == ["refsam3d: error: the volume is empty; load another one."]


def test_cancel_ends_the_child_and_its_grandchildren(tmp_path):
    pid_file = tmp_path / "grandchild.pid"
    script = textwrap.dedent(f"""
        import subprocess, sys, time
        grandchild = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
        open({str(pid_file)!r}, "w").write(str(grandchild.pid))
        print("PROGRESS 0.1 started", flush=True)
        time.sleep(120)
    """)
    child = ChildProcess([sys.executable, "-c", script])
    child.start()
    deadline = time.monotonic() + 30
    while not (pid_file.exists() and pid_file.read_text()) and time.monotonic() < deadline:
        time.sleep(0.05)
    grandchild_pid = int(pid_file.read_text())
    assert _alive(child.pid) and _alive(grandchild_pid)

    child.cancel()

    deadline = time.monotonic() + 10
    while _alive(grandchild_pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _alive(child.pid)
    assert not _alive(grandchild_pid)
    assert child.cancelled and child.returncode is not None


def test_child_environment_can_import_the_library(tmp_path):
    env = library_environment({"PATH": os.environ.get("PATH", ""), "PYTHONPATH": "/elsewhere"})
    assert env["PYTHONPATH"].split(os.pathsep)[1] == "/elsewhere"
    child = ChildProcess([sys.executable, "-c", "import RefSAM3DLib, sys; print(RefSAM3DLib.__file__)"],
                         env=env, cwd=tmp_path)
    child.start()
    lines = []
    assert child.wait(lines.append) == 0
    assert Path(lines[0].text).resolve() == (Path(__file__).parents[1] / "RefSAM3DLib" / "__init__.py").resolve()


@pytest.fixture(scope="module")
def small_volume(samples_dir):
    """A real CT crop, small enough for a fast run of the untrained model."""
    image = sitk.ReadImage(str(samples_dir / "ts_example_ct_image.nii.gz"))[40:88, 30:78, 40:72]
    return volume_from_sitk(image, name="crop", modality="CT")


@pytest.fixture(scope="module")
def untrained_model(untrained_model_dir):
    return untrained_model_dir


def test_job_runs_the_cli_and_returns_masks_on_the_input_grid(small_volume, untrained_model, tmp_path):
    fractions = []
    with SegmentationJob(small_volume, ["liver", "spleen"], RunOptions(device="cpu", model=str(untrained_model)),
                         temp_root=tmp_path) as job:
        job.start()
        job.wait(lambda event: fractions.append(event.fraction) if event.kind == "progress" else None)
        result = job.result()
        temp_dir = job.temp_dir
        assert (temp_dir / "result.seg.nrrd").exists()
        assert not (temp_dir / "input.nrrd").exists()  # the copy of the scan went as soon as it was read
    assert not temp_dir.exists()
    assert [s.structure.key for s in result.segments] == ["liver", "spleen"]
    for segment in result.segments:
        assert segment.mask.shape == small_volume.shape_kji and segment.mask.dtype == np.uint8
    np.testing.assert_allclose(result.reference.ijk_to_ras, small_volume.ijk_to_ras, atol=1e-6)
    assert fractions and fractions == sorted(fractions)


def test_job_failure_raises_the_cli_message_and_cleans_up(small_volume, tmp_path):
    with SegmentationJob(small_volume, ["liver"], RunOptions(device="cpu", model=str(tmp_path / "no-such-model")),
                         temp_root=tmp_path) as job:
        job.start()
        temp_dir = job.temp_dir
        job.wait()
        with pytest.raises(RefSAM3DError) as raised:
            job.result()
    message = str(raised.value)
    assert "no-such-model" in message and "\n" not in message and "Traceback" not in message
    assert not temp_dir.exists()


def test_cancelled_job_raises_cancelled_and_leaves_nothing(small_volume, untrained_model, tmp_path):
    job = SegmentationJob(small_volume, ["liver"], RunOptions(device="cpu", model=str(untrained_model)), temp_root=tmp_path)
    try:
        job.start()
        temp_dir = job.temp_dir
        job.cancel()
        job.wait()
        with pytest.raises(Cancelled):
            job.result()
    finally:
        job.close()
    assert not temp_dir.exists()
    assert list(tmp_path.iterdir()) == []


# ---- issue 13: the worker dies with its parent and never leaves the scan behind ---------------


def _wait_until(condition, timeout_s=120.0):
    deadline = time.monotonic() + timeout_s
    while not (met := condition()) and time.monotonic() < deadline:
        time.sleep(0.1)
    return met


def test_worker_stops_and_removes_the_scan_when_its_parent_dies(small_volume, untrained_model, tmp_path):
    scan = tmp_path / "scan.nrrd"
    sitk.WriteImage(sitk_from_volume(small_volume), str(scan))
    jobs = tmp_path / "jobs"
    jobs.mkdir()
    parent_script = textwrap.dedent(f"""
        import time
        from RefSAM3DLib.cli_process import SegmentationJob
        from RefSAM3DLib.volume_reader import read_volume
        from RefSAM3DLib.run_options import RunOptions
        job = SegmentationJob(read_volume({str(scan)!r}), ["liver"], RunOptions(device="cpu", model={str(untrained_model)!r}),
                              temp_root={str(jobs)!r})
        job.start()
        print(job.temp_dir, job.process.pid, flush=True)
        time.sleep(600)
    """)
    parent = subprocess.Popen([sys.executable, "-c", parent_script], stdout=subprocess.PIPE, text=True)
    try:
        temp_dir, worker_pid = parent.stdout.readline().split()
        assert _alive(int(worker_pid)) and Path(temp_dir).is_dir()
        parent.kill()  # Slicer crashes: no close(), no cancel()
        parent.wait()
        assert _wait_until(lambda: not _alive(int(worker_pid))), "the worker outlived its parent"
        assert _wait_until(lambda: not Path(temp_dir).exists()), "the copy of the scan was left behind"
        assert list(jobs.iterdir()) == []
    finally:
        parent.kill()
        parent.stdout.close()


def test_terminated_worker_removes_the_scan_itself(small_volume, untrained_model, tmp_path):
    job = SegmentationJob(small_volume, ["liver"], RunOptions(device="cpu", model=str(untrained_model)), temp_root=tmp_path)
    try:
        job.start()
        temp_dir = job.temp_dir
        # at work: it has read (and deleted) its input; slow to come on a busy machine (torch import)
        assert _wait_until(lambda: not (temp_dir / "input.nrrd").exists(), timeout_s=300)
        os.kill(job.process.pid, signal.SIGTERM)  # e.g. a logout; the parent has not closed the job
        assert _wait_until(lambda: job.finished)
        assert job.process.returncode == 128 + signal.SIGTERM, job.process.stderr_lines
        assert not temp_dir.exists()  # removed by the worker, not by close()
    finally:
        job.close()


def test_terminated_worker_reports_termination_even_when_a_library_swallows_it(tmp_path):
    folder = tmp_path / "refsam3d-job"
    folder.mkdir()
    (folder / "input.nrrd").write_bytes(b"a copy of a scan")
    worker_script = textwrap.dedent(f"""
        import os, signal, sys
        from RefSAM3DLib.cli_process import run_as_worker

        def body():
            try:  # as some library's broad except would
                os.kill(os.getpid(), signal.SIGTERM)
            except BaseException as error:
                raise RuntimeError("wrapped") from error
            return 0

        sys.exit(run_as_worker({str(folder)!r}, body))
    """)
    worker = subprocess.run([sys.executable, "-c", worker_script], stdin=subprocess.PIPE, capture_output=True,
                            text=True, env=library_environment(), timeout=60)
    assert worker.returncode == 128 + signal.SIGTERM, worker.stderr
    assert not folder.exists()
