"""The Slicer module: its files (.ui, CMake install, metadata) and ``RefSAM3D/RefSAM3D.py`` itself,
imported and run on real slicer-core MRML (conftest's ``refsam3d_module``: generic stand-ins only
for the Qt/CTK layer slicer-core lacks)."""

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
    qt_classes = {"QLabel", "QPlainTextEdit", "QTextEdit", "QComboBox", "QPushButton", "QDoubleSpinBox", "QCheckBox",
                  "QProgressBar", "QWidget"}
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
    assert arguments[:6] == ["self", "inputVolumeNode", "prompts", "outputSegmentationNode", "options", "progressCallback"]


def test_logic_never_touches_widgets():
    tree = ast.parse(_module_source())
    logic = next(node for node in tree.body if isinstance(node, ast.ClassDef) and node.name == "RefSAM3DLogic")
    text = ast.unparse(logic)
    assert "self.ui" not in text and "qt.QWidget" not in text


def test_help_says_not_for_clinical_use():
    assert "Not for clinical use" in _module_source()


def test_the_module_keeps_no_list_of_requirements_of_its_own():
    """The requirements exist once, in pyproject.toml (install_plan reads them)."""
    source = _module_source()
    assert "REQUIREMENTS" not in source and "pip_install(" not in source
    assert not re.search(r"[\"'](monai|safetensors|open-clip-torch|scipy)[=<>]", source)


def test_parameter_node_wrapper_fields_match_the_ui():
    """Every widget the .ui binds (SlicerParameterName) names a field of RefSAM3DParameterNode."""
    tree = ast.parse(_module_source())
    wrapper = next(node for node in tree.body if isinstance(node, ast.ClassDef) and node.name == "RefSAM3DParameterNode")
    assert any(ast.unparse(d) == "parameterNodeWrapper" for d in wrapper.decorator_list)
    fields = {node.target.id for node in wrapper.body if isinstance(node, ast.AnnAssign)}
    bound = {prop.findtext("string") for prop in ET.parse(UI).getroot().iter("property")
             if prop.get("name") == "SlicerParameterName"}
    assert bound and bound <= fields, bound - fields
    assert {"inputVolume", "outputSegmentation", "prompt", "overlap"} <= bound


def test_user_visible_strings_are_translatable():
    """No bare string literal reaches a label, tooltip or dialog: texts go through ``_()``/``translate``."""
    source = _module_source()
    assert "from slicer.i18n import tr as _" in source and "translate(" in source
    tree = ast.parse(source)
    bare = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Attribute) and t.attr in ("text", "toolTip", "title",
                                                                                          "helpText", "acknowledgementText")
                                                for t in node.targets):
            value = node.value
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in (
                "errorDisplay", "confirmOkCancelDisplay", "delayDisplay", "warningDisplay", "infoDisplay") and node.args:
            value = node.args[0]
        else:
            continue
        if isinstance(value, (ast.Constant, ast.JoinedStr)) and not (isinstance(value, ast.Constant) and value.value in ("", None)):
            bare.append(ast.unparse(node)[:90])
    # The self-test's per-structure Dice lines are test output, not panel text.
    bare = [line for line in bare if "Dice {dice" not in line]
    assert not bare, bare


def test_no_placeholder_urls_and_a_licence_file():
    """Homepage, icon and screenshot URLs that pointed nowhere are gone (no public repository yet)."""
    for path in (MODULE, ROOT / "CMakeLists.txt"):
        text = path.read_text(encoding="utf-8")
        assert "github.com/refsam3d" not in text and "raw.githubusercontent.com/refsam3d" not in text, path
    assert "Apache License" in (ROOT / "LICENSE").read_text()[:200]


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
    assert sorted(python_files + data_files) == sorted(on_disk + ["pyproject.toml"])
    assert all(name.endswith(".py") for name in python_files)
    assert "Resources/UI/RefSAM3D.ui" in data_files and "Resources/Icons/RefSAM3D.png" in data_files
    assert "RefSAM3DLib/mrml.py" in python_files and "RefSAM3DLib/cli.py" in python_files
    assert "RefSAM3DLib/terminology/SegmentationCategoryTypeModifier-RefSAM3D.term.json" in data_files


