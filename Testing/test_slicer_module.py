"""The Slicer module's files, checked without Slicer: the .ui, the module code and the CMake install."""

from __future__ import annotations

import ast
import py_compile
import re
import shutil
import subprocess
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MODULE = ROOT / "RefSAM3D" / "RefSAM3D.py"
UI = ROOT / "Resources" / "UI" / "RefSAM3D.ui"


def _ui_widgets() -> dict[str, str]:
    """Widget name -> class of every widget in the .ui."""
    root = ET.parse(UI).getroot()
    return {widget.get("name"): widget.get("class") for widget in root.iter("widget")}


def _module_source() -> str:
    return MODULE.read_text(encoding="utf-8")


def test_ui_is_qt_designer_xml_with_a_mrml_top_widget():
    root = ET.parse(UI).getroot()
    assert root.tag == "ui" and root.get("version") == "4.0"
    top = root.find("widget")
    assert top.get("class") == "qMRMLWidget" and root.findtext("class") == top.get("name")
    declared = {custom.findtext("class") for custom in root.iter("customwidget")}
    qt_classes = {"QLabel", "QPlainTextEdit", "QComboBox", "QPushButton", "QDoubleSpinBox", "QCheckBox",
                  "QProgressBar", "QTableWidget", "QWidget"}
    for name, cls in _ui_widgets().items():
        assert cls in qt_classes or cls in declared, f"{name}: class {cls} is neither Qt's nor declared as a custom widget"
    names = list(_ui_widgets())
    assert len(names) == len(set(names)), "widget names must be unique"


def test_every_widget_the_module_uses_exists_in_the_ui():
    used = set(re.findall(r"self\.ui\.([A-Za-z_][A-Za-z0-9_]*)", _module_source()))
    assert len(used) >= 15  # the panel really is built from the .ui
    missing = sorted(used - set(_ui_widgets()))
    assert not missing, f"RefSAM3D.py uses widgets missing from RefSAM3D.ui: {missing}"


def test_ui_connections_name_existing_widgets():
    root = ET.parse(UI).getroot()
    widgets = set(_ui_widgets())
    for connection in root.iter("connection"):
        assert connection.findtext("sender") in widgets
        assert connection.findtext("receiver") in widgets


def test_module_compiles_and_has_the_four_slicer_classes(tmp_path):
    py_compile.compile(str(MODULE), cfile=str(tmp_path / "RefSAM3D.pyc"), doraise=True)
    tree = ast.parse(_module_source())
    classes = {node.name: [ast.unparse(base) for base in node.bases] for node in tree.body if isinstance(node, ast.ClassDef)}
    assert "ScriptedLoadableModule" in classes["RefSAM3D"]
    assert "ScriptedLoadableModuleWidget" in classes["RefSAM3DWidget"]
    assert "ScriptedLoadableModuleLogic" in classes["RefSAM3DLogic"]
    assert "ScriptedLoadableModuleTest" in classes["RefSAM3DTest"]
    logic = next(node for node in tree.body if isinstance(node, ast.ClassDef) and node.name == "RefSAM3DLogic")
    process = next(node for node in logic.body if isinstance(node, ast.FunctionDef) and node.name == "process")
    arguments = [arg.arg for arg in process.args.args]
    assert arguments[:6] == ["self", "inputVolumeNode", "prompts", "outputSegmentationNode", "device", "progressCallback"]


def test_logic_never_touches_widgets():
    tree = ast.parse(_module_source())
    logic = next(node for node in tree.body if isinstance(node, ast.ClassDef) and node.name == "RefSAM3DLogic")
    text = ast.unparse(logic)
    assert "self.ui" not in text and "qt.QWidget" not in text


def test_help_says_not_for_clinical_use():
    assert "Not for clinical use" in _module_source()


def test_pinned_requirements_skip_what_slicer_ships():
    tree = ast.parse(_module_source())
    assignment = next(node for node in tree.body if isinstance(node, ast.Assign) and
                      any(getattr(target, "id", "") == "REQUIREMENTS" for target in node.targets))
    requirements = ast.literal_eval(assignment.value)
    for module, requirement in requirements:
        assert re.fullmatch(r"[A-Za-z0-9_.\-]+==[0-9][A-Za-z0-9.]*", requirement), f"{requirement} is not pinned"
        assert module not in ("numpy", "SimpleITK", "torch", "torchvision"), f"{module} must come from Slicer / PyTorch extension"


