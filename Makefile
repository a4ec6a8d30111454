# The README's two commands: `make demo` and `make test`. Both install what
# they need first (tools/install-deps.sh, idempotent).
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: deps demo test lint unit bench chaos clean

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

# N live migrations, one random fault each, invariants checked throughout
# (tests/chaos.py); about a minute per run. Not part of `make test`: its
# findings are about the migration protocol. SEED=S replays a campaign.
N ?= 10
chaos: deps
	$(PY) -m tests.chaos --runs $(N) $(if $(SEED),--seed $(SEED))

clean:
	rm -rf build demo-state
