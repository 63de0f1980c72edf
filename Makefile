# Two commands for a fresh clone: `make run` (the default pipeline) and `make test`.
# Both create .venv and install the pinned stack when needed.
VENV   ?= .venv
PYTHON ?= python3
PY     := $(VENV)/bin/python
UV     := $(VENV)/bin/uv
export PATH := $(abspath $(VENV))/bin:$(PATH)
export PREFECT_SERVER_ANALYTICS_ENABLED ?= false

# torch's CPU wheel: the machine's local wheel directory when it names one, else PyTorch's CPU index.
ifdef PIP_FIND_LINKS
TORCH_SOURCE := --find-links $(PIP_FIND_LINKS)
else
TORCH_SOURCE := --extra-index-url https://download.pytorch.org/whl/cpu --index-strategy unsafe-best-match
endif

.PHONY: install run test bench lock clean

$(VENV)/.installed: pyproject.toml requirements.lock
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check uv==0.13.8
	$(UV) pip install --python $(PY) --compile-bytecode $(TORCH_SOURCE) -c requirements.lock -e '.[dev]'
	touch $@

install: $(VENV)/.installed

run: install
	dvc repro

test: install
	pytest

bench: install
	dvc repro digits era5_prepare
	python benchmarks/orchestration.py
	python benchmarks/era5_prepare.py
	python benchmarks/pangu_step.py

# Re-resolve the pinned tree after editing pyproject.toml.
lock: install
	$(UV) pip compile pyproject.toml --extra dev $(TORCH_SOURCE) --python-version 3.11 -o requirements.lock

clean:
	rm -rf $(VENV) .prefect mlflow.db mlartifacts data metrics .dvc/cache .dvc/tmp
