# Two entry points: `make demo` (the main job) and `make test` (the whole suite).
# torch and torchvision are installed first as a matched pair; override TORCH_PAIR for a CUDA build
# of your own, e.g. `make demo TORCH_PAIR="torch torchvision"`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_PAIR ?= torch==2.14.1 torchvision==0.29.1

.PHONY: demo test venv clean

# The x86_64 torch wheels are a CUDA build: the venv grows to about 7 GB, and pip's cache would
# keep a second copy of the downloaded NVIDIA libraries (--no-cache-dir).
MIN_FREE_GB ?= 8

$(VENV)/.torch:
	@free_kb=$$(df -Pk . | awk 'NR==2 {print $$4}'); \
	if [ "$$free_kb" -lt $$(( $(MIN_FREE_GB) * 1024 * 1024 )) ]; then \
		echo "Not enough disk: the venv with torch needs about $(MIN_FREE_GB) GB free here and $$(( free_kb / 1024 / 1024 )) GB is; free some space (or MIN_FREE_GB=N to try anyway)." >&2; exit 1; fi
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet --no-cache-dir $(TORCH_PAIR)
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
