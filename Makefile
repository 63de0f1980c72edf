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

.PHONY: install system-deps run run-full test serve serve-stop bench bench-kill lock clean

$(UV):
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check uv==0.13.8

$(VENV)/.installed: pyproject.toml requirements.lock | $(UV)
	$(UV) pip install --python $(PY) --compile-bytecode $(TORCH_SOURCE) -c requirements.lock -e '.[dev]'
	touch $@

install: $(VENV)/.installed

# PostgreSQL (Debian's package) for the real-server tests and `make serve`, and Chromium with its
# driver for the MLflow UI test (tests/test_mlflow_ui.py, selenium drives /usr/bin/chromium); each
# skipped when present.
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
system-deps:
	@if ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 && ! command -v initdb >/dev/null 2>&1; then \
		echo "installing PostgreSQL (apt-get)"; \
		$(SUDO) apt-get update -qq && $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql; \
	fi
	@if [ ! -x /usr/bin/chromium ] || [ ! -x /usr/bin/chromedriver ]; then \
		echo "installing Chromium and chromedriver (apt-get)"; \
		$(SUDO) apt-get update -qq && $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver; \
	fi

# `dvc repro` with one Prefect server for the whole pipeline (flows/repro.py)
run: install
	python -m flows.repro

test: install system-deps
	pytest

# The shared setup on this machine (PostgreSQL, MLflow and Prefect servers, a worker): flows/serve.py.
serve: install system-deps
	python -m flows.serve

serve-stop: install
	python -m flows.serve stop

# The `full` profile on a GPU worker (needs network for ARCO ERA5 and a CUDA build of torch 2.13.0):
# 0.25°, 13 levels, the paper's widths, bf16 autocast; `pangu` only, as a DVC experiment.
FULL_OVERRIDES = -S 'era5_profiles=[full]' -S methods.pangu.data=data/era5/full/prepared \
	-S methods.pangu.teacher.precision=bf16 -S methods.pangu.teacher.batch_size=2 \
	-S methods.pangu.teacher.epochs=30 -S methods.pangu.teacher.lr=0.0005 \
	-S '+methods.pangu.teacher.model={embed_dim: 192, depths: [2, 6], heads: [6, 12], window: [2, 6, 12], patch: [2, 4, 4]}'

run-full: install
	dvc exp run train@pangu $(FULL_OVERRIDES)

bench: install
	python -m flows.repro digits era5_prepare video_extractors voxelize
	python benchmarks/orchestration.py
	python benchmarks/era5_prepare.py
	python benchmarks/pangu_step.py
	python benchmarks/video_features.py
	python benchmarks/voxelize.py
	python benchmarks/sps_backbone.py
	python benchmarks/ddp_scaling.py
	python benchmarks/terngrad.py

# `make run` killed with SIGKILL at 20 seeded random moments and rerun (README, Reliability)
bench-kill: install
	python benchmarks/kill_trials.py --trials 20 --methods hinton_kd

# Re-resolve the pinned tree after editing pyproject.toml.
lock: | $(UV)
	$(UV) pip compile pyproject.toml --extra dev $(TORCH_SOURCE) --python-version 3.11 -o requirements.lock

clean:
	rm -rf $(VENV) .prefect .serve .checkpoints mlflow.db mlartifacts data metrics .dvc/cache .dvc/tmp
