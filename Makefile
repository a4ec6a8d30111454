# The README's two commands: `make demo` and `make test`. Both install what
# they need first (tools/install-deps.sh, idempotent).
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: deps lock floors demo test lint unit bench chaos clean

deps:
	@VENV=$(VENV) bash tools/install-deps.sh

# The Python packages come from requirements/lock.txt (exact versions,
# hashes). `make lock` refreshes it from setup.cfg's ranges: run it on
# purpose (docs/install.md), then the whole suite on a fresh clone.
lock:
	@bash tools/lock.sh lock

# setup.cfg's floors: fcq's direct dependencies at the lowest versions it
# allows, in build/floors-venv, under the tests that exercise them (tools/lock.sh).
floors: deps
	@bash tools/lock.sh floors

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
