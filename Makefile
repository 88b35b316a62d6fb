# `make demo` and `make test` set everything up on first use (see scripts/setup.sh).
VENV := .venv
STAMP := $(VENV)/.phiclip-setup

.PHONY: demo test test-lmms test-vllm test-gguf setup bench lock

# The demo is offline: HF_HUB_OFFLINE is huggingface_hub's switch (no library tries the Hub for files or kernels).
demo: $(STAMP)
	HF_HUB_OFFLINE=1 $(VENV)/bin/phiclip demo

# The newest transformers/peft lane is resolved from the package index again on every run (cached per version);
# lmms-eval gets its own locked environment (.venv-lmms) and scores the demo run (after make demo).
test: $(STAMP)
	bash scripts/newest_setup.sh
	bash scripts/lmms_setup.sh
	$(VENV)/bin/python -m pytest -q -m "not vllm and not gguf"

# Only the lmms-eval checks (tests/test_lmms_eval.py): the demo run scored by lmms-eval and by phiclip eval.
test-lmms: $(STAMP)
	bash scripts/lmms_setup.sh
	$(VENV)/bin/python -m pytest -q -m lmms

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

# Refresh the locks in requirements/ from setup.py's ranges and requirements/*.in (uv); commit the result.
lock:
	bash scripts/lock.sh

$(STAMP): setup.py scripts/setup.sh scripts/tf4_setup.sh requirements/main.lock requirements/weights.lock requirements/tf4.lock
	bash scripts/setup.sh
	touch $(STAMP)
