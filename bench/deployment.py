"""Benchmark the provisioning cycle: deployment and termination (with the data merged
back) of the game server on a real edge node, for 1 and 16,384 offloaded users.

    python -m bench.deployment [--runs 5]

Starts its own edge node (`enorm serve`, name `bdep`, bridge `enbdep`, subnet
10.89.250.0/24, host ports 50100-50199, state in a temp dir, the paper's unit of 1 core
and 200 MB), a cloud Redis and the cloud game server on loopback; creates the users
through the game's own logic (log in, move, catch) so the data is shaped as the game
makes it. deploy_s = handshake -> SSH -> upload + start || copy the users' keys ->
server answers -> users redirected. terminate_s = users redirected back -> DELETE (the
edge merges the data into the cloud Redis, verified) -> data confirmed on the cloud.
Writes bench/results/deployment.json and deployment.png; `keys_lost` counts cloud keys
missing or different after all cycles.

`--heavy` adds, after the game's data, the heavy data set of `bench/heavy_data.py` (every
Redis type, large values, TTLs: about 118,000 keys and 29 MB at 16,384 users) and runs
the same cycle on it; in each run, while the server is deployed, the same keys are also
moved by the bare floor (a DUMP/RESTORE pipeline, no script, no verification) between
the same two Redis servers on the same paths: cloud -> container through the cloud
manager's SSH forward (the deploy's path), container -> cloud directly (the node's merge
path). Then a quarter of the users play on the edge (their user hash, location and inbox
change) before the termination, so that the merge has real changes to write (a key the
edge left as copied is not rewritten: `untouched`). MB/s of enorm's data stages are
reported beside the floor's; the floor moves every key.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import redis
import requests

from bench import heavy_data
from cloud_manager import CloudManager, EdgeClient
from enorm import datasync
from enorm.protocol import DataSink, User
from games.local import CloudServer, LocalEdgeNode, LocalRedis, free_port
from games.pokemon import cloud as game_cloud
from games.pokemon import keys
from games.pokemon.app import app as pokemon_app
from games.pokemon.logic import Game, GameError

OUT = Path(__file__).resolve().parent / "results"
SIZES = (1, 16_384)
TOKEN = "bench-token"
SPOTS = [(51.5072, -0.1276), (48.8566, 2.3522), (52.52, 13.405), (40.4168, -3.7038)]


def make_users(client: redis.Redis, n: int) -> list[str]:
    """n users as the game makes them: created, located, some Pokemon caught."""
    game = Game(client)
    ids = []
    for i in range(n):
        uid, _, _ = game.create_or_login("bench", f"player{i}", f"player{i}")
        lat, lng = SPOTS[i % len(SPOTS)]
        game.update_location(uid, lat + (i % 97) * 0.01, lng + (i % 89) * 0.01)
        for w in game.wild(uid)["wild"][: i % 4]:
            try:
                game.catch(uid, w["spawn"])
            except GameError:
                pass
        ids.append(uid)
    return ids


# Fills the cloud with `n` keys of other users (strings `loc:{o<i>}`), 100,000 per call.
_FILL = """
local start, n = tonumber(ARGV[1]), tonumber(ARGV[2])
for i = start, start + n - 1 do redis.call('SET', 'loc:{o' .. i .. '}', '51.5,-0.12') end
return n
"""


def fill_others(cloud: redis.Redis, n: int) -> None:
    fill = cloud.register_script(_FILL)
    for start in range(0, n, 100_000):
        fill(args=[start, min(100_000, n - start)])


def cloud_size_runs(manager: CloudManager, cloud: redis.Redis, big: int, runs: int) -> dict:
    """Offload 1 and 64 users from a cloud of ~320 keys (64 users), then from the same
    cloud with `big` keys of other users: by the game's key schema, and once by scan."""
    cloud.flushall()
    users = make_users(cloud, 64)
    out: dict = {"cloud_keys": {}, "data_s": {}, "total_s": {}}

    def offload(label: str, n: int, reps: int) -> None:
        for _ in range(reps):
            try:
                dep = manager.offload([User(id=u, address="127.0.0.1") for u in users[:n]])
            except Exception as exc:  # noqa: BLE001 (one retry, counted in the result)
                print(f"{label} {n} users: offload failed ({exc}); once more", flush=True)
                out.setdefault("retried", []).append(f"{label}/{n}: {exc}")
                dep = manager.offload([User(id=u, address="127.0.0.1") for u in users[:n]])
            manager.withdraw(dep)
            if dep.state != "withdrawn" or not dep.confirmed:
                raise RuntimeError(f"{label} {n} users: {dep.state}")
            out["data_s"].setdefault(f"{label}/{n}", []).append(dep.timings["data"])
            out["total_s"].setdefault(f"{label}/{n}", []).append(dep.timings["total"])
        print(f"{label:>6} {n:>3} users: data p50 "
              f"{statistics.median(out['data_s'][f'{label}/{n}']):.3f} s", flush=True)

    out["cloud_keys"]["small"] = cloud.dbsize()
    for n in (1, 64):
        offload("small", n, runs)
    t = time.perf_counter()
    fill_others(cloud, big)
    out["fill_s"] = time.perf_counter() - t
    out["cloud_keys"]["big"] = cloud.dbsize()
    for n in (1, 64):
        offload("big", n, runs)
    schema, manager.app.key_schema = manager.app.key_schema, None
    try:
        offload("scan", 64, 1)  # the old way, for comparison: one run is enough
    finally:
        manager.app.key_schema = schema
    p50 = {k: statistics.median(v) for k, v in out["data_s"].items()}
    out["data_p50_s"] = p50
    out["ratio_big_to_small"] = {n: round(p50[f"big/{n}"] / p50[f"small/{n}"], 2)
                                 for n in (1, 64)}
    out["total_p50_s"] = {k: statistics.median(v) for k, v in out["total_s"].items()}
    return out


