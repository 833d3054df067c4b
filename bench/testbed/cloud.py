"""The cloud tier: the cloud game server, its Redis and the cloud manager, run as one
process inside the cloud namespace and held to one core (the paper's t2.micro) by a
cgroup v1 CFS quota (the testbed puts it in the cgroup at once, before it has
imported anything, so Redis, started later, inherits the quota).

    python -m bench.testbed.cloud HOST PORT EDGE_URL[,EDGE_URL...] TOKEN

Besides the game (`/id`, `/config`, `/stats`, ...) it answers the testbed's control calls:
`POST /bench/players {"n": N, "prefix": P}` -> N players made by the game's own logic in
the cloud's Redis, `[[uid, token, lat, lng], ...]` (the same ones again for the same
prefix), `POST /bench/offload {"users": [[id, address], ...], "placement": "first" |
"scored"?, "exclude": [NODE, ...]?}` -> the deployment,
`POST /bench/withdraw {"server_id": ...}` -> its end and timings, and `POST /bench/handover
{"server_id": ..., "to": NODE?, "path": "direct"|"cloud"?}` -> the new deployment and the
old one's end, `POST /bench/policy {"settings": {...}, "groups": {NAME: [[id, address],
...]}}` -> the manager's policy started over those groups (`start_policy`), and
`GET /bench/policy` -> its decisions so far (`PolicyEvent`s), `POST /bench/policy/stop`
-> the policy stopped and the servers it left withdrawn.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
import threading

from flask import jsonify, request

REDIS_PORT = 6379


def main(argv: list[str] | None = None) -> None:
    host, port, edge_url, token = (argv or sys.argv[1:])[:4]
    from bench.jmeter import create_players
    from cloud_manager import CloudManager, EdgeClient
    from enorm import datasync
    from enorm.protocol import DataSink, User
    from games.pokemon import cloud as game_cloud
    from games.pokemon import keys, serving
    from games.pokemon.app import app as pokemon_app

    rdir = tempfile.mkdtemp(prefix="enbd-cloud-redis-")
    redis = subprocess.Popen(
        ["redis-server", "--bind", host, "--port", str(REDIS_PORT), "--save", "",
         "--appendonly", "no", "--dir", rdir, "--protected-mode", "no"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    redis_url = f"redis://{host}:{REDIS_PORT}/0"
    client = datasync.connect(redis_url)
    for _ in range(200):
        try:
            client.ping()
            break
        except Exception:  # noqa: BLE001 (not up yet)
            threading.Event().wait(0.05)
    url = f"http://{host}:{port}"
    app = game_cloud.create_app(game_cloud.connect_redis(redis_url), public_url=url)
    manager = CloudManager(
        [EdgeClient(u, token, name=f"bed{k}") for k, u in enumerate(edge_url.split(","))],
        pokemon_app(client, cloud_url=url, push_interval=1.0),
        cloud_redis=client,
        sink=DataSink(url=redis_url, shared_patterns=keys.SHARED_PATTERNS),
        callback_url=f"{url}/edge-events",
    )
    app.register_blueprint(manager.blueprint())

    @app.post("/bench/players")
    def _players():
        body = request.get_json()
        made = create_players(client, int(body["n"]), prefix=str(body.get("prefix", "bed")))
        return jsonify([[p.uid, p.token, p.lat, p.lng] for p in made])

    @app.post("/bench/offload")
    def _offload():
        body = request.get_json()
        manager.placement = body.get("placement") or manager.placement
        dep = manager.offload([User(id=u[0], address=u[1]) for u in body["users"]],
                              exclude=body.get("exclude") or ())
        return jsonify(server_id=dep.server_id, url=dep.url, timings=dep.timings,
                       keys=dep.keys_copied, node=dep.edge.name,
                       placement=dep.placement)

    @app.post("/bench/withdraw")
    def _withdraw():
        dep = manager.withdraw(request.get_json()["server_id"])
        return jsonify(server_id=dep.server_id, state=dep.state, confirmed=dep.confirmed,
                       keys_migrated=dep.keys_migrated, timings=dep.timings)

    @app.post("/bench/handover")
    def _handover():
        body = request.get_json()
        old = manager.deployments[body["server_id"]]
        manager.handover_path = body.get("path") or manager.handover_path
        new = manager.handover(old, to=body.get("to"))
        return jsonify(server_id=new.server_id, url=new.url, node=new.edge.name,
                       timings=new.timings, path=new.handover_path,
                       keys=new.keys_copied,
                       old={"server_id": old.server_id, "node": old.edge.name,
                            "state": old.state, "confirmed": old.confirmed,
                            "keys_migrated": old.keys_migrated, "timings": old.timings})

    @app.post("/bench/policy")
    def _policy():
        from cloud_manager.policy import Settings
        from cloud_manager.policy_loop import Group

        body = request.get_json()
        groups = [Group(name, [User(id=u[0], address=u[1]) for u in users])
                  for name, users in body["groups"].items()]
        manager.start_policy(lambda _data_of: groups, Settings(**body["settings"]))
        return jsonify(groups=len(groups))

    @app.get("/bench/policy")
    def _policy_events():
        loop = manager.policy
        return jsonify([] if loop is None else [ev.as_dict() for ev in loop.events])

    @app.post("/bench/policy/stop")
    def _policy_stop():
        """The policy stopped, then every server it left withdrawn: their merges."""
        loop, ended = manager.policy, []
        if loop is not None:
            manager.stop_policy()  # (the next run of the bench starts it again)
            for dep in list(loop.owned.values()):
                try:
                    manager.withdraw(dep)
                    error = None
                except Exception as exc:  # noqa: BLE001 (reported: the bench counts it)
                    error = f"{type(exc).__name__}: {exc}"
                ended.append({"server_id": dep.server_id, "state": dep.state, "error": error,
                              "merge": None if dep.merge is None else dep.merge.model_dump()})
            ended += [{"server_id": sid, "state": "unreached", "error": "its node is down",
                       "merge": None} for sid in loop.unreached]
        return jsonify(ended)

    # the game's players and the testbed's control calls (an offload holds a thread for
    # seconds while the node calls back into /edge-events): more threads than the game's
    http = serving.server(app, host, int(port), threads=32)
    print("ready", flush=True)
    try:
        serving.run(http)
    finally:
        manager.close()
        redis.terminate()
        redis.wait(10)


if __name__ == "__main__":
    main()
