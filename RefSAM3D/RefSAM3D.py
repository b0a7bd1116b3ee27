"""RefSAM3D for 3D Slicer: type what to segment, click Segment, get a named segmentation.

Four classes, as Slicer modules have them: ``RefSAM3D`` (metadata, terminology and sample data
registration), ``RefSAM3DWidget`` (the panel, UI only), ``RefSAM3DLogic`` (all the work, usable
from scripts without any widget) and ``RefSAM3DTest`` (self-test). Inference runs in a warm
child process (``RefSAM3DLib.session_server``: the model loaded once, the last volume's features
cached), so Slicer never freezes, Cancel really stops it, and a second prompt or a click on the
same volume answers without encoding it again; its result is read with Slicer's own segmentation
reader. Not a medical device; not for clinical use.
"""

import json
import logging
import os
import shutil
import sys
import tempfile
import time
import unittest
from pathlib import Path
from typing import Annotated

import qt
import slicer
import vtk
from slicer import vtkMRMLMarkupsFiducialNode, vtkMRMLMarkupsROINode, vtkMRMLScalarVolumeNode, vtkMRMLSegmentationNode
from slicer.i18n import tr as _
from slicer.i18n import translate
from slicer.parameterNodeWrapper import WithinRange, parameterNodeWrapper
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)
from slicer.util import VTKObservationMixin


def _findLibraryParent() -> Path:
    """The folder holding ``RefSAM3DLib``: next to this file once installed, one level up in a source tree."""
    here = Path(__file__).resolve().parent
    for candidate in (here, here.parent):
        if (candidate / "RefSAM3DLib" / "__init__.py").exists():
            return candidate
    raise ImportError(f"RefSAM3DLib not found next to {here} or in {here.parent}; reinstall the RefSAM3D extension.")


LIBRARY_PARENT = _findLibraryParent()
if str(LIBRARY_PARENT) not in sys.path:
    sys.path.insert(0, str(LIBRARY_PARENT))

# Only what Slicer's own Python has (numpy, SimpleITK, packaging): the module loads before the
# worker's packages are installed, and torch never enters Slicer's process.
from RefSAM3DLib import mrml  # noqa: E402
from RefSAM3DLib.cli_process import ChildProcess, library_environment  # noqa: E402
from RefSAM3DLib.errors import Cancelled, RefSAM3DError  # noqa: E402
from RefSAM3DLib.install_plan import InstallPlan, plan_for_this_python  # noqa: E402
from RefSAM3DLib.model_info import model_summary  # noqa: E402
from RefSAM3DLib.run_options import MAX_OVERLAP, RunOptions  # noqa: E402
from RefSAM3DLib.session_client import SessionClient, SessionJob  # noqa: E402
from RefSAM3DLib.vocabulary import parse_prompts  # noqa: E402

LOW_GPU_MEMORY_GB = 4.0
SAMPLES = LIBRARY_PARENT / "RefSAM3DLib" / "samples"


def deviceLabel(device: str) -> str:
    """The device choice as the panel shows it."""
    return {
        "auto": _("Auto (GPU if available)"),
        "cuda": _("NVIDIA GPU (CUDA)"),
        "mps": _("Apple GPU (MPS)"),
        "cpu": _("CPU"),
    }[device]


# Run in a child with the worker's environment: importing torch (and creating a CUDA context) in
# Slicer's own process would cost seconds of frozen GUI and hundreds of MB of GPU memory. Every
# failure is reported as what it is, never as "not installed".
DEVICE_PROBE = """
import json
info = {}
try:
    import torch
except ModuleNotFoundError as error:
    info["torch"] = None if error.name == "torch" else f"{type(error).__name__}: {error}"
except Exception as error:
    info["torch_error"] = f"{type(error).__name__}: {error}"
else:
    info["torch"] = torch.__version__
    try:
        info["cuda"] = torch.cuda.is_available()
        if info["cuda"]:
            free, total = torch.cuda.mem_get_info()
            info.update(name=torch.cuda.get_device_name(0), free_gb=free / 2**30, total_gb=total / 2**30)
    except Exception as error:
        info["cuda_error"] = f"{type(error).__name__}: {error}"
    try:
        mps = getattr(torch.backends, "mps", None)
        info["mps"] = bool(mps is not None and mps.is_available())
    except Exception as error:
        info["mps_error"] = f"{type(error).__name__}: {error}"
    try:
        import RefSAM3DLib.inference  # the engine's own packages (MONAI, ...) load
        from RefSAM3DLib.run_options import DEVICES
        info["engine_devices"] = list(DEVICES)
    except Exception as error:
        info["engine_error"] = f"{type(error).__name__}: {error}"
print(json.dumps(info), flush=True)
"""


def _resourcePath(relativePath: str) -> str:
    """A file under ``Resources/``, next to this file once installed, one level up in a source tree."""
    here = Path(__file__).resolve().parent
    for root in (here, here.parent):
        candidate = root / "Resources" / relativePath
        if candidate.exists():
            return str(candidate)
    return str(here / "Resources" / relativePath)


#
# RefSAM3D
#


class RefSAM3D(ScriptedLoadableModule):
    """Module metadata: title, category, help and acknowledgement."""

    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = _("RefSAM3D")
        self.parent.categories = [translate("qSlicerAbstractCoreModule", "Segmentation")]
        self.parent.dependencies = []
        # Set explicitly: in a source tree Resources/ sits next to RefSAM3D/, not inside it.
        self.parent.icon = qt.QIcon(_resourcePath("Icons/RefSAM3D.png"))
        self.parent.contributors = ["RefSAM3D developers"]
        self.parent.helpText = _("""
<p>Text-prompted 3D segmentation of CT and MRI. Type the structures you want, one per line or
several on a line (<i>liver, spleen</i>, <i>perform left kidney segmentation</i>), click
<b>Segment</b> (or press Ctrl+Enter) and get one named, coloured, SNOMED CT-coded segment per
structure, aligned with the input volume.</p>
<p><b>Not a medical device. Not for clinical use.</b> Check every result; do not use the masks
for volumetry.</p>
<p>The panel lists the structures the loaded model was trained on, with the Dice it reached on
patients it never saw (from its model card). The bundled model is a small research model: on
held-out patients it finds the liver, spleen and kidneys on CT and MRI (Dice 0.84-0.92) and the
aorta on CT (0.82), half of the stomach, vena cava, gallbladder and pancreas, and it leaves the
thinnest CT structures (oesophagus, portal vein, left adrenal gland) empty. Any other structure is attempted with a
warning and is unreliable.</p>
<p>Documentation: the README.md of the RefSAM3D source and the model card
(RefSAM3DLib/models/&lt;model&gt;/MODEL_CARD.md, installed with the extension).</p>
""")
        self.parent.acknowledgementText = _("""
RefSAM3D implements the model of Gao and Lu, "RefSAM3D: Adapting SAM with Cross-modal Reference
for 3D Medical Image Segmentation" (2025), built on Segment Anything (Meta AI), OpenCLIP,
sentence-transformers (all-MiniLM-L6-v2) and MONAI. The bundled model was trained on public data:
BTCV (Multi-Atlas Labeling Beyond the Cranial Vault), CHAOS, the Medical Segmentation Decathlon
and the TotalSegmentator examples. The panel follows the example of SlicerTotalSegmentator and
SlicerMONAIAuto3DSeg.
""")
        slicer.app.connect("startupCompleted()", onStartupCompleted)


