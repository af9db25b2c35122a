# Two entry points for a fresh clone: `make demo` and `make test`. Both create .venv with a
# Python >= 3.12 found by .ci/find-python (python3 on some machines is older).
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo run test check bench clean
demo: $(STAMP)
	$(VENV)/bin/egress-sidecar demo

run: $(STAMP)
	$(VENV)/bin/egress-sidecar run

test: $(STAMP)
	$(PY) -m pytest

bench: $(STAMP)
	$(PY) -m pip install --quiet -e '.[bench]'
	$(PY) -m bench

$(STAMP): pyproject.toml
	@PY=$$(bash .ci/find-python) || exit 1; \
	  [ -x $(PY) ] || $$PY -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	@touch $(STAMP)

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis
