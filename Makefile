# `make demo` and `make test` set everything up on first use (see scripts/setup.sh).
VENV := .venv
STAMP := $(VENV)/.phiclip-setup

.PHONY: demo test test-vllm test-gguf setup bench

demo: $(STAMP)
	$(VENV)/bin/phiclip demo

test: $(STAMP)
	$(VENV)/bin/python -m pytest -q -m "not vllm and not gguf"

# vLLM serving an exported run (own venv, minutes to start): see README.
test-vllm: $(STAMP)
	bash scripts/vllm_setup.sh
	$(VENV)/bin/python -m pytest -q -m vllm

# The GGUF export checked in llama.cpp (llama-cpp-python in .venv-llama, built from source on first use): see README.
test-gguf: $(STAMP)
	bash scripts/llamacpp_setup.sh
	$(VENV)/bin/python -m pytest -q -m gguf

bench: $(STAMP)
	$(VENV)/bin/python benchmarks/generate.py

setup: $(STAMP)

$(STAMP): setup.py scripts/setup.sh scripts/tf4_setup.sh
	bash scripts/setup.sh
	touch $(STAMP)
