"""The first-run install in Slicer, planned without Slicer: refuse, ask PyTorch Util, or one pip
run whose constraints keep torch, torchvision, numpy and SimpleITK as they are."""

from __future__ import annotations

from pathlib import Path

import pytest
from packaging.requirements import Requirement

from RefSAM3DLib.install_plan import InstallPlan, plan_install, read_requirements

ROOT = Path(__file__).resolve().parents[1]
REQUIREMENTS, REQUIRES_PYTHON = read_requirements()
SLICER_NUMPY = {"numpy": "2.2.6", "SimpleITK": "2.5.2"}
CUDA_TORCH = {"torch": "2.9.0+cu128", "torchvision": "0.24.0+cu128"}
WORKER = [r for r in REQUIREMENTS if Requirement(r).name.lower() not in ("torch", "torchvision", "numpy", "simpleitk")]


def plan(slicer, python, installed) -> InstallPlan:
    return plan_install(slicer, python, installed, REQUIREMENTS, REQUIRES_PYTHON)


def test_requirements_are_read_from_pyproject_the_one_list():
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11; 3.10 reads the installed metadata
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert REQUIREMENTS == project["dependencies"] and REQUIRES_PYTHON == project["requires-python"]
    assert any(r.startswith("monai") for r in REQUIREMENTS)


def test_slicer_5_8_is_refused_with_a_clear_message():
    result = plan((5, 8), (3, 9, 10), {**SLICER_NUMPY, **CUDA_TORCH})
    assert result.refusal and "5.10 or newer" in result.refusal and "Slicer 5.8" in result.refusal
    assert not result.pip_requirements and result.torch_requirement is None


def test_slicer_5_10_with_a_cuda_torch_leaves_torch_alone_and_installs_the_rest_in_one_constrained_run():
    result = plan((5, 10), (3, 12, 10), {**SLICER_NUMPY, **CUDA_TORCH})
    assert result.refusal is None and result.torch_requirement is None
    assert list(result.pip_requirements) == WORKER
    assert set(result.constraints) == {"torch==2.9.0+cu128", "torchvision==0.24.0+cu128", "numpy==2.2.6", "simpleitk==2.5.2"}
    arguments = result.pip_arguments("c.txt")
    assert arguments[0] == "install" and arguments[-2:] == ["--constraint", "c.txt"]
    assert not any(Requirement(a).name.lower() in ("torch", "torchvision", "numpy", "simpleitk")
                   for a in arguments[1:-2])


def test_slicer_5_10_without_torch_asks_pytorch_util_first():
    result = plan((5, 10), (3, 12, 10), SLICER_NUMPY)
    torch = next(Requirement(r) for r in REQUIREMENTS if r.startswith("torch") and not r.startswith("torchvision"))
    assert result.refusal is None and result.torch_requirement == str(torch.specifier)
    assert list(result.pip_requirements) == WORKER
    assert "torch" not in " ".join(result.constraints)


def test_an_old_torch_is_not_replaced_but_refused_with_what_to_do():
    result = plan((5, 10), (3, 12, 10), {**SLICER_NUMPY, "torch": "1.13.1", "torchvision": "0.14.1"})
    assert result.refusal and "PyTorch Util" in result.refusal and "1.13.1" in result.refusal


def test_slicers_own_numpy_is_never_replaced():
    result = plan((5, 10), (3, 12, 10), {**CUDA_TORCH, "numpy": "1.21.0", "SimpleITK": "2.5.2"})
    assert result.refusal and "numpy" in result.refusal


def test_everything_installed_means_nothing_to_do():
    installed = {**SLICER_NUMPY, **CUDA_TORCH}
    installed.update({Requirement(r).name: "99.0" for r in WORKER})
    result = plan((5, 10), (3, 12, 10), installed)
    assert result.nothing_to_do and not result.constraints


@pytest.mark.parametrize("python", [(3, 9, 10)])
def test_a_python_older_than_requires_python_is_refused_even_in_a_new_slicer(python):
    assert "Python" in plan((5, 10), python, SLICER_NUMPY).refusal
