"""The registry of downloadable base weights (``WEIGHT_FILES``), the cache directory, and a
verified resumable download.

The cache is ``$REFSAM3D_CACHE`` or ``~/.cache/refsam3d``. A download goes to ``<file>.part``
(kept when interrupted and resumed with an HTTP Range request next time), shows a tqdm
progress bar, is checked against its entry's SHA-256 (and its size against the server's) and
only then renamed onto its final name, so a file in the cache under its final name is always
complete and verified. Processes sharing one cache take turns per file (``<file>.lock``): the
second waits for the first's download and then uses it.
"""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import os
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from .errors import RefSAM3DError

CACHE_ENV = "REFSAM3D_CACHE"
_CHUNK_BYTES = 1 << 20


@dataclass(frozen=True)
class WeightEntry:
    """One downloadable file.

    Args:
        name: its key in WEIGHT_FILES.
        url: where to download it.
        filename: its name in the cache.
        sha256: published SHA-256 (hex); None when the publisher gives none (then only the
            size is checked: a hash taken from our own download would vouch for nothing).
        size_bytes: expected size, for the progress bar (optional).
        description: what it is, for messages.
    """

    name: str
    url: str
    filename: str
    sha256: str | None
    size_bytes: int | None = None
    description: str = ""


WEIGHT_FILES: dict[str, WeightEntry] = {
    "sam_vit_b": WeightEntry(
        name="sam_vit_b",
        url="https://dl.fbaipublicfiles.com/segment_anything/sam_vit_b_01ec64.pth",
        filename="sam_vit_b_01ec64.pth",
        sha256="ec2df62732614e57411cdcf32a23ffdf28910380d03139ee0f4fcbe91eb8c912",
        size_bytes=375042383,
        description="official Segment Anything ViT-B checkpoint (image encoder base of config vit_b)",
    ),
    "clip_vit_b_16": WeightEntry(
        name="clip_vit_b_16",
        # open_clip's 'ViT-B-16' / 'openai' weights as safetensors on the Hugging Face hub; the
        # OpenAI original is a TorchScript archive, which a weights-only loader must refuse.
        url="https://huggingface.co/timm/vit_base_patch16_clip_224.openai/resolve/main/open_clip_model.safetensors",
        filename="clip_vit_b_16_openai.safetensors",
        sha256=None,
        description="open_clip ViT-B-16 (OpenAI) weights; RefSAM3D uses the text tower",
    ),
}


def cache_dir() -> Path:
    """The weight cache directory (``$REFSAM3D_CACHE`` or ``~/.cache/refsam3d``), created if needed."""
    path = Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "refsam3d").expanduser()
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise RefSAM3DError(f"Cannot create the weight cache {path}: {error.strerror}; set {CACHE_ENV} to a writable folder.") from None
    return path


