"""A cloud-manager process cut off from the cluster, at the bench's size and with the
library's own client settings (5 s socket timeout, 2 s to connect): `python -m
bench.fleet.partition [--nodes 1000] [--cut 40]`.

4 processes offload (each offload held `--deploy` s between its admission and its record,
so that the cut finds some in flight); the last runs in a network namespace of its own
(made as the tests make a user's: `tests.nodes.user_namespace`, its number held by the
tests' lock), and for `--cut` s its packets to and from the cluster's ports are dropped
there (`Run.partition`). Measured: what it had in flight and what became of it, the
others' take-overs, how long its failing offloads took to fail and with what error, its
redirects while cut off (none may come after its leases could have lapsed), its first
offload once healed, and the ledger against the nodes after.
Results: bench/results/fleet-partition.json.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

from bench.fleet.__main__ import RESULTS
from bench.fleet.run import Run
from tests.nodes import node_index, release_index, user_namespace


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--nodes", type=int, default=1000)
    ap.add_argument("--procs", type=int, default=4)
    ap.add_argument("--cut", type=float, default=40.0)
    ap.add_argument("--before", type=float, default=5.0)
    ap.add_argument("--deploy", type=float, default=0.5)
    ap.add_argument("--lease", type=float, default=8.0)
    ap.add_argument("--out", type=Path, default=RESULTS / "fleet-partition.json")
    a = ap.parse_args()
    load = os.getloadavg()
    n = node_index()
    try:
        with user_namespace(n) as (ns, _, host):
            run = Run(a.nodes, procs=a.procs, orphans_interval_s=5.0, orphans_grace_s=5.0,
                      orphans_max_rate=400.0, lease_s=a.lease, deploy_s=a.deploy,
                      host=host, netns=ns).start()
            try:
                run.warm_up(timeout=run.period_s * 3 + 60)
                res = run.partitioned(a.before, a.cut, after_s=60.0)
                res["ledger"] = run.ledger_check()
            finally:
                run.stop()
    finally:
        release_index(n)
    res = {"when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
           "settings": vars(a) | {"out": str(a.out)}, "load_before": load,
           "load_after": os.getloadavg(), **res}
    a.out.write_text(json.dumps(res, indent=1) + "\n")
    print(json.dumps(res), flush=True)


if __name__ == "__main__":
    main()