def onStartupCompleted():
    """Once Slicer runs: RefSAM3D's terminology context and its sample data."""
    try:
        RefSAM3DLogic.loadTerminology()
    except RefSAM3DError as error:
        logging.warning(str(error))
    registerSampleData()


def registerSampleData():
    """The bundled sample volumes in the Sample Data module (category RefSAM3D); they load from this
    installation, no download."""
    import SampleData

    icon = _resourcePath("Icons/RefSAM3D.png")
    for sampleName, fileName, nodeName in (
        ("RefSAM3D sample CT (abdomen)", "ts_example_ct_image.nii.gz", "RefSAM3DSampleCT"),
        ("RefSAM3D sample MRI (T2-SPIR abdomen)", "chaos_t2spir_01_image.nii.gz", "RefSAM3DSampleMR"),
    ):
        SampleData.SampleDataLogic.registerCustomSampleDataSource(
            category="RefSAM3D", sampleName=sampleName, thumbnailFileName=icon,
            uris=(SAMPLES / fileName).as_uri(), fileNames=fileName, nodeNames=nodeName, loadFileType="VolumeFile",
        )


#
# RefSAM3DParameterNode
#


@parameterNodeWrapper
class RefSAM3DParameterNode:
    """The panel's state, saved with the scene.

    inputVolume / outputSegmentation: the volume to segment and where segments go (none: new node).
    prompt: the structures, as typed. The run options (``RunOptions``, defaults from there):
    device (auto, cuda, mps or cpu), modelPath (a checkpoint folder, empty for the bundled model),
    overlap, threshold, largestComponent, fillHoles.
    includePoints / excludePoints / box: the markups that refine the selected segment (points
    inside it, points on what it wrongly includes, an ROI around it); autoRefine: refine on every
    placed point or moved box.
    """

    inputVolume: vtkMRMLScalarVolumeNode
    outputSegmentation: vtkMRMLSegmentationNode
    prompt: str = ""
    device: str = RunOptions().device
    modelPath: str = ""
    overlap: Annotated[float, WithinRange(0.0, MAX_OVERLAP)] = RunOptions().overlap
    threshold: Annotated[float, WithinRange(0.01, 0.99)] = RunOptions().threshold
    largestComponent: bool = RunOptions().largest_component
    fillHoles: bool = RunOptions().fill_holes
    includePoints: vtkMRMLMarkupsFiducialNode
    excludePoints: vtkMRMLMarkupsFiducialNode
    box: vtkMRMLMarkupsROINode
    autoRefine: bool = True


#
# RefSAM3DLogic
#


class RefSAM3DRun:
    """One running segmentation: the warm worker's job, its inputs and its start time.

    ``target``: ``(segmentationNode, segmentId)`` for a refinement (the answer replaces that
    segment's voxels), None for a text run (the answer adds segments)."""

    def __init__(self, job, inputVolumeNode, prompts, target=None):
        self.job = job
        self.inputVolumeNode = inputVolumeNode
        self.prompts = prompts
        self.target = target
        self.startTime = time.perf_counter()
        self.lastFraction = 0.0

    @property
    def finished(self) -> bool:
        return self.job.finished

    @property
    def elapsed_s(self) -> float:
        return time.perf_counter() - self.startTime


