"""No user id reaches the library's own keys, whatever the app declares: every key of the
`enorm:` namespace (the cloud manager's ledger and registry, the copy's manifest, and the
per-user keys issue 32 will give them, `enorm:{<user>}:...`) is never found, copied,
exported or merged as a user's or a shared key; on real Redis, standalone and a 3-master
cluster as the cloud."""

from __future__ import annotations

import pytest
from pydantic import ValidationError
from test_datasync import fill_users

from cloud_manager import App, KeySchema, sink_for
from cloud_manager.ledger import Entry, Ledger
from cloud_manager.registry import Registry
from enorm import datasync
from enorm.protocol import DataSink, User
from games.pokemon import keys

# Users named like the library's hash tags, and ids with a colon and a glob character.
USERS = ["cloud", "registry", "a:b", "st*r"]
SCHEMA = KeySchema(fixed=("u:{<user>}", "pokedex:{<user>}", "loc:{<user>}"),
                   families=(("pms:{<user>}", "pm:{<user>}:<member>"),))


def library_keys(cloud) -> dict[bytes, object]:
    """The library's keys as they are: the ledger, the registry, a per-user key."""
    return {k: cloud.dump(k) for k in (b"enorm:{cloud}:deployments", b"enorm:{cloud}:users",
                                       b"enorm:{registry}:nodes", b"enorm:{cloud}:x",
                                       b"enorm:{st*r}:x")}


def fill(cloud) -> None:
    fill_users(cloud, [*USERS, "str", "stay"])
    ledger = Ledger(cloud)
    ledger.record(Entry(server_id="s0", node="n0", app="g", url="http://x",
                        users=[User(id="stay", address="10.0.0.1")]))
    Registry(cloud).record("n0", "http://n0", None, "no answer")
    # issue 32's keys: per user, under the user's own hash tag
    cloud.set("enorm:{cloud}:x", "the library's")
    cloud.set("enorm:{st*r}:x", "the library's")


@pytest.mark.parametrize("schema", [None, SCHEMA], ids=["scan", "schema"])
@pytest.mark.parametrize("kind", ["standalone", "cluster"])
def test_library_keys_are_never_a_users_data(kind, schema, redis_server, request):
    if kind == "cluster":
        cloud = datasync.connect(request.getfixturevalue("redis_cluster").url, cluster=True)
    else:
        cloud = datasync.connect(redis_server().url)
    edge = datasync.connect(redis_server().url)
    fill(cloud)
    lib = library_keys(cloud)
    manifest = datasync.manifest_key("s1")

    copy = datasync.copy_users(cloud, edge, USERS, manifest=manifest, schema=schema)
    on_edge = set(datasync.scan(edge, "*"))
    assert not [k for k in on_edge if k.startswith(b"enorm:")]
    # `st*r` is matched as itself, not as a pattern: user `str`'s keys stay home
    assert not [k for k in on_edge if b"{str}" in k]
    assert {datasync.hash_tag(k) for k in on_edge} == {u.encode() for u in USERS}
    assert copy.keys == len(on_edge)
    assert not datasync.export_users(edge, USERS)[1]

    # The tenant writes the library's keys of its users' tags, and the ledger moves on
    # meanwhile (another deployment recorded for a user named `cloud`).
    edge.hset("enorm:{cloud}:deployments", "s0", "forged")
    edge.hset("enorm:{cloud}:users", "cloud", "s666")
    edge.hset("enorm:{registry}:nodes", "n0", "forged")
    edge.set("enorm:{cloud}:x", "forged")
    edge.sadd("enorm:shared-set", "x")  # untagged, library: not even shared by `*`
    edge.hset(keys.user("cloud"), "xp", 99)
    Ledger(cloud).record(Entry(server_id="s1", node="n1", app="g", url="http://y",
                               users=[User(id="cloud", address="10.0.0.2")]))
    lib = library_keys(cloud)
    report = datasync.merge_back(edge, cloud, shared_patterns=["*"], user_ids=USERS,
                                 manifest=manifest)
    assert report.verified and report.not_owned == 5
    assert {s.split("}")[0] for s in report.not_owned_sample} >= {"enorm:{cloud",
                                                                  "enorm:{registry"}
    assert library_keys(cloud) == lib
    assert Ledger(cloud).where("cloud").server_id == "s1"
    assert cloud.hget(keys.user("cloud"), "xp") == b"99"
    # The verification's scratch keys are the library's too, and gone.
    assert not list(datasync.scan(cloud, "*verify*"))
    # Deleting the users' keys on a source never touches the library's.
    datasync.delete_users(cloud, USERS)
    assert library_keys(cloud) == lib and Ledger(cloud).get("s0") is not None


def test_an_app_cannot_declare_the_librarys_keys():
    with pytest.raises(ValueError, match="enorm:"):
        KeySchema(fixed=("enorm:{<user>}:deployments",))
    with pytest.raises(ValueError, match="enorm:"):
        KeySchema(families=(("enorm:{<user>}:idx", "x:{<user>}:<member>"),))
    app = App(name="x", port=1, files={}, command=["true"], env=lambda ctx: {},
              redirect=lambda u, url: None, restore=lambda u: None,
              shared_patterns=["enorm:*"])
    with pytest.raises(ValueError, match="shared_patterns: 'enorm:\\*'"):
        sink_for(app, DataSink(url="redis://127.0.0.1:1/0"))
    app.shared_patterns, app.cloud_wins_patterns = ["board:*"], ["enorm:{cloud}:*"]
    with pytest.raises(ValueError, match="cloud_wins_patterns"):
        sink_for(app, DataSink(url="redis://127.0.0.1:1/0"))
    # user ids: a colon is an id; braces (a hash tag's) and a glob's star are not
    assert User(id="a:b", address="10.0.0.1").id == "a:b"
    for bad in ("a{b", "a}b", "a*b", "{cloud}"):
        with pytest.raises(ValidationError, match="id"):
            User(id=bad, address="10.0.0.1")
    for bad in ("a{b", "a}b"):
        with pytest.raises(ValueError, match="hash tag"):
            datasync.copy_users(None, None, [bad])
