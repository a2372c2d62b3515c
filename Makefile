# The two commands a user types (README): `make demo` and `make test`.
# Both install what they need first, so they work on a fresh machine.
SHELL := /bin/bash
UV ?= uv

.PHONY: setup demo test bench protos

setup:
	@bash deploy/setup.sh

demo: setup
	$(UV) run --frozen bash deploy/demo.sh

test: setup
	$(UV) run --frozen pytest

protos:
	$(UV) run --frozen python -m protos.generate
