"""JMeter, Locust and wrk as the load generator, side by side in one run, on the game's
two plans: the small case (8 aggressive users) beside the paper's largest (16,384 mixed
users, about 1,950 requests/s offered), each against the same loopback edge game server.

    python -m bench.jmeter_engines [--duration 30]

Says which engine the experiments should use for which size: the rate each achieved
against the rate offered, the latencies, and the load generator's own CPU per request
(JVM or Python start-up included). Writes bench/results/jmeter_engines.json and .png.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

from bench import jmeter

OUT = Path(__file__).resolve().parent / "results"
CASES = (("aggressive", 8), ("mixed", 16_384))


def measure(duration: float, warmup: float) -> dict:
    runs = []
    most = max(u for _, u in CASES)
    with jmeter.local_edge(most, prefix="bench-engines") as (host, port, players):
        for plan, users in CASES:
            for engine in jmeter.ENGINES:
                r = jmeter.run(plan, host, port, users, duration, players=players,
                               engine=engine, warmup_s=warmup)  # fmt: skip
                row = {k: v for k, v in r.to_json().items() if k not in ("by_label", "jtl")}
                row["client_cpu_ms_per_request"] = round(1000 * r.client_cpu_s / r.requests, 3)
                runs.append(row)
                print(json.dumps({k: row[k] for k in ("plan", "users", "engine", "achieved_rate",
                                                      "target_rate", "p50", "p95", "errors",
                                                      "client_cpu_ms_per_request")}))  # fmt: skip
    return {
        "runs": runs,
        "duration_s": duration,
        "warmup_s": warmup,
        "server": "games.pokemon.edge on 127.0.0.1 (waitress, one process), own redis-server",
        "machine": platform.platform(),
        "cores": os.cpu_count(),
        "load_average_at_end": os.getloadavg(),
        "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (rate, cpu) = plt.subplots(1, 2, figsize=(10, 4))
    labels = [f"{r['plan']}\n{r['users']} users\n{r['engine']}" for r in result["runs"]]
    xs = range(len(labels))
    rate.bar(xs, [r["achieved_rate"] for r in result["runs"]], label="achieved")
    offered = [(x, r["target_rate"]) for x, r in zip(xs, result["runs"], strict=True)
               if r["target_rate"]]  # fmt: skip
    if offered:
        rate.scatter(*zip(*offered, strict=True), color="C3", marker="_", s=400, label="offered")
    rate.set_xticks(list(xs), labels, fontsize=8)
    rate.set_ylabel("requests/s")
    rate.set_title("rate")
    rate.legend(fontsize=8)
    cpu.bar(xs, [r["client_cpu_ms_per_request"] for r in result["runs"]], color="C2")
    cpu.set_xticks(list(xs), labels, fontsize=8)
    cpu.set_ylabel("ms of CPU per request (start-up included)")
    cpu.set_title("load generator's own CPU")
    fig.suptitle("JMeter, Locust and wrk on the game's plans (2 cores)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--duration", type=float, default=30)
    p.add_argument("--warmup", type=float, default=5)
    a = p.parse_args(argv)
    result = measure(a.duration, a.warmup)
    OUT.mkdir(exist_ok=True)
    (OUT / "jmeter_engines.json").write_text(json.dumps(result, indent=2) + "\n")
    plot(result, OUT / "jmeter_engines.png")


if __name__ == "__main__":
    main()
