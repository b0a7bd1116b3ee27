# Two entry points: `make demo` (the main job) and `make test` (the whole suite).
# torch and torchvision are installed first as a matched pair; override TORCH_PAIR for a CUDA build
# of your own, e.g. `make demo TORCH_PAIR="torch torchvision"`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_PAIR ?= torch==2.14.1 torchvision==0.29.1

.PHONY: demo test venv clean

$(VENV)/.torch:
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet $(TORCH_PAIR)
	touch $@

$(VENV)/.installed: $(VENV)/.torch pyproject.toml
	$(PY) -m pip install --quiet -e ".[test,train]"
	touch $@

venv: $(VENV)/.installed

demo: venv
	$(PY) -m RefSAM3DLib.demo --output demo_output

test: venv
	$(PY) -m pytest Testing -q

clean:
	rm -rf $(VENV) demo_output .pytest_cache
