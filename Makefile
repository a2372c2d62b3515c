# The two commands a user types (README): `make demo` and `make test`.
# Both install what they need first, so they work on a fresh machine.
SHELL := /bin/bash
UV ?= uv

.PHONY: setup demo test lint bench protos

setup:
	@bash deploy/setup.sh

demo: setup
	$(UV) run --frozen bash deploy/demo.sh

# The written rules run first: ruff (pyproject.toml [tool.ruff]), then the tests, which include
# the architecture rules (tests/test_architecture.py). Two streams side by side (pytest-xdist,
# split by module: tests/conftest.py, APART): a third of a one-stream run's time the CPUs wait on
# cuts healing, watchdogs and ranks starting. Plain `pytest` runs one stream.
test: setup
	$(UV) run --frozen ruff check .
	$(UV) run --frozen pytest -n 2 --dist loadgroup

lint: setup
	$(UV) run --frozen ruff check .

protos:
	$(UV) run --frozen python -m protos.generate
