"""Atomic file writing: an output either appears whole or not at all.

Kept free of SimpleITK and torch so that every writer (label maps, checkpoints on a training
machine without SimpleITK, reports) shares it.
"""

from __future__ import annotations

import contextlib
import os
import uuid
from pathlib import Path

from .errors import RefSAM3DError


@contextlib.contextmanager
def atomic_write(path):
    """Yield a temporary path next to ``path``; on success rename it over ``path``, else delete it.

    The temporary name keeps the destination's suffix (``.X.<random>.partial.nii.gz``) so that
    writers choosing the format by suffix (SimpleITK) write the right format. OS errors (folder
    missing rights, path through a file) become a RefSAM3DError.
    """
    path = Path(path)
    suffix = full_suffix(path)
    temporary = path.with_name(f".{path.name[: len(path.name) - len(suffix)]}."
                               f"{uuid.uuid4().hex[:8]}.partial{suffix}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        yield temporary
        os.replace(temporary, path)
    except OSError as error:
        raise RefSAM3DError(
            f"Cannot write {path}: {error.strerror or error}; choose a writable output folder."
        ) from None
    finally:
        with contextlib.suppress(OSError):
            temporary.unlink()


def full_suffix(path: Path) -> str:
    name = path.name.lower()
    for suffix in (".seg.nrrd", ".nii.gz"):
        if name.endswith(suffix):
            return path.name[-len(suffix):]
    return path.suffix
