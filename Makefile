# `make demo` and `make test` set everything up on first use (see scripts/setup.sh).
VENV := .venv
STAMP := $(VENV)/.vlmtune-setup

.PHONY: demo test setup bench

demo: $(STAMP)
	$(VENV)/bin/vlmtune demo

test: $(STAMP)
	$(VENV)/bin/python -m pytest -q

bench: $(STAMP)
	$(VENV)/bin/python benchmarks/generate.py

setup: $(STAMP)

$(STAMP): pyproject.toml scripts/setup.sh
	bash scripts/setup.sh
	touch $(STAMP)
