"""A segmentation process imports MONAI without the optional packages it never uses there."""

import importlib.util
import json
import subprocess
import sys

from RefSAM3DLib.monai_import import NOT_FOR_MONAI

INSTALLED = [name for name in NOT_FOR_MONAI if importlib.util.find_spec(name) is not None]


def run_python(code: str) -> dict:
    """``code`` in a fresh interpreter (MONAI not yet imported); it prints one JSON line."""
    completed = subprocess.run([sys.executable, "-c", code], capture_output=True, encoding="utf-8", timeout=600)
    assert completed.returncode == 0, completed.stderr[-3000:]
    return json.loads(completed.stdout.strip().splitlines()[-1])


def test_monai_imports_without_them_and_they_import_normally_afterwards():
    assert {"scipy", "matplotlib"} <= set(INSTALLED)  # the project's own dependencies: the test has teeth
    seen = run_python("""
import importlib.util, json, sys
import numpy as np, torch
from RefSAM3DLib.monai_import import NOT_FOR_MONAI, import_monai_for_segmentation
import_monai_for_segmentation()
loaded = [name for name in NOT_FOR_MONAI if name in sys.modules]
finders_left = [type(f).__name__ for f in sys.meta_path if type(f).__name__ == "_RefuseToMonai"]
orphans = [name for name in sys.modules if "." in name and name.rpartition(".")[0] not in sys.modules]
# What a segmentation uses of MONAI still works.
from monai.inferers import sliding_window_inference
from monai.transforms import ScaleIntensityRange
scaled = ScaleIntensityRange(-100.0, 100.0, 0.0, 1.0, clip=True)(np.array([-200.0, 0.0, 200.0]))
blended = sliding_window_inference(torch.ones(1, 1, 20, 20, 20), (8, 8, 8), 1, lambda x: 2 * x, mode="gaussian")
# Anyone else imports them as usual, and probes for them are answered.
import scipy.ndimage, matplotlib.figure
print(json.dumps({"loaded": loaded, "finders_left": finders_left, "orphans": orphans,
                  "scaled": [float(v) for v in scaled], "blended": float(blended.mean()),
                  "probe": importlib.util.find_spec("scipy") is not None}))
""")
    assert seen["loaded"] == [] and seen["finders_left"] == [] and seen["orphans"] == []
    assert seen["scaled"] == [0.0, 0.5, 1.0] and abs(seen["blended"] - 2.0) < 1e-5 and seen["probe"]


def test_a_monai_that_needs_one_of_them_is_imported_whole():
    """MONAI cannot import without numpy: refusing it makes the import fail, and MONAI comes whole."""
    seen = run_python("""
import json, sys
from RefSAM3DLib import monai_import
sys.modules.pop("numpy", None)
for name in [name for name in sys.modules if name.startswith("numpy.")]:
    del sys.modules[name]
monai_import.NOT_FOR_MONAI = ("numpy",)
monai_import.import_monai_for_segmentation()
import monai.transforms
print(json.dumps({"numpy": "numpy" in sys.modules, "transforms": hasattr(monai.transforms, "ScaleIntensityRange"),
                  "finders_left": [type(f).__name__ for f in sys.meta_path if type(f).__name__ == "_RefuseToMonai"]}))
""")
    assert seen == {"numpy": True, "transforms": True, "finders_left": []}
