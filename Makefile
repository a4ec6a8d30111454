# The README's two commands: `make demo` and `make test`. Both install what
# they need first (tools/install-deps.sh, idempotent).
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: deps demo test lint unit bench clean

deps:
	@VENV=$(VENV) bash tools/install-deps.sh

demo: deps
	$(PY) tools/demo.py

lint: deps
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy

test: deps lint
	$(VENV)/bin/pytest

bench: deps
	$(PY) bench/run.py

clean:
	rm -rf build demo-state
