# The two commands of the README's quick start:
#   make demo   create .venv if needed, install, run the main job
#   make test   create .venv if needed, install dev deps, run every check and test
PYTHON ?= python3
# pytest workers (pytest-xdist); JOBS=0 runs the suite in this one process. Four on two cores:
# many tests wait (on a server's latency, a child's limit, a subprocess) rather than compute,
# and the suite is written to hold on a loaded machine.
JOBS   ?= 4
VENV   := .venv
BIN    := $(VENV)/bin

.PHONY: demo test lint typecheck pytest bench clean chromium

$(BIN)/python:
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "rlm needs Python >= 3.11; set PYTHON=python3.11 (found %s)" % sys.version.split()[0])'
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -q -e .
	@touch $@

$(VENV)/.installed-dev: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -q -e '.[dev,plot,browser,mcp,ray,bench]'
	@touch $@ $(VENV)/.installed

# The browser tests of `rlm view` drive Debian's chromium (Playwright never downloads a browser here).
# Installed when missing and we are root; otherwise those tests skip and say why.
chromium:
	@if [ ! -x /usr/bin/chromium ] && [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		echo "installing chromium for the browser tests (apt-get)"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null \
			|| echo "chromium could not be installed: the browser tests will skip"; \
	fi

demo: $(VENV)/.installed
	$(BIN)/python examples/demo.py

lint: $(VENV)/.installed-dev
	$(BIN)/ruff check .
	$(BIN)/ruff format --check sandbox rlm

typecheck: $(VENV)/.installed-dev
	$(BIN)/mypy

# With bytecode caching on: a machine's PYTHONDONTWRITEBYTECODE=1 made every process the tests
# start compile rlm and sandbox again, and each worker rewrite every test module (80 s of the
# suite's 760 s of CPU).
pytest: $(VENV)/.installed-dev chromium
	env -u PYTHONDONTWRITEBYTECODE $(BIN)/python -m pytest -q -n $(JOBS)

# mypy (one core, about a minute from a clean clone) runs beside the tests, not before them.
test: lint
	@$(MAKE) --no-print-directory -j2 typecheck pytest

bench: $(VENV)/.installed-dev
	$(BIN)/python bench/sandbox_overhead.py
	$(BIN)/python bench/throughput.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .hypothesis rlm.egg-info
