"""The warm worker: one encoding answers many prompts and gestures; errors keep it serving; it
leaves nothing behind when closed or orphaned."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from RefSAM3DLib.errors import RefSAM3DError
from RefSAM3DLib.interactive import InteractiveSession
from RefSAM3DLib.model_info import model_summary
from RefSAM3DLib.result_files import read_seg_nrrd
from RefSAM3DLib.run_options import RunOptions
from RefSAM3DLib.session_client import SessionClient
from RefSAM3DLib.volume_reader import read_volume
from test_cli_process import _alive, _wait_until

torch.set_num_threads(1)  # the server runs with one thread too: the same sums, the same voxels
STARTUP_S = 600  # torch import and model load, on a machine busy with a training run
BUNDLED = model_summary(None).name  # the bundled model's name, which every output carries


@pytest.fixture(scope="module")
def crop_path(samples_dir, tmp_path_factory):
    """A crop of the bundled sample CT (one model window): small enough for quick encodings."""
    path = tmp_path_factory.mktemp("scan") / "crop.nrrd"
    sitk.WriteImage(sitk.ReadImage(str(samples_dir / "ts_example_ct_image.nii.gz"))[40:88, 30:78, 40:72], str(path))
    return path


@pytest.fixture(scope="module")
def volume(crop_path):
    return read_volume(crop_path, modality="CT")


def centre_ras(volume) -> np.ndarray:
    return (volume.ijk_to_ras @ np.append((np.array(volume.shape_kji[::-1]) - 1) / 2.0, 1.0))[:3]


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    with SessionClient(RunOptions(device="cpu"), threads=1, temp_root=tmp_path_factory.mktemp("sessions")) as client:
        ready = client.wait(client.start(), timeout_s=STARTUP_S)
        assert ready["model"] == BUNDLED and ready["device"] == "cpu"
        yield client


def test_one_encoding_answers_two_text_prompts(client, crop_path, volume):
    opened = client.open(crop_path, modality="CT")
    assert (opened["encodes"], opened["windows"], opened["reused"]) == (1, 1, False)
    assert opened["shape_kji"] == list(volume.shape_kji)
    assert client.open(crop_path, modality="CT")["reused"]  # same file, unchanged: the cache answers
    for prompt, keys in (("liver", ["liver"]), ("spleen\nleft kidney", ["spleen", "kidney_left"])):
        reply = client.segment(prompt)
        assert reply["encodes"] == 1 and [s["structure"] for s in reply["segments"]] == keys
        result = read_seg_nrrd(reply["output"], reference=volume)
        assert [s.structure.key for s in result.segments] == keys
        assert result.segments[0].mask.shape == volume.shape_kji
        assert result.model_name == BUNDLED


def test_a_gesture_equals_the_session_run_in_process(client, crop_path, volume):
    client.open(crop_path, modality="CT")
    point = centre_ras(volume)
    box = np.concatenate([point - 20.0, point + 20.0])
    reply = client.segment("liver", points_ras=[point, point + [5.0, 0.0, 0.0]], point_labels=[1, 0], box_ras=box)
    assert reply["encodes"] == 1
    served = read_seg_nrrd(reply["output"], reference=volume).segments[0].mask
    local = InteractiveSession(volume, options=RunOptions(device="cpu")).segment(
        "liver", points_ras=[point, point + [5.0, 0.0, 0.0]], point_labels=[1, 0], box_ras=box)
    np.testing.assert_array_equal(served, local.segments[0].mask)


def test_bad_requests_get_one_line_errors_and_the_server_goes_on(client, crop_path, volume):
    client.open(crop_path, modality="CT")
    with pytest.raises(RefSAM3DError, match="outside"):
        client.segment("liver", points_ras=[centre_ras(volume) + 500.0])
    with pytest.raises(RefSAM3DError, match="Unknown request op 'explode'"):
        client.request("explode")
    with pytest.raises(RefSAM3DError, match="points_ras"):
        client.request("segment", prompt="liver", points_ras=[[1, 2]])
    client.process.send("{not json")
    with pytest.raises(RefSAM3DError, match="Not a JSON request"):
        client.wait(None)
    assert client.close_volume()["closed"]
    with pytest.raises(RefSAM3DError, match="No volume is open"):
        client.segment("liver")
    assert client.open(crop_path, modality="CT")["encodes"] == 2  # still serving


def test_a_model_that_cannot_load_is_reported(tmp_path):
    with SessionClient(RunOptions(device="cpu", model=str(tmp_path / "no-such-model")), temp_root=tmp_path) as client:
        with pytest.raises(RefSAM3DError, match="no-such-model"):
            client.wait(client.start(), timeout_s=STARTUP_S)
        with pytest.raises(RefSAM3DError, match="no-such-model"):
            client.segment("liver")


def test_the_server_dies_with_its_parent_and_leaves_no_files(crop_path, tmp_path):
    parent_script = textwrap.dedent(f"""
        import time
        from RefSAM3DLib.run_options import RunOptions
        from RefSAM3DLib.session_client import SessionClient
        from RefSAM3DLib.volume_reader import read_volume
        client = SessionClient(RunOptions(device="cpu"), threads=1, temp_root={str(tmp_path)!r})
        client.wait(client.start())
        client.write_volume(read_volume({str(crop_path)!r}))
        print(client.folder, client.pid, flush=True)
        time.sleep(600)
    """)
    parent = subprocess.Popen([sys.executable, "-c", parent_script], stdout=subprocess.PIPE, text=True)
    try:
        folder, server_pid = parent.stdout.readline().split()
        assert _alive(int(server_pid)) and any(Path(folder).glob("volume-*.nrrd"))
        parent.kill()  # Slicer crashes: no close(), no cancel()
        parent.wait()
        assert _wait_until(lambda: not _alive(int(server_pid)), timeout_s=STARTUP_S), "the server outlived its parent"
        assert list(tmp_path.iterdir()) == []
    finally:
        parent.kill()
        parent.stdout.close()


def test_the_client_is_torch_free():
    code = "import sys, RefSAM3DLib.session_client; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], timeout=STARTUP_S).returncode == 0


def test_close_ends_the_server_which_removes_its_folder_and_is_reported_dead(client):
    """Last: it ends the module's server."""
    folder, pid = client.folder, client.pid
    client.process.close()  # end-of-file, as close() sends it, without close()'s own clean-up
    assert _wait_until(lambda: not _alive(pid), timeout_s=STARTUP_S)  # exiting torch is slow under load
    assert not folder.exists()
    with pytest.raises(RefSAM3DError, match="worker stopped"):
        client.segment("liver")
    client.close()
    assert list(folder.parent.iterdir()) == []
