# First use creates .venv/ and installs the pinned dependencies. torch is installed
# first and pinned to the local CPU build: any other torch request pulls CUDA wheels.
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.anefx-installed

.PHONY: demo test lint format clean

$(STAMP): pyproject.toml requirements.lock
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -r requirements.lock
	$(PY) -m pip install -q --no-deps -e .
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/anefx convert preset:qwen3-0.6b -o build/qwen3-0.6b

# two workers for the machine's two cores; a test file stays on one worker, so its module
# fixtures (converted artifacts, lowered models) are built once
test: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(PY) -m pytest -q -n 2 --dist loadfile

format: $(STAMP)
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

clean:
	rm -rf build .pytest_cache
