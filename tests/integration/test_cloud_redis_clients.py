"""The cloud manager with whatever Redis client the app has: one that decodes replies
(`decode_responses=True`, as Flask apps make it), with and without a key schema, on a
standalone cloud and a 3-master cluster; or a URL. The library keeps a connection of its
own for the data (DUMP payloads are bytes); the app's client is left as it was."""

from __future__ import annotations

import pytest
import redis
from redis.cluster import RedisCluster
from test_datasync import fill_users

from cloud_manager import CloudManager, Deployment
from enorm import datasync
from enorm.protocol import Access, DataSink, Resources, SetupResponse, User
from games.nearby.app import app as nearby_app
from games.pokemon import keys

USERS = ["a1", "a2", "a3"]


def deployment(sid: str) -> Deployment:
    setup = SetupResponse(server_id=sid, container="c", address="10.0.0.2",
                          access=Access(host="127.0.0.1", port=1), ports={},
                          limits=Resources(cores=1, memory_mb=64), redis_password="x")
    return Deployment(edge=None, setup=setup, users=[User(id=u, address="10.0.0.9")
                                                     for u in USERS], url="")


@pytest.mark.parametrize("schema", [False, True], ids=["scan", "schema"])
@pytest.mark.parametrize("kind", ["standalone", "cluster", "url"])
def test_an_offloads_data_moves_with_the_apps_decoding_client(kind, schema, redis_server,
                                                              request):
    if kind == "cluster":
        url = request.getfixturevalue("redis_cluster").url
        app_client = RedisCluster.from_url(url, decode_responses=True)
    else:
        url = redis_server().url
        app_client = redis.Redis.from_url(url, decode_responses=True)
    fill_users(app_client, [*USERS, "b1"])
    app_client.hset(keys.user("a1"), "bytes", b"\xff\x00")  # not UTF-8: a DUMP's kind
    app = nearby_app(app_client)  # any app: only its data declaration is used here
    app.key_schema = None
    if schema:
        from games.pokemon.app import key_schema
        app.key_schema = key_schema()
    app.user_key, app.shared_keys = keys.user, None
    cm = CloudManager([], app, cloud_redis=url if kind == "url" else app_client,
                      sink=DataSink(url=url, cluster=kind == "cluster"))
    edge_url = redis_server().url
    edge = datasync.connect(edge_url)
    try:
        dep = deployment("s1")
        cm.copy(dep, datasync.connect(edge_url))  # the copy closes the client it is given
        assert dep.copy.verified and dep.copy.keys == len(datasync.user_keys(edge))
        assert {datasync.hash_tag(k) for k in datasync.user_keys(edge)} == {b"a1", b"a2", b"a3"}
        assert edge.hget(keys.user("a1"), "bytes") == b"\xff\x00"
        # the edge plays, the merge goes home, the manager confirms it with its own client
        edge.hset(keys.user("a2"), "xp", 4242)
        edge.delete(keys.pokedex("a3"))
        report = datasync.merge_back(edge, cm.cloud, user_ids=USERS,
                                     manifest=datasync.manifest_key("s1"))
        assert report.verified and report.deleted == 1
        dep.keys_migrated = report.keys
        assert cm.confirm(dep)
        assert app_client.hget(keys.user("a2"), "xp") == "4242"  # still the app's decoder
        assert not app_client.exists(keys.pokedex("a3"))
    finally:
        cm.close()
        edge.close()
    assert app_client.ping()  # the app's client is not the manager's to close