class RefSAM3DLogic(ScriptedLoadableModuleLogic):
    """All the work: dependencies, running the worker, importing its result. No widgets.

    From Slicer's Python console or a ``Slicer --no-main-window --python-script`` batch script::

        logic = slicer.util.getModuleLogic("RefSAM3D")   # or RefSAM3D.RefSAM3DLogic()
        segmentationNode = logic.process(volumeNode, "liver, spleen")
        logic.refine(volumeNode, segmentationNode, segmentId, positivePoints=[(r, a, s)])
        logic.closeSession()                              # ends the warm worker

    The worker stays alive between runs (``RefSAM3DLib.session_server``): the model stays loaded
    and the last volume's image features stay cached, so a second prompt or a click on the same
    volume answers in a fraction of the first run's time.
    """

    def __init__(self):
        ScriptedLoadableModuleLogic.__init__(self)
        self.logCallback = None
        self.lastVolumesMl = []
        # ("added", segmentation node, IDs of the segments it added, whether it created the node)
        # or ("replaced", segmentation node, segment ID, its previous label map)
        self.lastRun = None
        self.session = None  # the warm worker (SessionClient), made by sessionFor

    def getParameterNode(self):
        return RefSAM3DParameterNode(super().getParameterNode())

    @staticmethod
    def runOptions(parameterNode) -> RunOptions:
        """The run options the panel's parameter node holds (``RefSAM3DError`` for a bad value)."""
        return RunOptions(device=parameterNode.device, overlap=parameterNode.overlap, threshold=parameterNode.threshold,
                          model=parameterNode.modelPath, largest_component=parameterNode.largestComponent,
                          fill_holes=parameterNode.fillHoles)

    def log(self, text: str) -> None:
        logging.info(text)
        if self.logCallback:
            self.logCallback(text)

    # Prompts, model, terminology

    @staticmethod
    def readPrompts(text) -> list:
        """The structures a text (or list of texts) names: the vocabulary's reading, the same as the
        CLI's (one per line, several per line, repeats once). Raises ``RefSAM3DError`` when empty."""
        return parse_prompts(text)

    @staticmethod
    def modelSummary(modelPath=None):
        """What the model folder (``None``/empty: the bundled model) says it was trained on and scored."""
        return model_summary(modelPath or None)

    @staticmethod
    def loadTerminology(terminologiesLogic=None) -> str:
        """Load RefSAM3D's terminology context into Slicer's Terminologies module (done at startup)."""
        return mrml.load_terminology(terminologiesLogic or slicer.modules.terminologies.logic())

    # Dependencies

    @staticmethod
    def slicerVersion():
        """``(major, minor)`` of the running Slicer application, ``None`` outside it."""
        app = getattr(slicer, "app", None)
        return (int(app.majorVersion), int(app.minorVersion)) if app is not None else None

    def installPlan(self) -> InstallPlan:
        """What installing the worker's packages takes here (``RefSAM3DLib.install_plan``)."""
        return plan_for_this_python(self.slicerVersion())

    def missingRequirements(self) -> list:
        """Requirements not yet satisfied (torch included); empty when the worker can run."""
        plan = self.installPlan()
        if plan.refusal:
            raise RefSAM3DError(plan.refusal)
        return ([f"torch{plan.torch_requirement}"] if plan.torch_requirement is not None else []) + list(plan.pip_requirements)

    def installTorch(self, requirement: str, askConfirmation: bool = True) -> None:
        """torch and torchvision through PyTorch Util (it picks the build for the GPU)."""
        try:
            import PyTorchUtils
        except ModuleNotFoundError:
            raise RefSAM3DError(_(
                "PyTorch is missing: install the PyTorch extension (Extensions Manager), restart Slicer, and try again."
            )) from None
        self.log(_("Installing PyTorch through the PyTorch extension (several minutes) ..."))
        torch = PyTorchUtils.PyTorchUtilsLogic().installTorch(askConfirmation=askConfirmation, torchVersionRequirement=requirement)
        if torch is None:
            raise RefSAM3DError(_("PyTorch was not installed; open the PyTorch Util module to install it, then try again."))

    def startPipInstall(self, plan: InstallPlan) -> ChildProcess:
        """Start the plan's one pip run (constraints keep torch, torchvision, numpy and SimpleITK as
        they are); returns the running process, whose output lines show the progress."""
        folder = Path(tempfile.mkdtemp(prefix="refsam3d-pip-"))
        constraints = folder / "constraints.txt"
        constraints.write_text("\n".join(plan.constraints) + "\n", encoding="utf-8")
        command = [self.pythonExecutable(), "-m", "pip", *plan.pip_arguments(constraints)]
        self.log(_("Installing: {packages} (one pip run; held: {held})").format(
            packages=", ".join(plan.pip_requirements), held=", ".join(plan.constraints) or "-"))
        process = ChildProcess(command, env=dict(os.environ, PYTHONUNBUFFERED="1", PYTHONIOENCODING="utf-8"), cwd=folder)
        process.temporaryFolder = folder
        process.start()
        return process

    def finishPipInstall(self, process: ChildProcess) -> None:
        """Raise ``RefSAM3DError`` if the pip run failed; remove its temporary folder."""
        shutil.rmtree(getattr(process, "temporaryFolder", ""), ignore_errors=True)
        if process.returncode != 0:
            last = next((line for line in reversed(process.stderr_lines) if line.strip()), "")
            raise RefSAM3DError(_("Installing the Python packages failed (pip exit status {status}): {line}").format(
                status=process.returncode, line=last))
        self.log(_("Python packages installed."))

    def setupPythonRequirements(self, askConfirmation=True) -> bool:
        """Install what is missing, blocking (batch scripts); returns True when something was installed.

        Raises ``RefSAM3DError`` when this Slicer cannot run RefSAM3D or the user declines.
        """
        plan = self.installPlan()
        if plan.refusal:
            raise RefSAM3DError(plan.refusal)
        if plan.nothing_to_do:
            return False
        if plan.torch_requirement is not None:
            self.installTorch(plan.torch_requirement, askConfirmation)
            plan = self.installPlan()
            if plan.refusal:
                raise RefSAM3DError(plan.refusal)
        if plan.pip_requirements:
            if askConfirmation and not slicer.util.confirmOkCancelDisplay(self.installQuestion(plan), _("RefSAM3D: install Python packages")):
                raise RefSAM3DError(_("Required Python packages were not installed; click Segment again to install them."))
            process = self.startPipInstall(plan)
            process.wait(on_event=lambda event: self.log(event.text) if event.text.strip() else None)
            self.finishPipInstall(process)
        return True

    @staticmethod
    def installQuestion(plan: InstallPlan) -> str:
        return _(
            "RefSAM3D needs these Python packages in Slicer's Python:\n\n  {packages}\n\n"
            "They are installed in one pip run that keeps Slicer's numpy and SimpleITK and your PyTorch as they are. "
            "This downloads a few hundred MB and takes a few minutes. Install them now?"
        ).format(packages="\n  ".join(plan.pip_requirements))

    # Worker process

    @staticmethod
    def pythonExecutable() -> str:
        """Slicer's Python launcher (sets up Slicer's library paths), else this interpreter."""
        return shutil.which("PythonSlicer") or sys.executable

    @staticmethod
    def childBaseEnvironment():
        """The environment Slicer started with (its launcher additions removed), when available."""
        try:
            return slicer.util.startupEnvironment()
        except AttributeError:  # slicer.app is missing outside the application (headless core)
            return None

    def deviceProbeCommand(self) -> list:
        return [self.pythonExecutable(), "-c", DEVICE_PROBE]

    def deviceProbeEnvironment(self) -> dict:
        return library_environment(self.childBaseEnvironment())

    @staticmethod
    def describeDevice(probeJson: str) -> tuple:
        """``(text, warning, devices)`` from the probe's JSON line: what to show under Device and
        which device choices to offer (``auto`` and ``cpu`` always; ``cuda``/``mps`` when usable)."""
        info = json.loads(probeJson)
        devices = ["auto", "cpu"]
        if info.get("torch_error"):
            return _("PyTorch is installed but could not be loaded: {error}").format(error=info["torch_error"]), _(
                "Reinstall PyTorch with the PyTorch Util module."), devices
        if info.get("torch") is None:
            return _("PyTorch is not installed yet: it is installed on the first Segment."), "", devices
        engine = info.get("engine_devices")
        warnings = []
        if info.get("engine_error"):
            warnings.append(_("RefSAM3D's packages are not ready ({error}); they are installed on the next Segment.").format(
                error=info["engine_error"]))
        if info.get("cuda_error"):
            warnings.append(_("PyTorch {version} could not query CUDA: {error}").format(version=info["torch"], error=info["cuda_error"]))
        if info.get("cuda"):
            devices.insert(1, "cuda")
            text = _("GPU: {name}, {free:.1f} of {total:.1f} GB free (PyTorch {version})").format(
                name=info["name"], free=info["free_gb"], total=info["total_gb"], version=info["torch"])
            if info["free_gb"] < LOW_GPU_MEMORY_GB:
                warnings.append(_("Less than {limit:.0f} GB of GPU memory is free: close other GPU programs, "
                                  "or choose CPU if the segmentation runs out of memory.").format(limit=LOW_GPU_MEMORY_GB))
        elif info.get("mps"):
            text = _("Apple GPU (MPS) found (PyTorch {version}).").format(version=info["torch"])
        else:
            text = _("No GPU found by PyTorch {version}: RefSAM3D runs on the CPU (slower).").format(version=info["torch"])
        if info.get("mps"):
            if engine is None or "mps" in engine:
                devices.insert(1, "mps")
            else:
                warnings.append(_("This RefSAM3D version cannot run on the Apple GPU yet; it uses the CPU."))
        return text, "\n".join(warnings), devices

    def sessionFor(self, options=RunOptions()) -> SessionClient:
        """The warm worker for ``options``' model and device, started if needed; kept between runs,
        replaced when the model or device changes or it stopped (after a cancel)."""
        if self.session is not None:
            wanted = (options.model, options.device)
            if not self.session.alive or (self.session.options.model, self.session.options.device) != wanted:
                self.closeSession()
        if self.session is None:
            self.session = SessionClient(options, python=self.pythonExecutable(), base_env=self.childBaseEnvironment(),
                                         temp_root=slicer.app.temporaryPath if hasattr(slicer, "app") else None)
            self.session.start()
        return self.session

    def closeSession(self) -> None:
        """End the warm worker (its model and cache go; the next run starts a new one)."""
        if self.session is not None:
            self.session.close()
            self.session = None

    def startProcessing(self, inputVolumeNode, prompts, options=RunOptions(), pointsRas=(), pointLabels=None,
                        boxRas=None, target=None) -> RefSAM3DRun:
        """Send the input and the prompts to the warm worker; returns at once (poll the run, then
        ``finishProcessing``).

        ``prompts``: one text or a list of texts, read by the vocabulary (:meth:`readPrompts`);
        None with points or a box ("the structure here"). ``options``: a ``RunOptions`` (device,
        overlap, threshold, model, clean-up). ``pointsRas``/``pointLabels``/``boxRas``: clicks (1
        inside, 0 not part of it) and a box in world RAS mm. The modality comes from the volume's
        DICOM series when Slicer loaded it from DICOM.
        """
        parsed = self.readPrompts(prompts) if prompts is not None else []
        volume = mrml.volume_from_node(inputVolumeNode)
        texts = [prompt.text for prompt in parsed] or None  # the vocabulary reads these back to the same prompts
        job = SessionJob(self.sessionFor(options), volume, texts, options, pointsRas, pointLabels, boxRas)
        names = ", ".join(prompt.structure.name if prompt.structure else f"'{prompt.text}'" for prompt in parsed)
        gestures = len(pointsRas) + (boxRas is not None)
        self.log(_("Segmenting {volume} ({modality}): {names}{gestures} (device {device}, overlap {overlap}, threshold {threshold})").format(
            volume=inputVolumeNode.GetName(), modality=volume.modality or _("modality guessed from intensities"),
            names=names or _("the structure at the points"),
            gestures=_(" with {count} point(s)/box").format(count=gestures) if gestures else "",
            device=options.device, overlap=options.overlap, threshold=options.threshold))
        job.start()
        return RefSAM3DRun(job, inputVolumeNode, parsed, target)

    def startRefinement(self, inputVolumeNode, segmentationNode, segmentId, positivePoints=(), negativePoints=(),
                        boxRas=None, options=RunOptions()) -> RefSAM3DRun:
        """Start re-segmenting one segment with clicks and/or a box (world RAS mm), from the cached
        features: its own prompt (the text that made it, else its name) plus the gestures."""
        points = [tuple(p) for p in positivePoints] + [tuple(p) for p in negativePoints]
        if not points and boxRas is None:
            raise RefSAM3DError(_("Place a point inside the structure, a point on what is wrongly included, "
                                  "or a box around the structure, then refine."))
        labels = [1] * len(positivePoints) + [0] * len(negativePoints)
        prompt = mrml.segment_prompt(segmentationNode, segmentId)
        return self.startProcessing(inputVolumeNode, prompt, options, points, labels, boxRas,
                                    target=(segmentationNode, segmentId))

    def handleEvents(self, run, events, progressCallback=None) -> None:
        """Forward the worker's new output: progress to ``progressCallback(fraction, message)``, lines to the log."""
        for event in events:
            if event.kind == "progress":
                run.lastFraction = event.fraction
                if progressCallback:
                    progressCallback(event.fraction, event.text)
            elif event.kind in ("log", "error_log") and event.text.strip():
                self.log(event.text)

    def finishProcessing(self, run, outputSegmentationNode=None):
        """Import the finished answer with Slicer's reader (a refinement replaces its segment's
        voxels); the answer's files are removed. Returns the segmentation node.

        Raises ``Cancelled`` after a cancel and ``RefSAM3DError`` (the worker's message) on failure.
        """
        try:
            path = run.job.output_file()
            if run.target is not None:
                segmentationNode, segmentId = run.target
                previous = mrml.replace_segment_from_file(path, segmentationNode, segmentId)
                self.lastRun = ("replaced", segmentationNode, segmentId, previous)
                segmentIds = [segmentId]
            else:
                segmentationNode, segmentIds = mrml.import_segmentation_file(path, run.inputVolumeNode, outputSegmentationNode)
                self.lastRun = ("added", segmentationNode, segmentIds, outputSegmentationNode is None)
        finally:
            run.job.close()
        segmentation = segmentationNode.GetSegmentation()
        self.lastVolumesMl = [(segmentation.GetSegment(segmentId).GetName(), mrml.segment_volume_ml(segmentationNode, segmentId))
                              for segmentId in segmentIds]
        self.log(_("Finished in {seconds:.1f} s: {names}").format(
            seconds=run.elapsed_s, names=", ".join(name for name, _volume in self.lastVolumesMl)))
        return segmentationNode

    def undoLastRun(self) -> bool:
        """Undo the last run: remove the segments it added (the node too if the run created it and
        nothing else was added since), or put back the mask a refinement replaced. Returns False
        when there is nothing to undo."""
        if self.lastRun is None:
            return False
        kind, segmentationNode, *rest = self.lastRun
        self.lastRun = None
        if segmentationNode.GetScene() is None:
            return False
        if kind == "replaced":
            segmentId, previous = rest
            if not mrml.restore_segment(segmentationNode, segmentId, previous):
                return False
            self.log(_("The last refinement was undone."))
            return True
        segmentIds, created = rest
        segmentation = segmentationNode.GetSegmentation()
        for segmentId in segmentIds:
            if segmentation.GetSegment(segmentId) is not None:
                segmentation.RemoveSegment(segmentId)
        if created and segmentation.GetNumberOfSegments() == 0:
            segmentationNode.GetScene().RemoveNode(segmentationNode)
        self.log(_("The last run's segments were removed."))
        return True

    def cancel(self, run) -> None:
        """Stop the run now; the warm worker ends with it (the next run starts a new one)."""
        run.job.cancel()
        self.log(_("Cancelling ..."))

    def _wait(self, run, progressCallback=None) -> None:
        try:
            run.job.wait(lambda event: self.handleEvents(run, [event], progressCallback),
                         between=slicer.app.processEvents if hasattr(slicer, "app") else None)
        except BaseException:
            run.job.cancel()
            run.job.close()
            raise

    def process(self, inputVolumeNode, prompts, outputSegmentationNode=None, options=RunOptions(), progressCallback=None):
        """Segment ``inputVolumeNode`` for ``prompts`` and return the segmentation node. Waits for the result.

        Works without a widget (Python console, batch scripts). While waiting it keeps Slicer's
        event loop turning when there is one. ``prompts``: one text or a list of texts, read as the
        CLI reads them; ``options``: a ``RunOptions``. Raises ``RefSAM3DError`` with a readable
        message on failure. The worker stays warm for the next call (``closeSession`` ends it).
        """
        run = self.startProcessing(inputVolumeNode, prompts, options)
        self._wait(run, progressCallback)
        return self.finishProcessing(run, outputSegmentationNode)

    def refine(self, inputVolumeNode, segmentationNode, segmentId, positivePoints=(), negativePoints=(), boxRas=None,
               options=RunOptions(), progressCallback=None):
        """Correct one segment with clicks and/or a box (world RAS mm) and wait: its voxels are
        replaced (``undoLastRun`` puts them back). Returns the segmentation node."""
        run = self.startRefinement(inputVolumeNode, segmentationNode, segmentId, positivePoints, negativePoints,
                                   boxRas, options)
        self._wait(run, progressCallback)
        return self.finishProcessing(run)