def _cmake_lists(tmp_path) -> tuple[list[str], list[str]]:
    """The file lists RefSAM3D/CMakeLists.txt computes, evaluated by cmake itself (script mode)."""
    script = tmp_path / "list_files.cmake"
    script.write_text(
        f'include("{(ROOT / "RefSAM3D" / "CMakeLists.txt").as_posix()}")\n'
        'message(STATUS "PY=${REFSAM3D_PYTHON_FILES}")\nmessage(STATUS "DATA=${REFSAM3D_DATA_FILES}")\n'
    )
    listing = subprocess.run(["cmake", "-P", str(script)], capture_output=True, text=True, check=True).stdout
    python_files = re.search(r"PY=(.*)", listing).group(1).split(";")
    data_files = re.search(r"DATA=(.*)", listing).group(1).split(";")
    return python_files, data_files


@pytest.mark.skipif(shutil.which("cmake") is None, reason="needs cmake to evaluate the CMakeLists")
def test_cmake_installs_every_library_and_resource_file(tmp_path):
    python_files, data_files = _cmake_lists(tmp_path)
    on_disk = sorted(
        path.relative_to(ROOT).as_posix()
        for folder in ("RefSAM3DLib", "Resources")
        for path in (ROOT / folder).rglob("*")
        if path.is_file() and "__pycache__" not in path.parts and path.suffix != ".pyc"
    )
    assert sorted(python_files + data_files) == on_disk
    assert all(name.endswith(".py") for name in python_files)
    assert "Resources/UI/RefSAM3D.ui" in data_files and "Resources/Icons/RefSAM3D.png" in data_files
    assert "RefSAM3DLib/mrml.py" in python_files and "RefSAM3DLib/cli.py" in python_files


def test_cmake_builds_the_scripted_module_with_extension_metadata():
    module_cmake = (ROOT / "RefSAM3D" / "CMakeLists.txt").read_text()
    call = re.search(r"slicerMacroBuildScriptedModule\((.*?)\)", module_cmake, re.S).group(1)
    assert "WITH_GENERIC_TESTS" in call and "${MODULE_PYTHON_SCRIPTS}" in call
    assert re.search(r"set\(MODULE_PYTHON_SCRIPTS\s+\$\{MODULE_NAME\}\.py", module_cmake)
    top = (ROOT / "CMakeLists.txt").read_text()
    assert 'set(EXTENSION_CATEGORY "Segmentation")' in top
    assert 'set(EXTENSION_DEPENDS "PyTorch")' in top
    assert re.search(r"add_subdirectory\(RefSAM3D\)", top)
    for field in ("EXTENSION_HOMEPAGE", "EXTENSION_CONTRIBUTORS", "EXTENSION_DESCRIPTION", "EXTENSION_ICONURL",
                  "EXTENSION_SCREENSHOTURLS"):
        assert re.search(rf'set\({field} "[^"]+"\)', top), f"{field} is empty"


def test_icons_are_128_pixel_pngs():
    from PIL import Image

    for path in (ROOT / "RefSAM3D.png", ROOT / "Resources" / "Icons" / "RefSAM3D.png"):
        with Image.open(path) as icon:
            assert icon.format == "PNG" and icon.size == (128, 128)


