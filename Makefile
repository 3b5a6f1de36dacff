# The two commands a newcomer runs (README): `make demo` and `make test`. Both set up first.
PYTHON ?= python3
PYTEST_ARGS ?=

.PHONY: setup demo test lint fmt smoke

setup:
	@bash scripts/setup.sh

demo: setup
	$(PYTHON) -m sempa_dist.demo

test: setup lint
	@bash scripts/system_deps.sh  # Slurm, munge, sshd, pdsh for the multi-node tests (skipped if not root/apt)
	$(PYTHON) -m pytest -q --durations=15 $(PYTEST_ARGS)

lint:
	$(PYTHON) -m ruff check .

fmt:
	$(PYTHON) -m ruff format . && $(PYTHON) -m ruff check --fix .
