"""Weight registry and downloader, against an HTTP server on 127.0.0.1 started by the test."""

from __future__ import annotations

import hashlib
import http.server
import os
import threading

import pytest

from RefSAM3DLib import weights
from RefSAM3DLib.errors import RefSAM3DError

PAYLOAD = os.urandom(3 * 1024 * 1024 + 123)
SHA = hashlib.sha256(PAYLOAD).hexdigest()


class _Handler(http.server.BaseHTTPRequestHandler):
    """Serves PAYLOAD at /file with Range support; /flaky cuts the first response short."""

    log: list = []
    flaky_cut_bytes = 0

    def log_message(self, *args):  # keep pytest output clean
        pass

    def do_GET(self):
        range_header = self.headers.get("Range")
        self.log.append((self.path, range_header))
        if self.path not in ("/file", "/flaky"):
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


def test_unpublished_hash_is_recorded_on_first_download_and_checked_after(server, cache):
    path = weights.fetch(_entry(server, sha=None), progress=False)
    assert (cache / "test.bin.sha256").read_text().strip() == SHA
    path.write_bytes(b"tampered")
    with pytest.raises(RefSAM3DError, match="does not match"):
        weights.fetch(_entry(server, sha=None), progress=False)


def test_missing_file_and_unreachable_server_are_user_errors(server):
    with pytest.raises(RefSAM3DError, match="HTTP 404"):
        weights.fetch(_entry(server, "/nothing"), progress=False)
    closed = weights.WeightEntry(name="x", url="http://127.0.0.1:9/none", filename="x.bin", sha256=SHA)
    with pytest.raises(RefSAM3DError, match="Cannot download"):
        weights.fetch(closed, progress=False, timeout_s=5)


def test_registry_names_the_official_sam_checkpoint():
    entry = weights.REGISTRY["sam_vit_b"]
    assert entry.filename == "sam_vit_b_01ec64.pth" and len(entry.sha256) == 64
    with pytest.raises(RefSAM3DError, match="Unknown weights"):
        weights.fetch("sam_vit_z")
