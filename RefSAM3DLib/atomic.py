"""Atomic file writing: an output either appears whole or not at all.

Kept free of SimpleITK and torch so that every writer (label maps, checkpoints on a training
machine without SimpleITK, reports) shares it.
"""

from __future__ import annotations

import contextlib
import os
import re
import time
import uuid
from pathlib import Path

from .errors import RefSAM3DError


STALE_PARTIAL_S = 15 * 60
"""A partial file untouched this long belongs to a writer that was killed (a live writer keeps
writing to its file, and renames it within seconds of finishing)."""


@contextlib.contextmanager
def atomic_write(path):
    """Yield a temporary path next to ``path``; on success rename it over ``path``, else delete it.

    The temporary name keeps the destination's suffix (``.X.<random>.partial.nii.gz``) so that
    writers choosing the format by suffix (SimpleITK) write the right format. Partials of the
    same destination left by a killed writer (SIGKILL, power loss: no ``finally`` ran) are
    removed first. OS errors (folder missing rights, path through a file) become a RefSAM3DError.
    """
    path = Path(path)
    suffix = full_suffix(path)
    stem = path.name[: len(path.name) - len(suffix)]
    temporary = path.with_name(f".{stem}.{uuid.uuid4().hex[:8]}.partial{suffix}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_partials(path.parent, stem, suffix)
        yield temporary
        os.replace(temporary, path)
    except OSError as error:
        raise RefSAM3DError(
            f"Cannot write {path}: {error.strerror or error}; choose a writable output folder."
        ) from None
    finally:
        with contextlib.suppress(OSError):
            temporary.unlink()


def remove_stale_partials(folder: Path, stem: str, suffix: str) -> None:
    """Delete ``.<stem>.<8 hex>.partial<suffix>`` files in ``folder`` older than STALE_PARTIAL_S."""
    pattern = re.compile(rf"\.{re.escape(stem)}\.[0-9a-f]{{8}}\.partial{re.escape(suffix)}")
    now = time.time()
    for entry in os.scandir(folder):
        if pattern.fullmatch(entry.name):
            with contextlib.suppress(OSError):  # gone already, or not ours to delete
                if now - entry.stat(follow_symlinks=False).st_mtime > STALE_PARTIAL_S:
                    os.unlink(entry.path)


def full_suffix(path: Path) -> str:
    name = path.name.lower()
    for suffix in (".seg.nrrd", ".nii.gz"):
        if name.endswith(suffix):
            return path.name[-len(suffix):]
    return path.suffix
