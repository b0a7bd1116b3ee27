"""What installing the worker's Python packages into a Python (3D Slicer's) takes, as a pure plan.

The requirements exist once: ``[project] dependencies`` and ``requires-python`` of
``pyproject.toml``. :func:`read_requirements` reads that file next to ``RefSAM3DLib`` (a source
checkout has it there, and the Slicer extension installs it there), else the installed
distribution's metadata (``pip install refsam3d``), which pip made from the same file.

:func:`plan_install` decides, touching nothing, as SlicerTotalSegmentator and
SlicerMONAIAuto3DSeg do:

* **refuse**, with a message saying what to do, when Slicer is older than
  :data:`MINIMUM_SLICER_VERSION`, when its Python fails ``requires-python``, or when a package that
  must stay as it is (Slicer's numpy or SimpleITK, an installed torch or torchvision) fails
  RefSAM3D's requirement: RefSAM3D never replaces those (a CUDA torch from PyTorch Util would be
  swapped for a PyPI build, CPU-only on Windows, and a loaded torch cannot be replaced there);
* **ask PyTorch Util** (the PyTorch extension, which picks the build for the GPU) for torch and
  torchvision when they are missing, with the version requirement;
* install everything else in **one** pip run, the resolver held by constraints that pin
  :data:`PINNED` to their installed versions.

The Slicer module carries the plan out (:class:`RefSAM3DLogic`); the tests check plans for given
Slicer and Python versions and installed packages without any of them.
"""

from __future__ import annotations

import importlib.metadata
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name
from packaging.version import InvalidVersion, Version

from .errors import RefSAM3DError

DISTRIBUTION = "refsam3d"
PYPROJECT = Path(__file__).resolve().parent.parent / "pyproject.toml"
MINIMUM_SLICER_VERSION = (5, 10)
"""Slicer 5.8 has Python 3.9, older than ``requires-python``; 5.10 is the first release with a newer one."""
FROM_PYTORCH_UTIL = ("torch", "torchvision")
"""Installed by the PyTorch extension (it matches the build to the GPU), never by our pip run."""
PINNED = ("torch", "torchvision", "numpy", "simpleitk")
"""Held at their installed versions during our pip run (constraints): Slicer's own numpy and
SimpleITK, and PyTorch Util's torch and torchvision."""


@dataclass(frozen=True)
class InstallPlan:
    """What to do, in order; an empty plan means everything is installed.

    Args:
        refusal: why nothing can be installed here, and what the user can do; ``None`` if it can.
        torch_requirement: ask PyTorch Util for ``torch<this>`` and torchvision first (e.g.
            ``">=2.1"``), then plan again; ``None`` when torch is present and good.
        pip_requirements: requirements for the one pip run (those missing or too old).
        constraints: ``name==version`` lines for the constraints file of that run.
    """

    refusal: str | None = None
    torch_requirement: str | None = None
    pip_requirements: tuple[str, ...] = ()
    constraints: tuple[str, ...] = field(default=())

    @property
    def nothing_to_do(self) -> bool:
        return self.refusal is None and self.torch_requirement is None and not self.pip_requirements

    def pip_arguments(self, constraints_file: str | Path) -> list[str]:
        """Arguments after ``python -m pip``; ``constraints_file`` must hold :attr:`constraints`."""
        return ["install", *self.pip_requirements, "--constraint", str(constraints_file)]


