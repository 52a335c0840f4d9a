# The two set-up commands: `make demo` and `make test`. Both create .venv if it is missing.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp

# Offline by design: nothing is downloaded at run time; tiny models are built into .cache/.
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export HF_HUB_DISABLE_TELEMETRY := 1
export DO_NOT_TRACK := 1
export BENTOML_DO_NOT_TRACK := true
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export TIPSEN_HOME ?= $(CURDIR)/.cache/tipsen

.PHONY: venv demo paper test test-fast bench serve clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q -e '.[test]'
	touch $@

venv: $(STAMP)

demo: venv
	PATH="$(CURDIR)/$(BIN):$$PATH" bash scripts/demo.sh

# The paper's run: all 30 keywords on the paper profile (needs a GPU and the real weights).
ALL_KEYWORDS := $(shell sed -n 's/^- {slug: \([a-z0-9_-]*\),.*/\1/p' data/keywords.yaml | paste -sd, -)
paper: venv
	PATH="$(CURDIR)/$(BIN):$$PATH" dvc exp run -S profile=paper -S 'keywords=[$(ALL_KEYWORDS)]'

# Every test, as CI runs it; installs chromium for the browser tests first where it can.
test: venv
	PATH="$(CURDIR)/$(BIN):$$PATH" bash scripts/test-deps.sh
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/python -m pytest -q -rs $(PYTEST_ARGS)

# Every test not marked slow (no servers, browser, subprocess training or benchmark runs): a few minutes.
test-fast: venv
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/python -m pytest -q -rs -m "not slow" $(PYTEST_ARGS)

bench: venv
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/python -m benchmarks

serve: venv
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/tipsen serve

clean:
	rm -rf .cache build dist *.egg-info