def test_cmake_builds_the_scripted_module_with_extension_metadata():
    module_cmake = (ROOT / "RefSAM3D" / "CMakeLists.txt").read_text()
    call = re.search(r"slicerMacroBuildScriptedModule\((.*?)\)", module_cmake, re.S).group(1)
    assert "WITH_GENERIC_TESTS" in call and "${MODULE_PYTHON_SCRIPTS}" in call
    assert re.search(r"set\(MODULE_PYTHON_SCRIPTS\s+\$\{MODULE_NAME\}\.py", module_cmake)
    top = (ROOT / "CMakeLists.txt").read_text()
    assert 'set(EXTENSION_CATEGORY "Segmentation")' in top
    assert 'set(EXTENSION_DEPENDS "PyTorch")' in top
    assert re.search(r"add_subdirectory\(RefSAM3D\)", top)
    for field in ("EXTENSION_CONTRIBUTORS", "EXTENSION_DESCRIPTION"):
        assert re.search(rf'set\({field} "[^"]+"\)', top), f"{field} is empty"
    for field in ("EXTENSION_HOMEPAGE", "EXTENSION_ICONURL", "EXTENSION_SCREENSHOTURLS"):  # set when published
        assert re.search(rf'set\({field} "(https://[^"]+)?"\)', top), f"{field} is not an https URL"


def test_icons_are_128_pixel_pngs():
    from PIL import Image

    for path in (ROOT / "RefSAM3D.png", ROOT / "Resources" / "Icons" / "RefSAM3D.png"):
        with Image.open(path) as icon:
            assert icon.format == "PNG" and icon.size == (128, 128)


def test_logic_reads_prompts_with_the_vocabulary_alone(refsam3d_module):
    """The panel, the Logic and the CLI read prompt text one way: a sentence with a comma is one
    structure, a repeat is kept once, an empty prompt is refused."""
    from RefSAM3DLib.errors import RefSAM3DError
    from RefSAM3DLib.vocabulary import lookup

    logic = refsam3d_module.RefSAM3DLogic
    read = [p.structure.key if p.structure else None for p in logic.readPrompts("CT images, liver segmentation")]
    assert read == ["liver"]
    assert [p.structure.key for p in logic.readPrompts("liver\nliver")] == ["liver"]
    assert [p.structure.key for p in logic.readPrompts(["liver, spleen", "hepatic", "kidneys"])] == [
        "liver", "spleen", "kidney_right", "kidney_left"]
    with pytest.raises(RefSAM3DError):
        logic.readPrompts(" \n ")
    summary = logic.modelSummary()
    assert summary.trained_on("liver") and not summary.trained_on("vertebrae_L1")
    assert summary.rows()[0][0] in (lookup("liver").name, lookup("kidney_right").name)  # best scored first
    held_out = summary.held_out_dice  # the bundled model's metadata, written from its evaluation reports
    assert summary.scores("liver") == f"CT {held_out['CT']['liver']:.2f}, MR {held_out['MR']['liver']:.2f}"


PROBES = {
    "cuda": ('{"torch": "2.9.0+cu128", "cuda": true, "name": "Tiny GPU", "free_gb": 1.5, "total_gb": 2.0, "mps": false, '
             '"engine_devices": ["auto", "cpu", "cuda"]}'),
    "no torch": '{"torch": null}',
    "broken torch": '{"torch_error": "OSError: [WinError 126] c10.dll not found"}',
    "mps": '{"torch": "2.9.0", "cuda": false, "mps": true, "engine_devices": ["auto", "cpu", "cuda", "mps"]}',
    "mps, older engine": '{"torch": "2.9.0", "cuda": false, "mps": true, "engine_devices": ["auto", "cpu", "cuda"]}',
    "cuda query fails": '{"torch": "2.9.0", "cuda_error": "RuntimeError: driver too old", "mps": false}',
    "packages missing": '{"torch": "2.9.0", "cuda": false, "mps": false, "engine_error": "ModuleNotFoundError: No module named \'monai\'"}',
}


