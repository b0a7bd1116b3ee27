"""Fixtures shared by the test files: the bundled samples and data made from them."""

from __future__ import annotations

from pathlib import Path

import pytest
import SimpleITK as sitk

SAMPLES_DIR = Path(__file__).resolve().parent.parent / "RefSAM3DLib" / "samples"


@pytest.fixture(scope="session")
def samples_dir() -> Path:
    """The bundled sample cases (``<case>_image.nii.gz`` + ``<case>_label.nii.gz``)."""
    return SAMPLES_DIR


@pytest.fixture(scope="session")
def make_dicom_series():
    """Write a 3D SimpleITK image as a DICOM series: ``make(image, folder, series_uid) -> folder``.

    One file per slice with the position, orientation and spacing tags a series reader needs
    (SimpleITK's own recipe for writing series); pixel values stay as they are (int16).
    """

    def make(image: sitk.Image, folder: Path, series_uid: str = "1.2.826.0.1.3680043.2.1125.1",
             modality: str = "CT") -> Path:
        folder.mkdir(parents=True, exist_ok=True)
        direction = image.GetDirection()
        orientation = "\\".join(f"{v:.10f}" for v in direction[0:7:3] + direction[1:8:3])
        writer = sitk.ImageFileWriter()
        writer.KeepOriginalImageUIDOn()
        for k in range(image.GetDepth()):
            slice_image = image[:, :, k]
            position = image.TransformIndexToPhysicalPoint((0, 0, k))
            tags = {
                "0008|0060": modality,
                "0008|0016": "1.2.840.10008.5.1.4.1.1.2",
                "0008|0018": f"{series_uid}.{k + 1}",
                "0020|000d": f"{series_uid}.0",
                "0020|000e": series_uid,
                "0020|0013": str(k + 1),
                "0020|0032": "\\".join(f"{v:.10f}" for v in position),
                "0020|0037": orientation,
                "0018|0050": f"{image.GetSpacing()[2]:.10f}",
            }
            for tag, value in tags.items():
                slice_image.SetMetaData(tag, value)
            writer.SetFileName(str(folder / f"slice{k:04d}.dcm"))
            writer.Execute(slice_image)
        return folder

    return make


@pytest.fixture(scope="session")
def tiny_sam_config():
    """The vit_b architecture (SAM-initialised, CLIP text) at toy size: 32^3 window, width 32, 4 blocks."""
    import dataclasses

    from RefSAM3DLib.model import MODEL_CONFIGS

    return dataclasses.replace(
        MODEL_CONFIGS["vit_b"], name="tiny_sam", window_size_vox=32, patch_size=8, embed_dim=32, depth=4,
        num_heads=2, attn_window_tok=2, global_attn_indexes=(1, 3), stage_indexes=(0, 1, 2, 3),
        adapter_dim=8, neck_dim=16, upsample_channels=(16, 8, 8), text_dim=32, text_context_length=16,
        decoder_heads=2, decoder_mlp_dim=32, fusion_channels=4,
        clip_text=dict(width=32, heads=2, layers=1, vocab_size=49408, output_dim=32),
    )


@pytest.fixture(scope="session")
def tiny_sam_files(tmp_path_factory):
    """A toy SAM (segment_anything's own classes, random weights) saved with torch.save, and a toy
    open_clip text tower saved as safetensors: ``(sam_path, clip_path, sam_state_dict)``.
    The SAM matches ``tiny_sam_config``: width 32, patch 8, 4 blocks, global blocks 1 and 3."""
    from functools import partial

    import torch
    from safetensors.torch import save_file
    from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, Sam, TwoWayTransformer

    from RefSAM3DLib.model.text_encoder import ClipTextEncoder

    torch.manual_seed(0)
    encoder = ImageEncoderViT(
        img_size=64, patch_size=8, embed_dim=32, depth=4, num_heads=2, mlp_ratio=4, out_chans=16,
        qkv_bias=True, norm_layer=partial(torch.nn.LayerNorm, eps=1e-6), use_rel_pos=True,
        global_attn_indexes=(1, 3), window_size=3,
    )
    sam = Sam(
        image_encoder=encoder,
        prompt_encoder=PromptEncoder(embed_dim=16, image_embedding_size=(8, 8), input_image_size=(64, 64), mask_in_chans=4),
        mask_decoder=MaskDecoder(num_multimask_outputs=3, transformer_dim=16,
                                 transformer=TwoWayTransformer(depth=1, embedding_dim=16, mlp_dim=32, num_heads=2)),
    )
    with torch.no_grad():
        for param in sam.parameters():  # non-trivial values everywhere (SAM zero-inits rel-pos tables)
            param.normal_(0.0, 0.1)
    folder = tmp_path_factory.mktemp("tiny_base_weights")
    sam_path = folder / "tiny_sam.pth"
    torch.save(sam.state_dict(), sam_path)
    clip = ClipTextEncoder(width=32, heads=2, layers=1, vocab_size=49408, output_dim=32, context_length=16)
    clip_path = folder / "tiny_clip.safetensors"
    save_file({k: v.contiguous() for k, v in clip.tower.state_dict().items()}, str(clip_path))
    return sam_path, clip_path, sam


