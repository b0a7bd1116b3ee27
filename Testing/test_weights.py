"""Weight registry and downloader, against an HTTP server on 127.0.0.1 started by the test."""

from __future__ import annotations

import hashlib
import http.server
import os
import subprocess
import sys
import threading
import time

import pytest

from RefSAM3DLib import weights
from RefSAM3DLib.errors import RefSAM3DError

PAYLOAD = os.urandom(3 * 1024 * 1024 + 123)
SHA = hashlib.sha256(PAYLOAD).hexdigest()


class _Handler(http.server.BaseHTTPRequestHandler):
    """Serves PAYLOAD at /file with Range support; /flaky cuts the first response short; /slow
    sends it in pieces over about a second."""

    log: list = []
    flaky_cut_bytes = 0

    def log_message(self, *args):  # keep pytest output clean
        pass

    def do_GET(self):
        range_header = self.headers.get("Range")
        self.log.append((self.path, range_header))
        if self.path not in ("/file", "/flaky", "/slow"):
            self.send_error(404)
            return
        start = int(range_header.split("=")[1].rstrip("-")) if range_header else 0
        if start >= len(PAYLOAD):
            self.send_error(416)
            return
        body = PAYLOAD[start:]
        self.send_response(206 if range_header else 200)
        if range_header:
            self.send_header("Content-Range", f"bytes {start}-{len(PAYLOAD) - 1}/{len(PAYLOAD)}")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.path == "/flaky" and _Handler.flaky_cut_bytes:
            cut, _Handler.flaky_cut_bytes = _Handler.flaky_cut_bytes, 0
            self.wfile.write(body[:cut])
            self.wfile.flush()
            self.close_connection = True
            return
        if self.path == "/slow":  # long enough for a second client to arrive meanwhile
            for offset in range(0, len(body), 1 << 16):
                self.wfile.write(body[offset: offset + (1 << 16)])
                time.sleep(0.02)
            return
        self.wfile.write(body)


@pytest.fixture(scope="module")
def server():
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv(weights.CACHE_ENV, str(tmp_path / "cache"))
    _Handler.log.clear()
    return tmp_path / "cache"


def _entry(server, path="/file", sha=SHA):
    return weights.WeightEntry(name="test", url=server + path, filename="test.bin", sha256=sha)


def test_cache_dir_follows_the_environment_variable(cache):
    assert weights.cache_dir() == cache and cache.is_dir()


def test_fetch_downloads_verifies_and_leaves_no_partial_file(server, cache):
    path = weights.fetch(_entry(server), progress=False)
    assert path == cache / "test.bin"
    assert path.read_bytes() == PAYLOAD
    assert not (cache / "test.bin.part").exists()
    # A second fetch uses the verified cached file.
    weights.fetch(_entry(server), progress=False)
    assert len(_Handler.log) == 1


def test_fetch_resumes_a_partial_file_with_a_range_request(server, cache):
    cache.mkdir(parents=True)
    (cache / "test.bin.part").write_bytes(PAYLOAD[:1_000_000])
    path = weights.fetch(_entry(server), progress=False)
    assert path.read_bytes() == PAYLOAD
    assert _Handler.log == [("/file", "bytes=1000000-")]


def test_interrupted_download_keeps_its_part_and_the_next_fetch_completes_it(server, cache):
    _Handler.flaky_cut_bytes = 500_000
    with pytest.raises(RefSAM3DError, match="interrupted|resume"):
        weights.fetch(_entry(server, "/flaky"), progress=False)
    assert (cache / "test.bin.part").stat().st_size == 500_000
    assert not (cache / "test.bin").exists()
    path = weights.fetch(_entry(server, "/flaky"), progress=False)
    assert path.read_bytes() == PAYLOAD
    assert _Handler.log[-1] == ("/flaky", "bytes=500000-")


def test_wrong_sha256_is_refused_and_nothing_is_cached(server, cache):
    with pytest.raises(RefSAM3DError, match="SHA-256"):
        weights.fetch(_entry(server, sha="0" * 64), progress=False)
    assert not (cache / "test.bin").exists() and not (cache / "test.bin.part").exists()


def test_modified_cached_file_is_detected(server, cache):
    path = weights.fetch(_entry(server), progress=False)
    path.write_bytes(b"tampered")
    with pytest.raises(RefSAM3DError, match="does not match"):
        weights.fetch(_entry(server), progress=False)


def test_unpublished_hash_is_never_recorded_as_trusted(server, cache):
    """A hash taken from our own download vouches for nothing; a wrong one would lock the cache."""
    path = weights.fetch(_entry(server, sha=None), progress=False)
    assert path.read_bytes() == PAYLOAD
    assert sorted(p.name for p in cache.iterdir()) == ["test.bin", "test.bin.lock"]


def test_part_file_longer_than_the_download_is_discarded(server, cache):
    """What two writers sharing one .part left behind: its bytes are not trusted as the file."""
    cache.mkdir()
    (cache / "test.bin.part").write_bytes(PAYLOAD + os.urandom(1000))
    path = weights.fetch(_entry(server, sha=None), progress=False)
    assert path.read_bytes() == PAYLOAD


def test_concurrent_fetches_into_one_cache_take_turns(server, cache):
    """Two processes fetch one file at once: both get the whole verified file, nothing else is kept."""
    script = ("import sys\nfrom RefSAM3DLib import weights\n"
              "entry = weights.WeightEntry(name='test', url=sys.argv[1], filename='test.bin', sha256=None)\n"
              "print(weights.fetch(entry, progress=False).stat().st_size)\n")
    env = dict(os.environ, **{weights.CACHE_ENV: str(cache)})
    children = [subprocess.Popen([sys.executable, "-c", script, server + "/slow"], env=env,
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outputs = [child.communicate(timeout=120) for child in children]
    for child, (out, err) in zip(children, outputs):
        assert child.returncode == 0 and out.strip() == str(len(PAYLOAD)), err
    assert (cache / "test.bin").read_bytes() == PAYLOAD
    assert sorted(p.name for p in cache.iterdir()) == ["test.bin", "test.bin.lock"]
    assert [path for path, _ in _Handler.log].count("/slow") == 1  # the second used the first's download


def test_missing_file_and_unreachable_server_are_user_errors(server):
    with pytest.raises(RefSAM3DError, match="HTTP 404"):
        weights.fetch(_entry(server, "/nothing"), progress=False)
    closed = weights.WeightEntry(name="x", url="http://127.0.0.1:9/none", filename="x.bin", sha256=SHA)
    with pytest.raises(RefSAM3DError, match="Cannot download"):
        weights.fetch(closed, progress=False, timeout_s=5)


def test_registry_names_the_official_sam_checkpoint():
    entry = weights.WEIGHT_FILES["sam_vit_b"]
    assert entry.filename == "sam_vit_b_01ec64.pth" and len(entry.sha256) == 64
    with pytest.raises(RefSAM3DError, match="Unknown weights"):
        weights.fetch("sam_vit_z")
