# The two set-up commands: `make demo` and `make test`. Both create .venv if it is missing.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp

# The demo, the tests and the benchmarks run offline (tiny models are built into .cache/); `make paper` and
# `make serve` may download the real models, so only these targets set OFFLINE.
OFFLINE := HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
export HF_HUB_DISABLE_TELEMETRY := 1
export DO_NOT_TRACK := 1
export BENTOML_DO_NOT_TRACK := true
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export TIPSEN_HOME ?= $(CURDIR)/.cache/tipsen

.PHONY: venv lock demo paper models test test-fast bench serve clean

# Every install is the same one: the locked versions first, then tipsen itself on top without resolving again.
$(STAMP): pyproject.toml requirements.lock
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q -r requirements.lock
	$(BIN)/python -m pip install -q --no-deps -e '.[test]'
	touch $@

venv: $(STAMP)

# requirements.lock from the working venv. After changing pyproject.toml: `$(BIN)/python -m pip install -e '.[test]'`,
# then `make lock` (tests/test_layout.py checks that the lock agrees with pyproject.toml's pins).
lock:
	$(BIN)/python -m pip check
	{ printf '%s\n' \
	    "# The exact versions that make venv installs for tipsen[test], on Linux x86_64 with CPython 3.11." \
	    "# Made by make lock: pip freeze --all --exclude-editable of the working .venv, less pip itself." \
	    "# To refresh: change pyproject.toml, .venv/bin/python -m pip install -e '.[test]', then make lock."; \
	  $(BIN)/python -m pip freeze --all --exclude-editable | grep -v '^pip=='; } > requirements.lock.tmp
	mv requirements.lock.tmp requirements.lock
	$(BIN)/python scripts/bento-lock.py

demo: venv
	$(OFFLINE) PATH="$(CURDIR)/$(BIN):$$PATH" bash scripts/demo.sh

# The paper's run: all 30 keywords on the paper profile (needs a GPU and the real weights).
ALL_KEYWORDS := $(shell sed -n 's/^- {slug: \([a-z0-9_-]*\),.*/\1/p' data/keywords.yaml | paste -sd, -)
paper: venv
	PATH="$(CURDIR)/$(BIN):$$PATH" tipsen models fetch --profile paper
	PATH="$(CURDIR)/$(BIN):$$PATH" dvc exp run -S profile=paper -S 'keywords=[$(ALL_KEYWORDS)]'

# Download every Hub model of the active profile (TIPSEN_PROFILE, or params.yaml's), safetensors only.
models: venv
	PATH="$(CURDIR)/$(BIN):$$PATH" tipsen models fetch

# Every test, as CI runs it; installs chromium for the browser tests first where it can.
test: venv
	PATH="$(CURDIR)/$(BIN):$$PATH" bash scripts/test-deps.sh
	$(OFFLINE) PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/python -m pytest -q -rs $(PYTEST_ARGS)

# Every test not marked slow (no servers, browser, subprocess training or benchmark runs): a few minutes.
test-fast: venv
	$(OFFLINE) PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/python -m pytest -q -rs -m "not slow" $(PYTEST_ARGS)

bench: venv
	$(OFFLINE) PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/python -m benchmarks

serve: venv
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/tipsen serve

clean:
	rm -rf .cache build dist *.egg-info