def read_requirements(pyproject: Path = PYPROJECT) -> tuple[list[str], str]:
    """``(requirements, requires_python)`` of the package: from ``pyproject`` when it exists (and
    ``tomllib``, Python >= 3.11, can read it), else from the installed distribution's metadata."""
    if pyproject.is_file():
        try:
            import tomllib
        except ModuleNotFoundError:
            tomllib = None
        project = tomllib.loads(pyproject.read_text(encoding="utf-8")).get("project", {}) if tomllib else {}
        if canonicalize_name(project.get("name", "")) == DISTRIBUTION:  # not some other package's file
            return list(project["dependencies"]), project.get("requires-python", "")
    try:
        metadata = importlib.metadata.metadata(DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        raise RefSAM3DError(
            f"Cannot find RefSAM3D's list of requirements: no {pyproject} and no installed '{DISTRIBUTION}' "
            "distribution; reinstall the RefSAM3D extension."
        ) from None
    requirements = [r for r in (importlib.metadata.requires(DISTRIBUTION) or []) if "extra ==" not in r]
    return requirements, metadata.get("Requires-Python", "") or ""


def installed_versions(names: Sequence[str]) -> dict[str, str | None]:
    """Installed version of each distribution (``None`` if absent), by canonical name. Reads
    metadata only: nothing is imported (importing torch in Slicer's process would lock its files)."""
    versions = {}
    for name in names:
        try:
            versions[canonicalize_name(name)] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[canonicalize_name(name)] = None
    return versions


def _version_text(version: Sequence[int]) -> str:
    return ".".join(str(part) for part in version)


def plan_install(
    slicer_version: Sequence[int] | None,
    python_version: Sequence[int],
    installed: Mapping[str, str | None],
    requirements: Sequence[str],
    requires_python: str = "",
) -> InstallPlan:
    """The plan for one Python environment; pure (see the module docstring).

    Args:
        slicer_version: ``(major, minor)`` of the Slicer application, or ``None`` outside Slicer.
        python_version: ``(major, minor, micro)`` of its Python.
        installed: distribution name -> installed version or ``None``, for every requirement and
            :data:`PINNED` (names in any spelling).
        requirements: PEP 508 requirement strings (:func:`read_requirements`).
        requires_python: the package's ``requires-python`` specifier.
    """
    versions = {canonicalize_name(name): version for name, version in installed.items()}
    python_text = _version_text(python_version)
    if slicer_version is not None and tuple(slicer_version[:2]) < MINIMUM_SLICER_VERSION:
        return InstallPlan(refusal=(
            f"RefSAM3D needs 3D Slicer {_version_text(MINIMUM_SLICER_VERSION)} or newer; this is Slicer "
            f"{_version_text(slicer_version[:2])} (Python {python_text}), whose Python is too old for the "
            "packages RefSAM3D runs on. Install a current Slicer from download.slicer.org."
        ))
    if requires_python and not SpecifierSet(requires_python).contains(python_text, prereleases=True):
        return InstallPlan(refusal=(
            f"RefSAM3D needs Python {requires_python}; this Slicer's Python is {python_text}. "
            f"Use 3D Slicer {_version_text(MINIMUM_SLICER_VERSION)} or newer."
        ))
    environment = {"python_version": _version_text(python_version[:2]), "python_full_version": python_text}
    wanted = [Requirement(text) for text in requirements]
    wanted = [r for r in wanted if r.marker is None or r.marker.evaluate(environment)]

    def satisfied(requirement: Requirement) -> bool:
        version = versions.get(canonicalize_name(requirement.name))
        try:  # a local build label ("2.9.0+cu128", PyTorch Util's CUDA torch) does not matter here
            return version is not None and requirement.specifier.contains(Version(version).public, prereleases=True)
        except InvalidVersion:
            return False

    torch_requirement = None
    for requirement in wanted:
        name = canonicalize_name(requirement.name)
        version = versions.get(name)
        if name in FROM_PYTORCH_UTIL and version is None:
            torch_requirement = str(next((r.specifier for r in wanted if canonicalize_name(r.name) == "torch"), ""))
        elif name in PINNED and version is not None and not satisfied(requirement):
            if name in FROM_PYTORCH_UTIL:
                return InstallPlan(refusal=(
                    f"{requirement.name} {version} is installed but RefSAM3D needs {requirement}. RefSAM3D does not "
                    "replace it (other extensions may rely on it): open the PyTorch Util module, uninstall PyTorch, "
                    f"install it again with the version requirement '{requirement.specifier}', restart Slicer, "
                    "and click Segment again."
                ))
            return InstallPlan(refusal=(
                f"This Slicer's {requirement.name} is {version}, but RefSAM3D needs {requirement}; Slicer's own "
                f"{requirement.name} must not be replaced. Use 3D Slicer {_version_text(MINIMUM_SLICER_VERSION)} or newer."
            ))
    to_install = tuple(
        str(r) for r in wanted if canonicalize_name(r.name) not in FROM_PYTORCH_UTIL and not satisfied(r)
    )
    constraints = tuple(
        f"{name}=={versions[name]}" for name in PINNED if versions.get(name) is not None
    )
    return InstallPlan(torch_requirement=torch_requirement, pip_requirements=to_install,
                       constraints=constraints if to_install else ())


def plan_for_this_python(slicer_version: Sequence[int] | None, pyproject: Path = PYPROJECT) -> InstallPlan:
    """:func:`plan_install` for the running interpreter and what is installed in it."""
    requirements, requires_python = read_requirements(pyproject)
    names = [Requirement(text).name for text in requirements] + list(PINNED)
    return plan_install(slicer_version, tuple(sys.version_info[:3]), installed_versions(names), requirements,
                        requires_python)