@pytest.fixture
def module_file(monkeypatch):
    """RefSAM3D.py imported outside the Slicer application.

    Slicer's GUI layer (``qt``, ``slicer.ScriptedLoadableModule``) does not exist in slicer-core,
    so those two imports get empty stand-ins; the logic only uses the MRML scene, slicer.util and
    our library, all real here.
    """
    import importlib.util
    import sys
    import types

    import slicer

    gui = types.ModuleType("slicer.ScriptedLoadableModule")
    for name in ("ScriptedLoadableModule", "ScriptedLoadableModuleLogic", "ScriptedLoadableModuleTest",
                 "ScriptedLoadableModuleWidget"):
        setattr(gui, name, type(name, (), {"__init__": lambda self, *args: None}))
    monkeypatch.setitem(sys.modules, "slicer.ScriptedLoadableModule", gui)
    monkeypatch.setitem(sys.modules, "qt", types.ModuleType("qt"))
    monkeypatch.setattr(slicer, "ScriptedLoadableModule", gui, raising=False)
    spec = importlib.util.spec_from_file_location("RefSAM3D", MODULE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_logic_splits_prompts_suggests_structures_and_describes_the_device(module_file):
    from RefSAM3DLib.vocabulary import lookup

    logic = module_file.RefSAM3DLogic
    assert logic.splitPrompts("liver, spleen\n  perform left kidney segmentation;;\n") == [
        "liver", "spleen", "perform left kidney segmentation"]
    assert logic.splitPrompts(["aorta", " "]) == ["aorta"]
    assert lookup("liver").name in logic.structureNames()
    text, warning = logic.describeDevice('{"cuda": true, "name": "Tiny GPU", "free_gb": 1.5, "total_gb": 2.0}')
    assert "Tiny GPU" in text and "1.5" in text and "GPU memory" in warning
    assert logic.describeDevice('{"cuda": false}')[0].startswith("No CUDA GPU")


def test_logic_process_matches_the_cli_voxel_for_voxel(module_file, tmp_path):
    """Batch use of RefSAM3DLogic.process (no widget): the segmentation node it builds equals, voxel
    for voxel, the .seg.nrrd that ``refsam3d segment`` writes for the same file and prompts."""
    import numpy as np
    import SimpleITK as sitk
    import torch
    from trame_slicer.core import SlicerApp

    from RefSAM3DLib import io, mrml
    from RefSAM3DLib.checkpoint import save_checkpoint
    from RefSAM3DLib.cli import main
    from RefSAM3DLib.inference import segment
    from RefSAM3DLib.model.build import build_model
    from RefSAM3DLib.vocabulary import lookup

    image = sitk.ReadImage(str(ROOT / "RefSAM3DLib" / "samples" / "ts_example_ct_image.nii.gz"))
    input_path = tmp_path / "crop.nrrd"
    sitk.WriteImage(image[40:88, 30:78, 40:72], str(input_path))
    # An untrained network answers "everything" or "nothing"; centring its output logits on this
    # image gives masks with real borders, so that any misplaced voxel would show.
    torch.manual_seed(0)
    model = build_model("small").eval()
    logits = []
    hook = model.mask_decoder.register_forward_hook(lambda module, inputs, output: logits.append(output.detach()))
    segment(io.read_volume(input_path), ["liver"], model=model, device="cpu")
    hook.remove()
    with torch.no_grad():
        model.mask_decoder.out_conv.bias -= torch.cat([x.flatten() for x in logits]).median()
    model_dir = tmp_path / "untrained-small"
    save_checkpoint(model, model_dir, {"name": "untrained-small", "version": "test"})
    app = SlicerApp()
    (node,) = app.io_manager.load_volumes(str(input_path))

    fractions = []
    logic = module_file.RefSAM3DLogic()
    segmentation_node = logic.process(node, "liver, spleen", device="cpu", model=str(model_dir),
                                      progressCallback=lambda fraction, message: fractions.append(fraction))

    assert main(["segment", str(input_path), "--prompt", "liver", "--prompt", "spleen", "--output",
                 str(tmp_path / "cli.seg.nrrd"), "--device", "cpu", "--model", str(model_dir)]) == 0
    cli_result = io.read_seg_nrrd(tmp_path / "cli.seg.nrrd", reference=io.read_volume(input_path))
    segmentation = segmentation_node.GetSegmentation()
    names = [segmentation.GetNthSegment(n).GetName() for n in range(segmentation.GetNumberOfSegments())]
    assert names == [lookup("liver").name, lookup("spleen").name]
    assert fractions and fractions == sorted(fractions)
    assert [name for name, _ in logic.lastVolumesMl] == names
    for n, expected in enumerate(cli_result.segments):
        exported = mrml.segmentation_node_to_labelmap_array(segmentation_node, node, [segmentation.GetNthSegmentID(n)])
        assert 0.05 < expected.mask.mean() < 0.95, "the comparison needs masks with borders"
        assert np.array_equal(exported, expected.mask), f"{names[n]} differs from the CLI's output"