@pytest.mark.parametrize("case", list(PROBES))
def test_device_probe_is_reported_as_what_it_found(refsam3d_module, case):
    text, warning, devices = refsam3d_module.RefSAM3DLogic.describeDevice(PROBES[case])
    assert devices[0] == "auto" and "cpu" in devices
    if case == "cuda":
        assert "Tiny GPU" in text and "1.5" in text and "GPU memory" in warning and "cuda" in devices
    elif case == "no torch":
        assert "not installed" in text and devices == ["auto", "cpu"]
    elif case == "broken torch":
        assert "could not be loaded" in text and "c10.dll" in text and "not installed" not in text
    elif case == "mps":
        assert "Apple GPU" in text and "mps" in devices and not warning
    elif case == "mps, older engine":
        assert "mps" not in devices and "Apple GPU" in warning
    elif case == "cuda query fails":
        assert "driver too old" in warning and "cuda" not in devices
    elif case == "packages missing":
        assert "monai" in warning and "No GPU" in text


def test_the_logic_runs_end_to_end_on_slicer_core(refsam3d_module, slicer_app, samples_dir, tmp_path, terminology_problem):
    """The issue's test: RefSAM3D.py's own Logic on real slicer-core MRML. One prompt, "CT images,
    spleen segmentation", on a sample CT gives exactly one segment, the spleen, whose terminology
    Slicer resolves and which lies on the volume's voxel grid (bundled model, a small crop)."""
    import numpy as np
    import SimpleITK as sitk
    import slicer
    import vtk

    from RefSAM3DLib import mrml
    from RefSAM3DLib.run_options import RunOptions
    from RefSAM3DLib.vocabulary import lookup

    image = sitk.ReadImage(str(samples_dir / "msd_spleen_2_crop_image.nii.gz"))
    sitk.WriteImage(image[30:130, 40:140, :], str(tmp_path / "ct.nrrd"))
    (volume_node,) = slicer_app.io_manager.load_volumes(str(tmp_path / "ct.nrrd"))
    # As Slicer's DICOM plugin leaves a CT series: patient > study > the volume's item carrying the modality.
    hierarchy = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(slicer_app.scene)
    study = hierarchy.CreateStudyItem(hierarchy.CreateSubjectItem(hierarchy.GetSceneItemID(), "Patient"), "Study")
    hierarchy.SetItemAttribute(hierarchy.CreateItem(study, volume_node), "DICOM.Modality", "CT")
    logic = refsam3d_module.RefSAM3DLogic()
    logic.loadTerminology(slicer_app.terminologies_logic)
    lines, fractions = [], []
    logic.logCallback = lines.append

    segmentation_node = logic.process(volume_node, "CT images, spleen segmentation", options=RunOptions(device="cpu"),
                                      progressCallback=lambda fraction, message: fractions.append(fraction))

    segmentation = segmentation_node.GetSegmentation()
    assert segmentation.GetNumberOfSegments() == 1
    segment = segmentation.GetNthSegment(0)
    assert segment.GetName() == lookup("spleen").name
    entry, key = vtk.reference(""), vtk.reference("")
    assert segment.GetTag("TerminologyEntry", entry) and segment.GetTag("RefSAM3D.StructureKey", key)
    assert str(key) == "spleen" and terminology_problem(str(entry)) == ""
    assert any("(CT)" in line for line in lines), "the DICOM modality reached the worker"
    assert fractions and fractions == sorted(fractions)
    # On the volume's grid: the segment's voxels are the volume's voxels, under the same transform.
    assert segmentation_node.GetTransformNodeID() == volume_node.GetTransformNodeID()
    labelmap = slicer.vtkOrientedImageData()
    segmentation_node.GetBinaryLabelmapRepresentation(segmentation.GetNthSegmentID(0), labelmap)
    image_to_world, ijk_to_ras = vtk.vtkMatrix4x4(), vtk.vtkMatrix4x4()
    labelmap.GetImageToWorldMatrix(image_to_world)
    volume_node.GetIJKToRASMatrix(ijk_to_ras)
    np.testing.assert_allclose(slicer.util.arrayFromVTKMatrix(image_to_world), slicer.util.arrayFromVTKMatrix(ijk_to_ras), atol=1e-6)
    extent, dimensions = labelmap.GetExtent(), volume_node.GetImageData().GetDimensions()
    assert all(0 <= extent[2 * axis] and extent[2 * axis + 1] < dimensions[axis] for axis in range(3))
    mask = mrml.segmentation_node_to_labelmap_array(segmentation_node, volume_node, [segmentation.GetNthSegmentID(0)])
    assert mask.shape == slicer.util.arrayFromVolume(volume_node).shape
    assert mask.any(), "the bundled model finds some spleen in a crop centred on it"
    assert [name for name, _ in logic.lastVolumesMl] == [segment.GetName()]
    spacing = np.prod(volume_node.GetSpacing())
    assert logic.lastVolumesMl[0][1] == pytest.approx(mask.sum() * spacing / 1000.0, rel=1e-6)

    assert logic.undoLastRun()
    assert segmentation_node.GetScene() is None, "undo removes the segmentation the run created"
    logic.closeSession()


