"""Importing MONAI for a segmentation process without the optional packages it never uses there.

MONAI's package ``__init__`` executes every one of its submodules, and they ask for their optional
dependencies through ``monai.utils.optional_import``, which imports each one at once when it is
installed: transformers (Transchex), scikit-learn, matplotlib and most of SciPy. A segmentation
uses MONAI's intensity scaling, sliding window and UNet blocks, which need none of them, yet they
cost about 2 s of a 2-core start-up (``benchmarks/bench_cli.py``).

``import_monai_for_segmentation`` imports MONAI while refusing those packages to MONAI's own
modules only: MONAI keeps its placeholder for them (which raises if it is ever used in this
process), and anything else imports them normally, later and only if needed (a segmentation
itself needs none: its clean-up uses SimpleITK and its PNG overlay Pillow). Torch's own probes for
them (``find_spec``) are answered as usual.

Only a process that does nothing but segment uses it: the ``refsam3d segment`` command (which the
Slicer module's one-off runs also start). A library user's program, a test session calling
``cli.main`` and the warm worker import MONAI whole.
"""

from __future__ import annotations

import importlib.abc
import sys

NOT_FOR_MONAI = ("transformers", "sklearn", "scipy", "matplotlib")
_IMPORT_MACHINERY = ("importlib", "_frozen_importlib", "_frozen_importlib_external")  # modules or their packages


class _RefuseToMonai(importlib.abc.MetaPathFinder):
    """A meta-path finder that fails MONAI's imports of ``NOT_FOR_MONAI`` and passes on the rest."""

    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in NOT_FOR_MONAI and _imported_by_monai():
            raise ImportError(f"{name} is not imported through MONAI in a segmentation process "
                              "(RefSAM3DLib.monai_import)", name=name)
        return None  # the next finder on sys.meta_path finds it


def _imported_by_monai() -> bool:
    """Whether the code asking for this import (the first frame outside importlib) is MONAI's."""
    frame = sys._getframe(2)
    while frame is not None:
        module = frame.f_globals.get("__name__") or ""
        if module.partition(".")[0] not in _IMPORT_MACHINERY:
            return module == "monai" or module.startswith("monai.")
        frame = frame.f_back
    return False


def import_monai_for_segmentation() -> None:
    """Import MONAI without ``NOT_FOR_MONAI`` (nothing to do when MONAI is already imported).

    A MONAI release that cannot import without one of them is imported whole instead.
    """
    if "monai" in sys.modules:
        return
    finder = _RefuseToMonai()
    sys.meta_path.insert(0, finder)
    try:
        import monai  # noqa: F401

        return
    except ImportError:
        for name in [name for name in sys.modules if name == "monai" or name.startswith("monai.")]:
            del sys.modules[name]
    finally:
        sys.meta_path.remove(finder)
    import monai  # noqa: F401,F811