def heavy_runs(manager: CloudManager, cloud: redis.Redis, cloud_url: str, users: list[str],
               runs: int, node: LocalEdgeNode) -> dict:
    """The cycle on the heavy data set, each run beside the bare floor on the same paths.
    The floor to the cloud and the termination are metered (`heavy_data.Meter`: CPU of
    each Redis by command, of the node and the bench, of the container and its
    throttling) beside the node's own merge time (its metrics), under `trace`."""
    heavy_data.add(cloud, users)
    keys_of = datasync.user_keys(cloud, users)
    schema, manager.app.key_schema = manager.app.key_schema, heavy_data.schema(
        manager.app.key_schema or datasync.KeySchema())
    out: dict = {"keys": len(keys_of), "runs": [], "ttl_keys": 0}
    pipe = cloud.pipeline(transaction=False)
    for k in keys_of:
        pipe.pttl(k)
    out["ttl_keys"] = sum(1 for t in pipe.execute() if t > 0)
    try:
        for run in range(runs):
            dep = manager.offload([User(id=u, address="127.0.0.1") for u in users])
            to_edge = heavy_data.bare_copy(cloud_url, dep.redis_forward(), keys_of)
            pw = dep.setup.redis_password
            direct = f"redis://:{pw}@{dep.setup.address}:6379/0"
            watched = datasync.connect(direct, timeout=1)
            meter = heavy_data.Meter(cloud, watched, f"{node.config.container_prefix}*",
                                     {"node": node.proc.pid, "bench": os.getpid()})
            meter.start()
            to_cloud = heavy_data.bare_copy(direct, cloud_url, keys_of)
            floor_trace = meter.stop()
            edge = datasync.connect(direct, timeout=30)
            played = heavy_data.play(edge, users)
            # What the cloud must hold afterwards: the edge's final state, every type.
            final = datasync.digests(edge, keys_of, "source")
            edge.close()
            merge_s = _merge_seconds(node)
            t = time.perf_counter()
            manager.users_home(dep)  # `withdraw` in its two steps; the node's is metered
            dep.timings["restore"] = time.perf_counter() - t
            meter.start()
            manager.merge_home(dep)
            trace = meter.stop()
            dep.timings["withdraw_total"] = dep.timings["restore"] + dep.timings["terminate"]
            trace["node_merge_s"] = round(_merge_seconds(node) - merge_s, 4)
            watched.close()
            if dep.state != "withdrawn" or not dep.confirmed:
                raise RuntimeError(f"heavy run {run}: {dep.state}")
            r = {k: round(v, 4) for k, v in dep.timings.items()} | {
                "keys": dep.copy.keys, "bytes": dep.copy.bytes,
                "keys_migrated": dep.keys_migrated,
                "untouched": dep.merge.untouched if dep.merge is not None else None,
                "keys_changed_on_edge": played,
                "floor_to_edge_s": round(to_edge["seconds"], 4),
                "floor_to_cloud_s": round(to_cloud["seconds"], 4),
                "trace": {"merge": trace, "floor_to_cloud": floor_trace}}  # fmt: skip
            after = datasync.digests(cloud, keys_of)
            r["keys_lost"] = sum(1 for k in keys_of if after[k] != final[k])
            out["runs"].append(r)
            print(f"heavy run {run}: deploy {r['total']:.3f} s (data {r['data']:.3f}, floor "
                  f"{r['floor_to_edge_s']:.3f}), terminate {r['withdraw_total']:.3f} s "
                  f"(merge {r['terminate']:.3f}, floor {r['floor_to_cloud_s']:.3f}), "
                  f"{r['keys']} keys {r['bytes'] / 1e6:.1f} MB", flush=True)
    finally:
        manager.app.key_schema = schema
    out["keys_lost"] = sum(r["keys_lost"] for r in out["runs"])
    med = lambda f: statistics.median(f(r) for r in out["runs"])  # noqa: E731
    mb = med(lambda r: r["bytes"]) / 1e6
    out["mb"] = round(mb, 1)
    out["deploy_p50_s"] = round(med(lambda r: r["total"]), 3)
    out["terminate_p50_s"] = round(med(lambda r: r["withdraw_total"]), 3)
    out["data_mb_s"] = round(mb / med(lambda r: r["data"]), 1)
    out["merge_mb_s"] = round(mb / med(lambda r: r["terminate"]), 1)
    out["floor_mb_s"] = {"to_edge": round(mb / med(lambda r: r["floor_to_edge_s"]), 1),
                         "to_cloud": round(mb / med(lambda r: r["floor_to_cloud_s"]), 1)}
    out["ratio_to_floor"] = {
        "data": round(med(lambda r: r["data"]) / med(lambda r: r["floor_to_edge_s"]), 2),
        "merge": round(med(lambda r: r["terminate"]) / med(lambda r: r["floor_to_cloud_s"]), 2)}
    return out


