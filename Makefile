# The two commands: `make run` starts everything, `make test` runs every check.
# Each creates .venv when it is missing and installs the project into it, and the client (client/) beside it.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.outlast-installed

.PHONY: run test test-fast bench clean lock

$(STAMP): pyproject.toml client/pyproject.toml requirements-dev.lock
	@$(PYTHON) -c 'import sys; sys.exit("Outlast needs Python 3.11 or newer; set PYTHON=python3.X" if sys.version_info < (3, 11) else 0)'
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@# uv (pinned by the lock) installs the locked set in seconds where pip takes two minutes
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -c requirements-dev.lock uv
	$(BIN)/uv pip install --quiet --python $(BIN)/python -c requirements-dev.lock -e '.[dev]' -e ./client
	@touch $(STAMP)

run: $(STAMP)
	$(BIN)/outlast run

# The suite on TEST_WORKERS pytest processes, each with its own embedded PostgreSQL and Valkey, a test file staying
# on one, files going out as collected (tests/conftest.py puts the longest first). 0, the default and what CI runs,
# is one process: about 19 min on 2 cores. `make test TEST_WORKERS=2` took about 17 before the fuzz got faster, but on a 2-core machine the two
# crowd each other and a few chaos tests' timing bounds still fail now and then.
TEST_WORKERS ?= 0

test: $(STAMP)
	$(BIN)/ruff format --check .
	$(BIN)/ruff check .
	$(BIN)/mypy
	$(BIN)/python deploy/audit.py requirements.lock
	$(BIN)/pytest -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder

# After a change to a dependency in pyproject.toml: the pinned sets the Dockerfile, the platforms (requirements.lock)
# and `make test` (requirements-dev.lock, as constraints) install. Not through $(STAMP): the old pins may be what
# conflicts with the change.
lock:
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@test -x $(BIN)/uv || $(BIN)/python -m pip install --quiet --disable-pip-version-check uv
	$(BIN)/uv pip compile --quiet --universal --python-version 3.11 --custom-compile-command 'make lock' pyproject.toml client/pyproject.toml --extra dev -o requirements-dev.lock
	@# the shipped set within the tested one, so each package has one version in both
	$(BIN)/uv pip compile --quiet --universal --python-version 3.11 --custom-compile-command 'make lock' pyproject.toml -c requirements-dev.lock -o requirements.lock

# The quick loop while working: every check but the tests that start real processes (`slow`; CI runs them).
test-fast: $(STAMP)
	$(BIN)/ruff format --check .
	$(BIN)/ruff check .
	$(BIN)/mypy
	$(BIN)/pytest -m "not slow"

bench: $(STAMP)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e '.[dev,bench]' && $(BIN)/python -m bench

clean:
	rm -rf $(VENV) .outlast .mypy_cache .ruff_cache .pytest_cache
