"""The fleet bench in small (issue 32): 200 simulated nodes, 2 cloud-manager processes on
a 3-master cluster with replicas; the heartbeats stretched to their rate bound and shared
between the processes, nodes taken down and found down within the bound, offloads across
the processes through a master's failover with no user in two deployments and no
deployment without its users' pointers. The full runs are `python -m bench.fleet`."""

from __future__ import annotations

from bench.fleet.run import Run


def test_a_fleet_of_200_nodes_on_2_processes_through_a_master_failover():
    # 200 nodes every 0.5 s would be 400 requests/s: the bound stretches it to 1 s.
    run = Run(200, procs=2, interval_s=0.5, max_rate=200.0, workers=2).start()
    try:
        assert run.period_s == 1.0 and run.ttl_s == 4.0
        run.warm_up(timeout=20)
        hb = run.heartbeats(5.0, down=3)
        assert hb["detected_within_bound"], hb["detection_s"]
        # down once its TTL ran out (one missed heartbeat is tolerated), not at once
        assert min(hb["detection_s"]) >= run.ttl_s - run.period_s - 1.0, hb["detection_s"]
        assert 100 <= hb["heartbeat_requests_per_s"] + hb["requests_per_s"].get(
            "refused", 0) <= 200 * 1.25, hb
        assert hb["busiest_master_share"] < 0.5, hb["ops_per_master"]

        off = run.offloads(8.0, failover=True)
        fo = off["failover"]
        assert fo["promoted_after_s"] < 8 and fo["first_offload_after_s"] is not None, off
        assert off["offloads"] > 0 and not off["failed"].get("record_failed"), off
        assert all(t > 0 for t in off["turns_won_per_process"]), off  # shared polling
        check = run.ledger_check()
        assert check["deployments"] > 0, check
        assert check["users_in_two_deployments"] == 0 == check["users_without_pointer"], check
    finally:
        run.stop()