def _merge_seconds(node: LocalEdgeNode) -> float:
    """The node's merges so far, in seconds (its `enorm_merge_duration_seconds` sum: the
    fence, the drain and the merge of each termination)."""
    r = requests.get(node.url + "/metrics", timeout=10,
                     headers={"Authorization": f"Bearer {node.operator_token()}"})
    r.raise_for_status()
    for line in r.text.splitlines():
        if line.startswith("enorm_merge_duration_seconds_sum"):
            return float(line.split()[-1])
    return 0.0


def _stats(xs: list[float]) -> dict:
    return {"p50": statistics.median(xs), "min": min(xs), "max": max(xs), "n": len(xs),
            "runs": xs}  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--sizes", type=int, nargs="*", default=list(SIZES))
    p.add_argument("--cloud-keys", type=int, default=10_000_000,
                   help="keys of other users in the big cloud (0: skip that part)")
    p.add_argument("--heavy", action="store_true",
                   help="also the heavy data set at the largest size, against the floor")
    p.add_argument("--cloud-size-only", action="store_true",
                   help="only the small-cloud/big-cloud part, into deployment_cloud_size.json")
    a = p.parse_args(argv)
    if a.cloud_size_only:
        a.sizes = []
    by_cloud_size: dict = {}
    heavy: dict = {}

    deploy: dict[str, list[float]] = {}
    terminate: dict[str, list[float]] = {}
    parts: dict[str, list[dict]] = {}
    lost = 0
    with tempfile.TemporaryDirectory(prefix="enorm-bench-deploy-") as tmp:
        node = LocalEdgeNode(name="bdep", listen_port=18990, state_dir=f"{tmp}/state",
                             bridge="enbdep", subnet="10.89.250.0/24",
                             port_range=[50100, 50199], cores=2.0, memory_mb=4096,
                             reserve_cores=0.0, reserve_memory_mb=0,
                             basic_service="reserve", tokens={TOKEN: "bench"},
                             autoscale_interval_s=3600)  # fmt: skip
        store = LocalRedis()
        server = manager = None
        try:
            node.start()
            cloud = datasync.connect(store.url, timeout=30)
            port = free_port("0.0.0.0")
            url = f"http://127.0.0.1:{port}"
            app = game_cloud.create_app(cloud, public_url=url)
            manager = CloudManager(
                [EdgeClient(node.url, TOKEN, name="bdep")],
                pokemon_app(cloud, cloud_port=port),
                cloud_redis=cloud,
                sink=DataSink(url=store.url, shared_patterns=keys.SHARED_PATTERNS),
                callback_url=f"{url}/edge-events",
            )
            app.register_blueprint(manager.blueprint())
            server = CloudServer(app, port=port)
            t = time.perf_counter()
            users = make_users(cloud, max(a.sizes, default=0))
            print(f"{len(users)} users made in {time.perf_counter() - t:.1f} s", flush=True)
            before = datasync.read_typed(cloud, datasync.user_keys(cloud), "source")
            for size in a.sizes:
                for run in range(a.runs):
                    dep = manager.offload([User(id=u, address="127.0.0.1") for u in users[:size]])
                    manager.withdraw(dep)
                    if dep.state != "withdrawn" or not dep.confirmed:
                        raise RuntimeError(f"run {run} at {size} users: {dep.state}")
                    d = dep.timings["total"]
                    w = dep.timings["withdraw_total"]
                    deploy.setdefault(str(size), []).append(d)
                    terminate.setdefault(str(size), []).append(w)
                    parts.setdefault(str(size), []).append(
                        {k: round(v, 4) for k, v in dep.timings.items()}
                        | {"keys": dep.copy.keys, "keys_migrated": dep.keys_migrated})
                    print(f"{size:>6} users run {run}: deploy {d:.3f} s, terminate {w:.3f} s "
                          f"({dep.copy.keys} keys; {dep.timings})", flush=True)
            after = datasync.read_typed(cloud, list(before), "destination")
            lost = sum(1 for k, v in before.items() if after.get(k) != v)
            if a.heavy and users:
                heavy = heavy_runs(manager, cloud, store.url, users, a.runs, node)
                lost += heavy["keys_lost"]
            if a.cloud_keys:
                by_cloud_size = cloud_size_runs(manager, cloud, a.cloud_keys, a.runs)
        finally:
            if manager is not None:
                manager.close()
            if server is not None:
                server.close()
            try:
                node.close()
            finally:
                store.close()

    result = {
        "heavy": heavy,
        "deploy_s": {k: _stats(v) for k, v in deploy.items()},
        "terminate_s": {k: _stats(v) for k, v in terminate.items()},
        "keys_lost": lost,
        "cloud_size": by_cloud_size,
        "stages": parts,
        "targets": {"deploy_s": 2.0, "terminate_s": 1.0},
        "machine": platform.platform(),
        "unit": {"cores": 1.0, "memory_mb": 200},
    }
    OUT.mkdir(parents=True, exist_ok=True)
    if a.cloud_size_only:  # the sizes' figures stay as the last full run left them
        (OUT / "deployment_cloud_size.json").write_text(json.dumps(by_cloud_size, indent=1))
        print("cloud size: data p50", by_cloud_size["data_p50_s"],
              "ratio big/small", by_cloud_size["ratio_big_to_small"])
        return
    (OUT / "deployment.json").write_text(json.dumps(result, indent=1))
    plot(result, OUT / "deployment.png")
    for what in ("deploy_s", "terminate_s"):
        print(what, {k: round(v["p50"], 3) for k, v in result[what].items()})
    print("keys_lost", lost)
    if heavy:
        print("heavy:", {k: heavy[k] for k in ("keys", "mb", "deploy_p50_s", "terminate_p50_s",
                                               "data_mb_s", "merge_mb_s", "floor_mb_s")})
    if by_cloud_size:
        print("cloud size: data p50", {k: round(v, 4) for k, v in
                                       by_cloud_size["data_p50_s"].items()},
              "ratio big/small", by_cloud_size["ratio_big_to_small"])


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = list(result["deploy_s"])
    cs = result.get("cloud_size") or {}
    fig, axes = plt.subplots(1, 2 if cs else 1, figsize=(11 if cs else 6, 4), squeeze=False)
    ax = axes[0][0]
    width = 0.38
    xs = range(len(sizes))
    for off, what, label in ((-width / 2, "deploy_s", "deployment"),
                             (width / 2, "terminate_s", "termination (with merge)")):  # fmt: skip
        p50 = [result[what][s]["p50"] for s in sizes]
        err = [[p - result[what][s]["min"] for p, s in zip(p50, sizes, strict=True)],
               [result[what][s]["max"] - p for p, s in zip(p50, sizes, strict=True)]]  # fmt: skip
        ax.bar([x + off for x in xs], p50, width, yerr=err, capsize=3, label=label)
    hv = result.get("heavy") or {}
    if hv.get("runs"):
        x = len(sizes)
        runs = hv["runs"]
        med = lambda k: statistics.median(r[k] for r in runs)  # noqa: E731
        ax.bar(x - width / 2, hv["deploy_p50_s"], width, color="C0")
        ax.bar(x + width / 2, hv["terminate_p50_s"], width, color="C1")
        ax.plot([x - width / 2, x + width / 2], [med("floor_to_edge_s"), med("floor_to_cloud_s")],
                "k_", ms=18, mew=2, label="heavy: bare DUMP/RESTORE floor of the data moved")
        xs = range(len(sizes) + 1)
    ax.axhline(2.0, color="C0", ls="--", lw=1, label="target: deploy 2 s")
    ax.axhline(1.0, color="C1", ls="--", lw=1, label="target: terminate 1 s")
    labels = [f"{s} users" for s in sizes]
    if hv.get("runs"):
        labels.append(f"{sizes[-1]} users, heavy\n({hv['keys'] // 1000}k keys, {hv['mb']} MB)")
    ax.set_xticks(list(xs), labels)
    ax.set_ylabel("seconds (median, min-max)")
    ax.set_title("enorm: deploy and terminate the game server")
    ax.legend(fontsize=7, loc="upper left")
    if cs:
        bx = axes[0][1]
        labels = list(cs["data_p50_s"])
        bx.bar(range(len(labels)), [cs["data_p50_s"][k] for k in labels],
               color=["C2" if k.startswith("small") else "C3" if k.startswith("big")
                      else "C7" for k in labels])
        bx.set_xticks(range(len(labels)), [k.replace("/", "\n") + " users" for k in labels],
                      fontsize=8)
        bx.set_yscale("log")
        bx.set_ylabel("data stage of the offload, s (median)")
        bx.set_title(f"cloud of {cs['cloud_keys']['small']:,} vs {cs['cloud_keys']['big']:,} "
                     "keys (schema; scan for comparison)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