@pytest.fixture(scope="session")
def untrained_model_dir(tmp_path_factory):
    """An untrained small model saved as a checkpoint folder: real code path, no bundled weights."""
    import torch

    from RefSAM3DLib.checkpoint import save_checkpoint
    from RefSAM3DLib.model.build import build_model

    torch.manual_seed(0)
    directory = tmp_path_factory.mktemp("model") / "untrained-small"
    save_checkpoint(build_model("small"), directory, {"name": "untrained-small", "version": "test"})
    return directory


# ---- Slicer's GUI layer, stood in for slicer-core ------------------------------------------------


class _AnyGuiObject:
    """A stand-in for any Qt/CTK class or object: every call, attribute and item gives another
    stand-in. Only RefSAM3D's widget and module metadata touch these; its Logic must not."""

    def __init__(self, *args, **kwargs):
        pass

    def __call__(self, *args, **kwargs):
        return _AnyGuiObject()

    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return _AnyGuiObject()

    def __iter__(self):
        return iter(())

    def __bool__(self):
        return False


def _gui_module(name: str):
    """A module whose every public name is :class:`_AnyGuiObject` (``qt.QTimer``, ``ctk.ctkPathLineEdit``, ...)."""
    import types

    def any_class(attribute: str):
        if attribute.startswith("__"):  # module machinery (__file__, __path__) stays absent
            raise AttributeError(attribute)
        return _AnyGuiObject

    module = types.ModuleType(name)
    module.__getattr__ = any_class
    return module


def _scripted_loadable_module():
    """``slicer.ScriptedLoadableModule``'s four base classes, as small as RefSAM3D.py needs."""
    import types
    import unittest

    module = types.ModuleType("slicer.ScriptedLoadableModule")

    class ScriptedLoadableModule:
        def __init__(self, parent):
            self.parent = parent

    class ScriptedLoadableModuleLogic:
        def __init__(self, parent=None):
            pass

    class ScriptedLoadableModuleWidget:
        def __init__(self, parent=None):
            self.parent = parent

        def setup(self):
            self.layout = _AnyGuiObject()

    class ScriptedLoadableModuleTest(unittest.TestCase):
        def delayDisplay(self, message, msec=None):
            print(message)

    for cls in (ScriptedLoadableModule, ScriptedLoadableModuleLogic, ScriptedLoadableModuleWidget, ScriptedLoadableModuleTest):
        setattr(module, cls.__name__, cls)
    return module


@pytest.fixture
def refsam3d_module(monkeypatch, slicer_app):
    """``RefSAM3D/RefSAM3D.py`` itself, imported on real slicer-core (MRML scene, logics,
    ``slicer.util``) with the smallest generic stand-ins for what only the desktop application has:
    the ``qt`` and ``ctk`` modules, ``slicer.ScriptedLoadableModule``, ``slicer.i18n`` (identity)
    and ``slicer.parameterNodeWrapper`` (the class unchanged). ``slicer.mrmlScene`` is the app's scene."""
    import importlib.util
    import sys
    import types

    import slicer

    i18n = types.ModuleType("slicer.i18n")
    i18n.tr = lambda text: text
    i18n.translate = lambda context, text: text
    wrapper = types.ModuleType("slicer.parameterNodeWrapper")
    wrapper.parameterNodeWrapper = lambda cls: cls
    wrapper.WithinRange = _AnyGuiObject
    stand_ins = {
        "qt": _gui_module("qt"),
        "ctk": _gui_module("ctk"),
        "slicer.ScriptedLoadableModule": _scripted_loadable_module(),
        "slicer.i18n": i18n,
        "slicer.parameterNodeWrapper": wrapper,
    }
    for name, module in stand_ins.items():
        monkeypatch.setitem(sys.modules, name, module)
        if name.startswith("slicer."):
            monkeypatch.setattr(slicer, name.split(".", 1)[1], module, raising=False)
    monkeypatch.setattr(slicer, "mrmlScene", slicer_app.scene, raising=False)
    path = Path(__file__).resolve().parents[1] / "RefSAM3D" / "RefSAM3D.py"
    spec = importlib.util.spec_from_file_location("RefSAM3D", path)
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "RefSAM3D", module)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def slicer_app():
    """A headless Slicer core (trame-slicer's SlicerApp), one per session: MRML scene plus the
    volumes, segmentations, subject hierarchy and terminologies logics, with Slicer's terminology files."""
    from trame_slicer.core import SlicerApp

    return SlicerApp()


