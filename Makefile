# The two commands of the README. Both install what they need first (scripts/setup.sh).
.PHONY: setup demo test lint bench bench-quick

setup:
	@./scripts/setup.sh

demo: setup
	.venv/bin/enorm-cloud demo

test: setup
	.venv/bin/ruff check .
	.venv/bin/pytest -q -p no:cacheprovider --timeout=900 tests

# Every bench holds the machine-wide lock: their names and ports are fixed.
# `bench`: about 40 minutes (bench.latency alone ~25: 3 access x 6 user counts x 3 targets
# x 20 s); `bench-quick`: about 2-3 minutes.
LOCK = flock /run/enorm-bench.lock
bench: setup
	$(LOCK) .venv/bin/python -m bench.provisioning
	$(LOCK) .venv/bin/python -m bench.autoscaling
	$(LOCK) .venv/bin/python -m bench.deployment
	$(LOCK) .venv/bin/python -m bench.latency

bench-quick: setup
	$(LOCK) .venv/bin/python -m bench.autoscaling --rounds 1 --only 1x1 8x1  # prints, writes no file
	$(LOCK) .venv/bin/python -m bench.latency --quick
