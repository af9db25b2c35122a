# Two entry points for a fresh clone: `make demo` and `make test`. Both create .venv with the Python
# .ci/find-python picks (the Docker image's minor version, python3 on some machines is older) and
# install exactly the versions in requirements-dev.lock, checked against their hashes.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo run test check bench lock docs clean
demo: $(STAMP)
	$(VENV)/bin/egress-sidecar demo

run: $(STAMP)
	$(VENV)/bin/egress-sidecar run

# Four workers on two cores: most of the suite's time is spent waiting on real servers and sidecar processes.
TEST_WORKERS ?= 4
test: $(STAMP)
	$(PY) -m pytest -n $(TEST_WORKERS)

bench: $(STAMP)
	$(PY) -m bench

# Dependencies from the lock (every package pinned, every file hash-checked), then the project itself
# without dependencies and without build isolation (its build backend, setuptools, is in the lock
# too). `pip check` fails when pyproject.toml names a dependency the lock lacks: run `make lock`.
$(STAMP): pyproject.toml requirements-dev.lock
	@PY=$$(bash .ci/find-python) || exit 1; \
	  [ -x $(PY) ] || $$PY -m venv $(VENV)
	@# -qq: errors only (a hash mismatch or a missing pin still fails loudly); some machines' pip
	@# configuration (find-links, local indexes) makes the venv's bundled pip warn once per package.
	$(PY) -m pip install -qq --require-hashes -r requirements-dev.lock
	$(PY) -m pip install --quiet --no-deps --no-build-isolation -e .
	$(PY) -m pip check
	@touch $(STAMP)

# The locks, regenerated from pyproject.toml after a dependency was added, removed or changed:
#   make lock              keep every other pin, resolve only what changed
#   make lock UPGRADE=1    move everything to the newest versions pyproject.toml allows
# requirements.lock: runtime dependencies + the build backend (the Docker image installs it).
# requirements-dev.lock: the same pins (-c requirements.lock) + the test and bench extras (CI, make test).
# Tool: uv's `uv pip compile`, not pip-tools' pip-compile, because it resolves for a Python version and
# platforms other than the one running it (--universal --python-version): one lock, with markers and
# hashes for every platform, serves the image (Linux, the Dockerfile's Python), CI and a developer's
# Mac, whatever interpreter runs `make lock`; pip-compile resolves only for the interpreter it runs on.
# Both files are plain requirements files, installed by pip with --require-hashes; uv is not needed to
# install them. The Python version is the Dockerfile's (tests/deploy/test_lock.py checks they agree).
UV_VERSION := 0.13.9
LOCK_VENV := .venv-lock
IMAGE_PYTHON := $(shell sed -n 's/^FROM python:\(3\.[0-9][0-9]*\)-slim.*/\1/p' Dockerfile | head -n 1)
LOCK_FLAGS = --universal --python-version $(IMAGE_PYTHON) --generate-hashes $(if $(UPGRADE),--upgrade) \
	--custom-compile-command "make lock  (uv $(UV_VERSION): uv pip compile --universal --python-version $(IMAGE_PYTHON) --generate-hashes)"
BUILD_REQUIRES = $(LOCK_VENV)/bin/python -c 'import tomllib; print(*tomllib.load(open("pyproject.toml", "rb"))["build-system"]["requires"], sep="\n")'

lock:
	@[ -x $(LOCK_VENV)/bin/python ] || { PY=$$(bash .ci/find-python) && $$PY -m venv $(LOCK_VENV); }
	$(LOCK_VENV)/bin/python -m pip install --quiet uv==$(UV_VERSION)
	$(BUILD_REQUIRES) | $(LOCK_VENV)/bin/uv pip compile --quiet pyproject.toml - $(LOCK_FLAGS) \
	  -o requirements.lock
	$(BUILD_REQUIRES) | $(LOCK_VENV)/bin/uv pip compile --quiet pyproject.toml - --extra test --extra bench \
	  -c requirements.lock $(LOCK_FLAGS) -o requirements-dev.lock

# The configuration table of docs/configuration.md, generated from the Field descriptions in
# sidecar/config.py (tests/test_docs.py fails while the two disagree).
docs: $(STAMP)
	$(PY) -c 'from sidecar.config import SETTINGS_PAGE, write_settings_table; write_settings_table(SETTINGS_PAGE)'

clean:
	rm -rf $(VENV) $(LOCK_VENV) .pytest_cache .hypothesis