@pytest.fixture(scope="session")
def terminology_problem(slicer_app):
    """``problem(entry) -> str``: '' when the app's terminology logic (Slicer's
    ``vtkSlicerTerminologiesModuleLogic``) finds the serialised TerminologyEntry, else what it lacks."""
    return lambda entry: _terminology_problem(slicer_app.terminologies_logic, entry)


def _terminology_problem(terminologies_logic, entry: str) -> str:
    """'' when ``terminologies_logic`` finds ``entry``: its context is loaded and lists the
    category, the type in it and the type modifier; else what is missing."""
    import slicer

    parsed = slicer.vtkSlicerTerminologyEntry()
    if not terminologies_logic.DeserializeTerminologyEntry(entry, parsed):
        return "not a terminology entry"
    context = parsed.GetTerminologyContextName()
    wanted_category, wanted_type, wanted_modifier = (parsed.GetCategoryObject(), parsed.GetTypeObject(),
                                                     parsed.GetTypeModifierObject())

    def same(a, b) -> bool:
        return (a.GetCodingSchemeDesignator(), a.GetCodeValue()) == (b.GetCodingSchemeDesignator(), b.GetCodeValue())

    category = slicer.vtkSlicerTerminologyCategory()
    for n in range(terminologies_logic.GetNumberOfCategoriesInTerminology(context)):
        terminologies_logic.GetNthCategoryInTerminology(context, n, category)
        if same(category, wanted_category):
            break
    else:
        return f"category {wanted_category.GetCodeMeaning()} not in '{context}'"
    found = slicer.vtkSlicerTerminologyType()
    for n in range(terminologies_logic.GetNumberOfTypesInTerminologyCategory(context, category)):
        terminologies_logic.GetNthTypeInTerminologyCategory(context, category, n, found)
        if same(found, wanted_type):
            break
    else:
        return f"type {wanted_type.GetCodeMeaning()} not in '{context}'"
    if not wanted_modifier.GetCodeValue():
        return ""
    modifier = slicer.vtkSlicerTerminologyType()
    for n in range(terminologies_logic.GetNumberOfTypeModifiersInTerminologyType(context, category, found)):
        terminologies_logic.GetNthTypeModifierInTerminologyType(context, category, found, n, modifier)
        if same(modifier, wanted_modifier):
            return ""
    return f"modifier {wanted_modifier.GetCodeMeaning()} of {wanted_type.GetCodeMeaning()} not in '{context}'"


@pytest.fixture
def model_gaining():
    """``model_gaining(part)`` -> (a ``small`` model without ``part``, that model grown by
    ``checkpoint.upgrade`` to the full ``small`` config), both in eval mode, seeded."""
    import dataclasses

    import torch

    from RefSAM3DLib import checkpoint
    from RefSAM3DLib.model import MODEL_CONFIGS, build_model

    def build(part: str):
        torch.manual_seed(0)
        older = build_model(dataclasses.replace(MODEL_CONFIGS["small"], **{part: False})).eval()
        return older, checkpoint.upgrade(older, MODEL_CONFIGS["small"]).eval()

    return build


def assert_every_parameter_learns(module) -> None:
    """After a backward pass: every parameter of ``module`` has a non-zero gradient."""
    for name, parameter in module.named_parameters():
        assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name


def load_script(name: str):
    """The module of ``scripts/<name>.py`` (scripts are not a package)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, Path(__file__).resolve().parents[1] / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