#
# RefSAM3DWidget
#


class RefSAM3DWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    """The panel. It only shows and collects; ``RefSAM3DLogic`` does the work."""

    def __init__(self, parent=None):
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self._run = None
        self._install = None
        self._outputSegmentationNode = None
        self._deviceProbe = None
        self._modelSummary = None
        self._observedGestureNodes = []
        self._timer = qt.QTimer()
        self._timer.setInterval(100)
        self._timer.timeout.connect(self.onTimer)

    def setup(self):
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(_resourcePath("UI/RefSAM3D.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)

        self.logic = RefSAM3DLogic()
        self.logic.logCallback = self.addLog

        self._setDeviceChoices(["auto", "cpu"])
        self.ui.structureComboBox.completer().setCompletionMode(qt.QCompleter.PopupCompletion)
        self.ui.structureComboBox.completer().setFilterMode(qt.Qt.MatchContains)

        self._shortcuts = []
        for sequence in ("Ctrl+Return", "Ctrl+Enter"):
            shortcut = qt.QShortcut(qt.QKeySequence(sequence), self.ui.promptTextEdit)
            shortcut.setContext(qt.Qt.WidgetWithChildrenShortcut)
            shortcut.activated.connect(self.onSegmentButton)
            self._shortcuts.append(shortcut)

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)

        self.ui.outputSegmentationSelector.connect("currentNodeChanged(vtkMRMLNode*)", self.ui.segmentationShow3DButton.setSegmentationNode)
        self.ui.outputSegmentationSelector.connect("currentNodeChanged(vtkMRMLNode*)", self.ui.segmentsTableView.setSegmentationNode)
        self.ui.promptTextEdit.textChanged.connect(self.updatePromptPreview)
        self.ui.deviceComboBox.currentIndexChanged.connect(self.onDeviceChanged)
        self.ui.modelPathLineEdit.currentPathChanged.connect(self.onModelPathChanged)
        self.ui.addStructureButton.clicked.connect(self.onAddStructure)
        self.ui.segmentButton.clicked.connect(self.onSegmentButton)
        self.ui.refreshDeviceButton.clicked.connect(self.probeDevice)
        self.ui.removeSegmentsButton.clicked.connect(self.onRemoveSegments)
        self.ui.segmentEditorButton.clicked.connect(self.onOpenSegmentEditor)
        self.ui.undoButton.clicked.connect(self.onUndo)
        self.ui.refineButton.clicked.connect(self.onRefineButton)
        for name in ("includePoints", "excludePoints", "box"):
            selector, placeWidget = getattr(self.ui, name + "Selector"), getattr(self.ui, name + "PlaceWidget")
            placeWidget.setMRMLScene(slicer.mrmlScene)
            placeWidget.placeMultipleMarkups = slicer.qSlicerMarkupsPlaceWidget.ForcePlaceMultipleMarkups
            selector.connect("currentNodeChanged(vtkMRMLNode*)", placeWidget.setCurrentNode)
            selector.connect("currentNodeChanged(vtkMRMLNode*)", self._observeGestureNodes)
        self.ui.boxPlaceWidget.placeMultipleMarkups = slicer.qSlicerMarkupsPlaceWidget.ForcePlaceSingleMarkup
        self.ui.segmentsTableView.connect("selectionChanged(QItemSelection,QItemSelection)",
                                          lambda *selections: self._updateButtons())

        self.initializeParameterNode()
        self.onModelPathChanged()
        self.probeDevice()

    def cleanup(self):
        self._stopRun()
        self.removeObservers()
        self.logic.closeSession()

    def enter(self):
        self.initializeParameterNode()

    def exit(self):
        self.setParameterNode(None)

    def onSceneStartClose(self, caller, event):
        self._stopRun()
        self.logic.lastRun = None
        self.setParameterNode(None)

    def onSceneEndClose(self, caller, event):
        if self.parent.isEntered:
            self.initializeParameterNode()

    # Parameter node (parameterNodeWrapper: widgets with a SlicerParameterName property follow it)

    def initializeParameterNode(self):
        self.setParameterNode(self.logic.getParameterNode())
        if not self._parameterNode.inputVolume:
            firstVolumeNode = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLScalarVolumeNode")
            if firstVolumeNode:
                self._parameterNode.inputVolume = firstVolumeNode
        if not self._parameterNode.prompt:
            self._parameterNode.prompt = qt.QSettings().value("RefSAM3D/LastPrompt", "")

    def setParameterNode(self, inputParameterNode):
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.onParameterNodeModified)
        self._parameterNode = inputParameterNode
        if self._parameterNode:
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.onParameterNodeModified)
            self.onParameterNodeModified()

    def onParameterNodeModified(self, caller=None, event=None):
        node = self._parameterNode
        if node is None:
            return
        index = self.ui.deviceComboBox.findData(node.device)
        if index >= 0 and index != self.ui.deviceComboBox.currentIndex:
            self.ui.deviceComboBox.currentIndex = index
        if self.ui.modelPathLineEdit.currentPath != node.modelPath:
            self.ui.modelPathLineEdit.currentPath = node.modelPath
        if node.inputVolume:
            self.ui.outputSegmentationSelector.baseName = _("{volume} segmentation").format(volume=node.inputVolume.GetName())
        self._updateButtons()

    def onDeviceChanged(self, index=None):
        if self._parameterNode is not None and self.ui.deviceComboBox.currentData:
            self._parameterNode.device = self.ui.deviceComboBox.currentData

    def _setDeviceChoices(self, devices):
        combo = self.ui.deviceComboBox
        wanted = self._parameterNode.device if self._parameterNode is not None else "auto"
        wasBlocked = combo.blockSignals(True)
        combo.clear()
        for device in devices:
            combo.addItem(deviceLabel(device), device)
        combo.currentIndex = max(0, combo.findData(wanted))
        combo.blockSignals(wasBlocked)

    # What the model knows

    def onModelPathChanged(self, *args):
        path = self.ui.modelPathLineEdit.currentPath.strip()
        if self._parameterNode is not None and self._parameterNode.modelPath != path:
            self._parameterNode.modelPath = path
        try:
            self._modelSummary = self.logic.modelSummary(path or None)
        except RefSAM3DError as error:
            self._modelSummary = None
            self.ui.modelInfoLabel.text = str(error)
        else:
            self._showModelSummary(self._modelSummary)
        self.updatePromptPreview()

    def _showModelSummary(self, summary):
        rows = summary.rows()
        combo = self.ui.structureComboBox
        combo.clear()
        for name, scores in rows:
            combo.addItem(_("{name} (held-out Dice {scores})").format(name=name, scores=scores) if scores else name, name)
        combo.setCurrentIndex(-1)
        if not rows:
            self.ui.modelInfoLabel.text = _("{model} {version}: its checkpoint does not say which structures it was trained on.").format(
                model=summary.name, version=summary.version)
            return
        self.ui.modelInfoLabel.text = _(
            "{model} {version} was trained on {count} structures (listed under Suggestions with their Dice on patients it "
            "never saw; 1.0 is perfect). Other structures run with a warning and are unreliable. Not for volumetry."
        ).format(model=summary.name, version=summary.version, count=len(rows))

    def updatePromptPreview(self):
        """Show what the vocabulary reads in the prompt, structure by structure, and what the model says of each."""
        text = self.ui.promptTextEdit.toPlainText()
        try:
            prompts = self.logic.readPrompts(text)
        except RefSAM3DError:
            self.ui.promptPreviewLabel.text = ""
            self._updateButtons()
            return
        summary = self._modelSummary
        parts = []
        for prompt in prompts:
            if prompt.structure is None:
                parts.append(_("'{text}' (not in the vocabulary: unreliable)").format(text=prompt.text))
            elif summary is not None and summary.structures and not summary.trained_on(prompt.structure.key):
                parts.append(_("{name} (not trained: unreliable)").format(name=prompt.structure.name))
            elif summary is not None and summary.scores(prompt.structure.key):
                parts.append(_("{name} (Dice {scores})").format(name=prompt.structure.name, scores=summary.scores(prompt.structure.key)))
            else:
                parts.append(prompt.structure.name)
        self.ui.promptPreviewLabel.text = _("Segments: {list}").format(list="; ".join(parts))
        self._updateButtons()

    def _hasPrompt(self) -> bool:
        try:
            return bool(self.logic.readPrompts(self.ui.promptTextEdit.toPlainText()))
        except RefSAM3DError:
            return False

    def _updateButtons(self):
        busy = self._run is not None or self._install is not None
        hasInput = self.ui.inputVolumeSelector.currentNode() is not None
        hasPrompt = self._hasPrompt()
        self.ui.segmentButton.text = _("Cancel") if self._run is not None else _("Segment")
        self.ui.segmentButton.enabled = self._run is not None or (self._install is None and hasInput and hasPrompt)
        if self._run is not None:
            self.ui.segmentButton.toolTip = _("Stop the segmentation; nothing is changed")
        elif self._install is not None:
            self.ui.segmentButton.toolTip = _("Installing Python packages; wait for it to finish")
        elif not hasInput:
            self.ui.segmentButton.toolTip = _("Select an input volume")
        elif not hasPrompt:
            self.ui.segmentButton.toolTip = _("Type at least one structure, e.g. liver")
        else:
            self.ui.segmentButton.toolTip = _("Segment the structures (Ctrl+Enter)")
        for widget in (self.ui.inputVolumeSelector, self.ui.outputSegmentationSelector, self.ui.promptTextEdit,
                       self.ui.advancedCollapsibleButton, self.ui.addStructureButton):
            widget.enabled = not busy
        self.ui.undoButton.enabled = not busy and self.logic.lastRun is not None
        oneSegment = len(self._selectedSegmentIds()) == 1
        self.ui.refineButton.enabled = not busy and hasInput and oneSegment
        self.ui.refineButton.toolTip = (_("Compute the selected segment again with its prompt and the points and box above.")
                                        if oneSegment else _("Select one segment in the Segments list"))

    # Actions

    def addLog(self, text):
        self.ui.logTextEdit.appendPlainText(text)

    def onAddStructure(self):
        name = self.ui.structureComboBox.currentData or self.ui.structureComboBox.currentText.strip()
        if not name:
            return
        text = self.ui.promptTextEdit.toPlainText().rstrip()
        self.ui.promptTextEdit.setPlainText(f"{text}\n{name}" if text else name)
        self.ui.structureComboBox.setCurrentIndex(-1)

    def onSegmentButton(self):
        if self._run is not None:
            self.logic.cancel(self._run)
            return
        if not self.ui.segmentButton.enabled:
            return
        outputNode = self.ui.outputSegmentationSelector.currentNode()
        if outputNode is not None and outputNode.GetSegmentation().GetNumberOfSegments() > 0:
            if not slicer.util.confirmOkCancelDisplay(
                _("Add the new segments to '{name}'? Its existing segments are kept; new ones with the same name get a "
                  "number.\n\nCancel, then choose 'Create new segmentation' in the output selector to keep results apart.").format(
                    name=outputNode.GetName()),
                _("RefSAM3D: add to existing segmentation"),
            ):
                return
        self.ui.logTextEdit.clear()
        with slicer.util.tryWithErrorDisplay(_("RefSAM3D could not start."), waitCursor=True):
            if self._installIfNeeded():
                return  # the install runs; the segmentation starts when it is done
            self._startSegmentation(outputNode)

    def _installIfNeeded(self) -> bool:
        """Carry out the install plan: refuse, PyTorch Util, or a pip run in the background. True
        while packages are being installed."""
        plan = self.logic.installPlan()
        if plan.refusal:
            raise RefSAM3DError(plan.refusal)
        if plan.torch_requirement is not None:
            self.logic.installTorch(plan.torch_requirement, askConfirmation=True)
            plan = self.logic.installPlan()
            if plan.refusal:
                raise RefSAM3DError(plan.refusal)
        if not plan.pip_requirements:
            return False
        if not slicer.util.confirmOkCancelDisplay(self.logic.installQuestion(plan), _("RefSAM3D: install Python packages")):
            raise RefSAM3DError(_("Required Python packages were not installed; click Segment again to install them."))
        self._install = self.logic.startPipInstall(plan)
        self.ui.progressBar.setRange(0, 0)  # busy: pip gives no fraction
        self.ui.statusLabel.text = _("Installing Python packages ...")
        self._updateButtons()
        self._timer.start()
        return True

    def _startSegmentation(self, outputNode):
        prompt = self.ui.promptTextEdit.toPlainText()
        qt.QSettings().setValue("RefSAM3D/LastPrompt", prompt)
        self._outputSegmentationNode = outputNode
        self._run = self.logic.startProcessing(self.ui.inputVolumeSelector.currentNode(), prompt,
                                               self.logic.runOptions(self._parameterNode))
        self.ui.progressBar.setRange(0, 100)
        self.ui.progressBar.value = 0
        self.ui.statusLabel.text = _("Starting the worker ...")
        self._updateButtons()
        self._timer.start()

    def onProgress(self, fraction, message):
        self.ui.progressBar.value = int(round(fraction * 100))
        elapsed = f" ({self._run.elapsed_s:.0f} s)" if self._run is not None else ""
        self.ui.statusLabel.text = message + elapsed

    def onTimer(self):
        if self._install is not None:
            self._pollInstall()
            return
        if self._run is None:
            self._timer.stop()
            return
        self.logic.handleEvents(self._run, self._run.job.poll(), self.onProgress)
        if self._run.finished:
            self._timer.stop()
            self._finishRun()

    def _pollInstall(self):
        install = self._install
        for event in install.poll():
            if event.text.strip():
                self.addLog(event.text)
                self.ui.statusLabel.text = event.text.strip()[:120]
        if not install.finished:
            return
        for event in install.poll():
            if event.text.strip():
                self.addLog(event.text)
        self._timer.stop()
        self._install = None
        self.ui.progressBar.setRange(0, 100)
        self.ui.progressBar.value = 0
        try:
            self.logic.finishPipInstall(install)
        except RefSAM3DError as error:
            self.ui.statusLabel.text = _("Installing failed: see the message and the log below.")
            slicer.util.errorDisplay(str(error), windowTitle=_("RefSAM3D"), detailedText="\n".join(install.stderr_lines[-40:]))
            self._updateButtons()
            return
        self.ui.statusLabel.text = _("Python packages installed.")
        self._updateButtons()
        with slicer.util.tryWithErrorDisplay(_("RefSAM3D could not start."), waitCursor=True):
            self._startSegmentation(self.ui.outputSegmentationSelector.currentNode())

    def _finishRun(self):
        run = self._run
        self.logic.handleEvents(run, run.job.poll(), self.onProgress)
        self._run = None
        try:
            segmentationNode = self.logic.finishProcessing(run, self._outputSegmentationNode)
        except Cancelled:
            self.ui.statusLabel.text = _("Cancelled; nothing was changed.")
            self.ui.progressBar.value = 0
        except RefSAM3DError as error:
            self.ui.statusLabel.text = _("Failed: see the message and the log below.")
            slicer.util.errorDisplay(str(error), windowTitle=_("RefSAM3D"), detailedText="\n".join(run.job.log_lines))
        except Exception as error:  # a bug: show it, with the log, rather than losing it in the console
            logging.exception("RefSAM3D failed")
            slicer.util.errorDisplay(_("RefSAM3D failed: {error}").format(error=error), windowTitle=_("RefSAM3D"),
                                     detailedText="\n".join(run.job.log_lines))
        else:
            self.ui.progressBar.value = 100
            self.ui.statusLabel.text = _("Done in {seconds:.1f} s. Check every segment: not for clinical use.").format(seconds=run.elapsed_s)
            self.ui.outputSegmentationSelector.setCurrentNode(segmentationNode)
            slicer.util.setSliceViewerLayers(background=run.inputVolumeNode)
        finally:
            self._updateButtons()

    def onRemoveSegments(self):
        segmentationNode = self.ui.outputSegmentationSelector.currentNode()
        if segmentationNode is None:
            return
        for segmentId in self.ui.segmentsTableView.selectedSegmentIDs():
            segmentationNode.GetSegmentation().RemoveSegment(segmentId)

    def onOpenSegmentEditor(self):
        segmentationNode = self.ui.outputSegmentationSelector.currentNode()
        volumeNode = self.ui.inputVolumeSelector.currentNode()
        slicer.util.selectModule("SegmentEditor")
        editor = slicer.modules.segmenteditor.widgetRepresentation().self().editor
        if segmentationNode is not None:
            editor.setSegmentationNode(segmentationNode)
        if volumeNode is not None:
            editor.setSourceVolumeNode(volumeNode)

    def onUndo(self):
        self.logic.undoLastRun()
        self._updateButtons()

    # Refinement with markups (points and an ROI), through the warm worker's cached features

    def _selectedSegmentIds(self) -> list:
        if self.ui.outputSegmentationSelector.currentNode() is None:
            return []
        return list(self.ui.segmentsTableView.selectedSegmentIDs())

    def _observeGestureNodes(self, *args):
        for node in self._observedGestureNodes:
            self.removeObserver(node, node.PointPositionDefinedEvent, self.onGesturePlaced)
            self.removeObserver(node, node.PointEndInteractionEvent, self.onGesturePlaced)
        self._observedGestureNodes = [node for node in (self.ui.includePointsSelector.currentNode(),
                                                        self.ui.excludePointsSelector.currentNode(),
                                                        self.ui.boxSelector.currentNode()) if node is not None]
        for node in self._observedGestureNodes:
            self.addObserver(node, node.PointPositionDefinedEvent, self.onGesturePlaced)
            self.addObserver(node, node.PointEndInteractionEvent, self.onGesturePlaced)

    def onGesturePlaced(self, caller=None, event=None):
        if self._parameterNode is not None and self._parameterNode.autoRefine and self.ui.refineButton.enabled:
            self.onRefineButton()

    def onRefineButton(self):
        segmentIds = self._selectedSegmentIds()
        if self._run is not None or len(segmentIds) != 1:
            return
        with slicer.util.tryWithErrorDisplay(_("RefSAM3D could not refine the segment."), waitCursor=True):
            self._run = self.logic.startRefinement(
                self.ui.inputVolumeSelector.currentNode(), self.ui.outputSegmentationSelector.currentNode(), segmentIds[0],
                positivePoints=mrml.control_points_ras(self.ui.includePointsSelector.currentNode()),
                negativePoints=mrml.control_points_ras(self.ui.excludePointsSelector.currentNode()),
                boxRas=mrml.roi_box_ras(self.ui.boxSelector.currentNode()),
                options=self.logic.runOptions(self._parameterNode))
            self.ui.progressBar.setRange(0, 100)
            self.ui.progressBar.value = 0
            self.ui.statusLabel.text = _("Refining ...")
            self._updateButtons()
            self._timer.start()

    def _stopRun(self):
        self._timer.stop()
        if self._run is not None:
            self.logic.cancel(self._run)
            self._run.job.close()
            self._run = None
        if self._deviceProbe is not None:
            self._deviceProbe.cancel()
            self._deviceProbe = None

    # Device information (asynchronous: a child process imports torch)

    def probeDevice(self):
        if self._deviceProbe is not None:
            return
        self.ui.deviceInfoLabel.text = _("Looking for a GPU ...")
        self.ui.deviceWarningLabel.visible = False
        self._deviceProbe = ChildProcess(self.logic.deviceProbeCommand(), env=self.logic.deviceProbeEnvironment())
        try:
            self._deviceProbe.start()
        except OSError as error:
            self._deviceProbe = None
            self.ui.deviceInfoLabel.text = _("Could not start the GPU check ({python}): {error}").format(
                python=self.logic.pythonExecutable(), error=error)
            return
        qt.QTimer.singleShot(200, self._checkDeviceProbe)

    def _checkDeviceProbe(self):
        probe = self._deviceProbe
        if probe is None:
            return
        if not probe.finished:
            qt.QTimer.singleShot(200, self._checkDeviceProbe)
            return
        self._deviceProbe = None
        lines = [event.text for event in probe.poll() if event.kind == "log" and event.text.startswith("{")]
        if probe.returncode != 0 or not lines:
            last = next((line for line in reversed(probe.stderr_lines) if line.strip()), "")
            self.ui.deviceInfoLabel.text = _("The GPU check failed (exit status {status}): {line}").format(
                status=probe.returncode, line=last or _("no output"))
            return
        text, warning, devices = self.logic.describeDevice(lines[-1])
        self._setDeviceChoices(devices)
        self.ui.deviceInfoLabel.text = text
        self.ui.deviceWarningLabel.text = warning
        self.ui.deviceWarningLabel.visible = bool(warning)


