# The two commands of the README. Both install what they need first (scripts/setup.sh).
.PHONY: setup demo test lint bench bench-quick reliability boards boards-quick

setup:
	@./scripts/setup.sh

demo: setup
	.venv/bin/enorm-demo

# The tests also run an arm64 container (tests/e2e/test_foreign_arch.py) and check the
# armhf image build (tests/integration/test_image_build.py): qemu-user and both binfmt_misc
# registrations come with them, not with `make demo`.
test:
	@./scripts/setup.sh --foreign arm64 --foreign armhf
	.venv/bin/ruff check .
	.venv/bin/pytest -q -p no:cacheprovider -n 2 --dist loadfile --timeout=900 --durations=15 tests

# Long versions of the hostile-input and crash-safety tests (figures in RELIABILITY.md).
reliability: setup
	ENORM_FUZZ_SECONDS=300 ENORM_FUZZ_MIN_REQUESTS=10000 .venv/bin/pytest -q -s -p no:cacheprovider --timeout=3600 \
		tests/integration/test_fuzz.py tests/integration/test_hostile_input.py \
		tests/integration/test_bounded_tenancy.py tests/integration/test_secrets.py \
		tests/integration/test_edge_node.py tests/integration/test_datasync.py \
		tests/integration/test_pokemon_servers.py tests/e2e -k "fuzz or hostile or tenancy or secret or kill or crash or gone or lost or reconcile or unreachable or restart"
	flock /run/enorm-bench.lock flock /run/enorm-bench-soak.lock .venv/bin/python -m bench.soak

# Every bench holds the machine-wide lock: their names and ports are fixed.
# `bench`: about two hours (bench.latency ~27 min: 3 access x 7 user counts x 3 targets
# x 20 s; bench.mixed ~26; bench.peers ~15; bench.slo ~12; bench.mobility ~10; bench.handover ~6;
# bench.placement ~3; bench.fleet ~10, its partition ~2; bench.delayers ~2);
# `bench-quick`: under 5 minutes (it uses the calibration in bench/results and writes to
# /tmp/enorm-bench-quick).
LOCK = flock /run/enorm-bench.lock
bench: setup
	$(LOCK) .venv/bin/python -m bench.provisioning
	$(LOCK) .venv/bin/python -m bench.autoscaling
	$(LOCK) .venv/bin/python -m bench.deployment
	$(LOCK) .venv/bin/python -m bench.jmeter_engines
	$(LOCK) .venv/bin/python -m bench.delayers
	$(LOCK) .venv/bin/python -m bench.calibration
	$(LOCK) .venv/bin/python -m bench.overheads
	$(LOCK) .venv/bin/python -m bench.latency
	$(LOCK) .venv/bin/python -m bench.mixed
	$(LOCK) .venv/bin/python -m bench.peers
	$(LOCK) .venv/bin/python -m bench.basic_service
	$(LOCK) .venv/bin/python -m bench.pressure
	$(LOCK) .venv/bin/python -m bench.slo
	$(LOCK) .venv/bin/python -m bench.handover
	$(LOCK) .venv/bin/python -m bench.placement
	$(LOCK) .venv/bin/python -m bench.fleet --faults
	$(LOCK) .venv/bin/python -m bench.fleet.partition
	$(LOCK) .venv/bin/python -m bench.mobility

bench-quick: setup
	$(LOCK) .venv/bin/python -m bench.autoscaling --rounds 1 --only 1x1 8x1  # prints, writes no file
	$(LOCK) .venv/bin/python -m bench.overheads --quick --users 1 --runs 1 --out /tmp/enorm-bench-quick
	$(LOCK) .venv/bin/python -m bench.latency --quick --out /tmp/enorm-bench-quick
	$(LOCK) .venv/bin/python -m bench.mixed --quick --out /tmp/enorm-bench-quick
	$(LOCK) .venv/bin/python -m bench.basic_service --hour-s 2 --out /tmp/enorm-bench-quick
	$(LOCK) .venv/bin/python -m bench.pressure --runs 1 --out /tmp/enorm-bench-quick/pressure.json

# The board lab (bench/boards): Debian 12 arm64 and amd64 VMs under QEMU TCG, provisioned
# from zero by the playbook, the whole cycle on each; results in bench/results/boards.json.
# The two boards run side by side (each TCG VM keeps about one core busy); `python -m
# bench.boards --serial` runs them one after the other, for a host with one core or
# without ~3 GB available per board (the lab falls back to it by itself there, saying why).
# `boards-quick`: the amd64 board and the cycle alone (/tmp/enorm-boards-quick.json),
# started from its provisioned disk saved by an earlier run (/var/cache/enorm/boards/
# amd64/provisioned-<key>.qcow2) with the playbook run once to converge it; without one it
# provisions from zero and saves it. amd64, not arm64: the arm64 board's playbook run on a
# provisioned board took 5-9.5 min under TCG here (amd64's 3-5), and its offload up to
# 108 s: its quick run from its provisioned disk took 12.5 min (BENCHMARKS.md).
# Its own lock (not the benches'): its ports are free ones, its caches shared.
boards: setup
	flock /run/enorm-boards.lock nice -n 10 .venv/bin/python -m bench.boards
boards-quick: setup
	flock /run/enorm-boards.lock nice -n 10 .venv/bin/python -m bench.boards --quick
