# meshai: `make demo` runs a local swarm; `make test` installs what the tests need and runs them.
VENV   ?= .venv
PYTHON ?= python3
PY      = $(VENV)/bin/python
STAMP   = $(VENV)/.meshai-installed

.PHONY: demo test lint typecheck pytest system-deps convert-env clean

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	@touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/meshai sim --nodes 3 --profiles cpu,gpu,npu --pace --model squeezenet --requests 200 --objective throughput --stages 3

system-deps:
	@bash scripts/system-deps.sh

lint: $(STAMP)
	$(VENV)/bin/ruff check meshai nodes scheduler tests examples
	$(VENV)/bin/ruff format --check meshai nodes scheduler tests examples

typecheck: $(STAMP)
	$(VENV)/bin/mypy meshai scheduler nodes

convert-env:
	@PYTHON=$(PYTHON) bash scripts/convert-env.sh

pytest: $(STAMP) system-deps convert-env
	$(VENV)/bin/pytest -q -ra

test: lint typecheck pytest

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