def test_markups_refine_a_segment_from_the_warm_worker_and_undo_puts_it_back(refsam3d_module, slicer_app, samples_dir,
                                                                                 tmp_path):
    """Issue 10's Slicer gesture: a text run, then an ROI (box) and an outside point placed as
    markups refine the selected segment in place from the cached features (no new encoding); Undo
    restores the previous mask voxel for voxel."""
    import numpy as np
    import SimpleITK as sitk
    import slicer
    import vtk

    from RefSAM3DLib import mrml
    from RefSAM3DLib.run_options import RunOptions

    image = sitk.ReadImage(str(samples_dir / "msd_spleen_2_crop_image.nii.gz"))
    sitk.WriteImage(image[30:130, 40:140, :], str(tmp_path / "ct.nrrd"))
    (volume_node,) = slicer_app.io_manager.load_volumes(str(tmp_path / "ct.nrrd"))
    logic = refsam3d_module.RefSAM3DLogic()
    options = RunOptions(device="cpu")
    try:
        segmentation_node = logic.process(volume_node, "spleen", options=options)
        segment_id = segmentation_node.GetSegmentation().GetNthSegmentID(0)
        before = mrml.segmentation_node_to_labelmap_array(segmentation_node, volume_node, [segment_id])
        assert before.any()
        # A box over the middle third of the mask's extent (slices k), so that the text's mask reaches beyond it.
        ijk_to_ras = vtk.vtkMatrix4x4()
        volume_node.GetIJKToRASMatrix(ijk_to_ras)
        ijk_to_ras = slicer.util.arrayFromVTKMatrix(ijk_to_ras)
        kji = np.argwhere(before)
        low, high = kji.min(axis=0), kji.max(axis=0)
        third = (high[0] - low[0]) // 3
        corners_kji = np.array([[low[0] + third, low[1], low[2]], [high[0] - third, high[1], high[2]]])
        corners_ras = (ijk_to_ras @ np.c_[corners_kji[:, ::-1], np.ones(2)].T).T[:, :3]
        roi = slicer_app.scene.AddNewNodeByClass("vtkMRMLMarkupsROINode")
        roi.SetXYZ(*corners_ras.mean(axis=0))
        roi.SetRadiusXYZ(*(np.abs(corners_ras[1] - corners_ras[0]) / 2))
        outside = slicer_app.scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode")
        outside.AddControlPoint(vtk.vtkVector3d(*(ijk_to_ras @ np.r_[low[::-1], 1.0])[:3]))
        box = mrml.roi_box_ras(roi)
        np.testing.assert_allclose(np.sort([box[0], box[3]]), np.sort(corners_ras[:, 0]), atol=1e-6)

        logic.refine(volume_node, segmentation_node, segment_id, negativePoints=mrml.control_points_ras(outside),
                     boxRas=box, options=options)

        segmentation = segmentation_node.GetSegmentation()
        assert segmentation.GetNumberOfSegments() == 1 and segmentation.GetNthSegmentID(0) == segment_id
        assert segmentation.GetSegment(segment_id).GetName() == "Spleen"
        after = mrml.segmentation_node_to_labelmap_array(segmentation_node, volume_node, [segment_id])
        assert after.any() and not np.array_equal(after, before)
        k = np.argwhere(after)[:, 0]
        grow = max(0.1 * (2 * third), 2 * 3.0 / volume_node.GetSpacing()[2]) + 1  # the box's margin, in slices
        assert low[0] + third - grow <= k.min() and k.max() <= high[0] - third + grow, "the box bounds the mask"
        assert logic.session.ready is not None
        assert logic.undoLastRun()
        np.testing.assert_array_equal(mrml.segmentation_node_to_labelmap_array(segmentation_node, volume_node, [segment_id]),
                                      before)
        assert not logic.undoLastRun(), "one level of undo"
    finally:
        logic.closeSession()