def sha256_file(path: Path) -> str:
    """Hex SHA-256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(_CHUNK_BYTES), b""):
            digest.update(chunk)
    return digest.hexdigest()


@contextlib.contextmanager
def _file_lock(path: Path):
    """An exclusive lock on ``path`` (created if missing) between processes, held while inside."""
    with open(path, "a+b") as handle:
        if os.name == "nt":
            import msvcrt

            lock = lambda: msvcrt.locking(handle.fileno(), msvcrt.LK_NBLCK, 1)  # noqa: E731
        else:
            import fcntl

            lock = lambda: fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)  # noqa: E731
        waiting = False
        while True:
            try:
                lock()
                break
            except OSError:  # held by another process
                if not waiting:
                    print(f"refsam3d: waiting for another process downloading {path.stem}", file=sys.stderr)
                    waiting = True
                time.sleep(0.2)
        try:
            yield
        finally:
            if os.name == "nt":
                handle.seek(0)
                msvcrt.locking(handle.fileno(), msvcrt.LK_UNLCK, 1)
            # POSIX: closing the file releases the lock


def fetch(entry: "WeightEntry | str", progress: bool = True, timeout_s: float = 60.0) -> Path:
    """The cached, verified file of ``entry``; downloads (resuming a partial file) when missing.

    Args:
        entry: a WeightEntry or a WEIGHT_FILES key.
        progress: show a tqdm progress bar.
        timeout_s: socket timeout of the HTTP connection.

    Returns:
        Path of the verified file in ``cache_dir()``.
    """
    if isinstance(entry, str):
        try:
            entry = WEIGHT_FILES[entry]
        except KeyError:
            raise RefSAM3DError(f"Unknown weights {entry!r}; choose one of {sorted(WEIGHT_FILES)}.") from None
    target = cache_dir() / entry.filename
    try:
        with _file_lock(target.with_name(target.name + ".lock")):  # one download per file at a time
            return _fetch_locked(entry, target, progress, timeout_s)
    except OSError as error:
        raise RefSAM3DError(f"Cannot use the weight cache {target.parent} ({error.strerror or error}); "
                            f"set {CACHE_ENV} to a writable folder.") from None


def _fetch_locked(entry: WeightEntry, target: Path, progress: bool, timeout_s: float) -> Path:
    expected = entry.sha256
    if target.exists():
        if expected is None or sha256_file(target) == expected:
            return target
        raise RefSAM3DError(
            f"Cached {target} does not match its SHA-256 (modified or corrupt); delete it and run again to re-download."
        )
    partial = target.with_name(target.name + ".part")
    size = _download(entry, partial, progress, timeout_s)
    received = partial.stat().st_size
    if size is not None and received != size:
        partial.unlink()
        raise RefSAM3DError(
            f"Downloaded {entry.filename} has {received:,} bytes, the server announced {size:,}; "
            "run again to download it afresh."
        )
    actual = sha256_file(partial)
    if expected is not None and actual != expected:
        partial.unlink()
        raise RefSAM3DError(
            f"Downloaded {entry.filename} has SHA-256 {actual[:12]}..., expected {expected[:12]}...; "
            "the download was corrupted or the file changed upstream. Run again to retry."
        )
    os.replace(partial, target)
    return target


def _download(entry: WeightEntry, partial: Path, progress: bool, timeout_s: float) -> int | None:
    """Append the rest of ``entry.url`` to ``partial`` (HTTP Range resume when it already has bytes).

    Returns the whole file's size as the server announced it (None when it did not).
    """
    from tqdm import tqdm

    start = partial.stat().st_size if partial.exists() else 0
    request = urllib.request.Request(entry.url, headers={"Range": f"bytes={start}-"} if start else {})
    try:
        response = urllib.request.urlopen(request, timeout=timeout_s)
    except urllib.error.HTTPError as error:
        if error.code == 416 and start:  # nothing past our bytes: complete, or longer than the file
            total = error.headers.get("Content-Range", "").rpartition("/")[2]
            if total.isdigit() and int(total) == start:
                return start
            partial.unlink()  # more bytes than the file has (two writers in one .part): start over
            return _download(entry, partial, progress, timeout_s)
        raise RefSAM3DError(f"Cannot download {entry.name} from {entry.url}: HTTP {error.code}; check the address or try later.") from None
    except (urllib.error.URLError, OSError) as error:
        raise RefSAM3DError(
            f"Cannot download {entry.name} from {entry.url} ({getattr(error, 'reason', error)}); "
            f"check the internet connection or place the file at {partial.with_suffix('')}."
        ) from None
    with response:
        resumed = start and response.status == 206
        if start and not resumed:
            start = 0  # the server ignored the Range header: start over
        length = response.headers.get("Content-Length")
        total = start + int(length) if length else entry.size_bytes
        with open(partial, "ab" if resumed else "wb") as out, tqdm(
            total=total, initial=start, unit="B", unit_scale=True, desc=entry.filename, disable=not progress
        ) as bar:
            received = 0
            try:
                for chunk in iter(lambda: response.read(_CHUNK_BYTES), b""):
                    out.write(chunk)
                    bar.update(len(chunk))
                    received += len(chunk)
                if length and received < int(length):  # the server closed early without an error
                    raise http.client.IncompleteRead(b"", int(length) - received)
            except (OSError, http.client.HTTPException) as error:
                out.flush()
                raise RefSAM3DError(
                    f"Download of {entry.name} was interrupted ({error!r}); run again to resume from "
                    f"{partial.stat().st_size} bytes."
                ) from None
    return start + int(length) if length else None