#
# RefSAM3DTest
#


class RefSAM3DTest(ScriptedLoadableModuleTest):
    """Self-test in Slicer: the bundled model segments a held-out MRI (a patient it never trained
    on: chaos_t2spir_01, a validation case in its model card) and overlaps the reference labels.
    Skipped, not failed, where the worker's packages are not installed (Slicer's extension builds)."""

    # Per-segment Dice (overlapping segments, as Slicer holds them) of refsam3d-small-v10 (v11, v12 answer text as it does) on
    # chaos_t2spir_01, measured with the library on the CPU: liver 0.956, right kidney 0.902, left
    # kidney 0.864, spleen 0.805; floors 0.1 below.
    MIN_DICE = {"liver": 0.85, "kidney_right": 0.80, "kidney_left": 0.76, "spleen": 0.70}

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
        reason = self.skipReason()
        if reason:
            self.delayDisplay(_("Skipped: {reason}").format(reason=reason))
            if slicer.app.testingEnabled():
                raise unittest.SkipTest(reason)
            return
        self.test_RefSAM3D_held_out_mri()

    @staticmethod
    def skipReason() -> str:
        """Why the self-test cannot run here ('' when it can)."""
        try:
            missing = RefSAM3DLogic().missingRequirements()
        except RefSAM3DError as error:
            return str(error)
        return _("RefSAM3D's Python packages are not installed ({missing}); click Segment once to install them.").format(
            missing=", ".join(missing)) if missing else ""

    def test_RefSAM3D_held_out_mri(self):
        import numpy as np

        self.delayDisplay(_("Loading a held-out sample MRI"))
        volumeNode = slicer.util.loadVolume(str(SAMPLES / "chaos_t2spir_01_image.nii.gz"))
        labelNode = slicer.util.loadLabelVolume(str(SAMPLES / "chaos_t2spir_01_label.nii.gz"))
        # As Slicer's DICOM plugin records it: the modality on the volume's subject-hierarchy item.
        hierarchy = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(slicer.mrmlScene)
        hierarchy.SetItemAttribute(hierarchy.GetItemByDataNode(volumeNode), "DICOM.Modality", "MR")
        labels = slicer.util.arrayFromVolume(labelNode)
        names = json.loads((SAMPLES / "labelmaps.json").read_text())["chaos_t2spir_01_label.nii.gz"]
        referenceValues = {key: int(value) for value, key in names.items()}

        self.delayDisplay(_("Segmenting the liver, both kidneys and the spleen with the bundled model"))
        logic = RefSAM3DLogic()
        fractions = []
        try:
            segmentationNode = logic.process(volumeNode, "\n".join(("liver", "right kidney", "left kidney", "spleen")),
                                             progressCallback=lambda fraction, message: fractions.append(fraction))
        finally:
            logic.closeSession()
        self.assertTrue(fractions, "no progress was reported")
        segmentation = segmentationNode.GetSegmentation()
        self.assertEqual(segmentation.GetNumberOfSegments(), len(self.MIN_DICE))
        for number, key in enumerate(self.MIN_DICE):
            segmentId = segmentation.GetNthSegmentID(number)
            predicted = mrml.segmentation_node_to_labelmap_array(segmentationNode, volumeNode, [segmentId]) > 0
            reference = labels == referenceValues[key]
            dice = 2.0 * np.count_nonzero(predicted & reference) / max(1, np.count_nonzero(predicted) + np.count_nonzero(reference))
            self.delayDisplay(f"{key}: Dice {dice:.3f}")
            self.assertGreater(dice, self.MIN_DICE[key], f"{key}: Dice {dice:.3f} with the reference label")
        self.delayDisplay(_("Test passed"))