def test_logic_process_matches_the_cli_voxel_for_voxel(refsam3d_module, slicer_app, tmp_path):
    """Batch use of RefSAM3DLogic.process (no widget): the segmentation node it builds equals, voxel
    for voxel, the .seg.nrrd that ``refsam3d segment`` writes for the same file and prompts."""
    import numpy as np
    import SimpleITK as sitk
    import torch

    from RefSAM3DLib import mrml
    from RefSAM3DLib.checkpoint import save_checkpoint
    from RefSAM3DLib.cli import main
    from RefSAM3DLib.inference import segment
    from RefSAM3DLib.model.build import build_model
    from RefSAM3DLib.result_files import read_seg_nrrd
    from RefSAM3DLib.run_options import RunOptions
    from RefSAM3DLib.vocabulary import lookup
    from RefSAM3DLib.volume_reader import read_volume

    image = sitk.ReadImage(str(ROOT / "RefSAM3DLib" / "samples" / "ts_example_ct_image.nii.gz"))
    input_path = tmp_path / "crop.nrrd"
    sitk.WriteImage(image[40:88, 30:78, 40:72], str(input_path))
    # An untrained network answers "everything" or "nothing"; centring its output logits on this
    # image gives masks with real borders, so that any misplaced voxel would show.
    torch.manual_seed(0)
    model = build_model("small").eval()
    logits = []
    hook = model.mask_decoder.register_forward_hook(lambda module, inputs, output: logits.append(output.detach()))
    segment(read_volume(input_path), ["liver"], model=model, options=RunOptions(device="cpu"))
    hook.remove()
    with torch.no_grad():
        model.mask_decoder.out_conv.bias -= torch.cat([x.flatten() for x in logits]).median()
    model_dir = tmp_path / "untrained-small"
    save_checkpoint(model, model_dir, {"name": "untrained-small", "version": "test"})
    (node,) = slicer_app.io_manager.load_volumes(str(input_path))

    fractions = []
    logic = refsam3d_module.RefSAM3DLogic()
    segmentation_node = logic.process(node, "liver, spleen", options=RunOptions(device="cpu", model=str(model_dir)),
                                      progressCallback=lambda fraction, message: fractions.append(fraction))
    logic.closeSession()

    assert main(["segment", str(input_path), "--prompt", "liver", "--prompt", "spleen", "--output",
                 str(tmp_path / "cli.seg.nrrd"), "--device", "cpu", "--model", str(model_dir)]) == 0
    cli_result = read_seg_nrrd(tmp_path / "cli.seg.nrrd", reference=read_volume(input_path))
    segmentation = segmentation_node.GetSegmentation()
    names = [segmentation.GetNthSegment(n).GetName() for n in range(segmentation.GetNumberOfSegments())]
    assert names == [lookup("liver").name, lookup("spleen").name]
    assert fractions and fractions == sorted(fractions)
    assert [name for name, _ in logic.lastVolumesMl] == names
    for n, expected in enumerate(cli_result.segments):
        exported = mrml.segmentation_node_to_labelmap_array(segmentation_node, node, [segmentation.GetNthSegmentID(n)])
        assert 0.05 < expected.mask.mean() < 0.95, "the comparison needs masks with borders"
        assert np.array_equal(exported, expected.mask), f"{names[n]} differs from the CLI's output"


def test_self_test_skips_cleanly_without_the_worker_packages(refsam3d_module, monkeypatch):
    """Where Slicer's extension builds run the self-test, the packages are absent: it is skipped
    (unittest's skip), not failed; in the application it says so and returns."""
    import unittest

    from RefSAM3DLib.install_plan import InstallPlan

    monkeypatch.setattr(refsam3d_module.RefSAM3DLogic, "installPlan",
                        lambda self: InstallPlan(pip_requirements=("monai>=1.3",)))
    test = refsam3d_module.RefSAM3DTest()
    assert "monai" in test.skipReason()
    monkeypatch.setattr(test, "setUp", lambda: None)
    app = type("App", (), {"testingEnabled": staticmethod(lambda: True)})()
    monkeypatch.setattr(refsam3d_module.slicer, "app", app, raising=False)
    with pytest.raises(unittest.SkipTest, match="monai"):
        test.runTest()
