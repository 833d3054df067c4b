# The two commands of the README. Both install what they need first (scripts/setup.sh).
.PHONY: setup demo test lint bench

setup:
	@./scripts/setup.sh

demo: setup
	.venv/bin/enorm-cloud demo

test: setup
	.venv/bin/ruff check .
	.venv/bin/pytest -q -p no:cacheprovider --timeout=900 tests

bench: setup
	.venv/bin/python -m bench.provisioning
	.venv/bin/python -m bench.autoscaling
	.venv/bin/python -m bench.deployment
	.venv/bin/python -m bench.jmeter_engines
