"""Node settings and protocol messages: bad input names the field and the reason."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from enorm import config
from enorm.protocol import SetupRequest

KEY = "ssh-ed25519 " + "A" * 68 + " cloud@test"


def test_defaults_are_the_paper_unit_and_a_whole_machine():
    cfg = config.load(None)
    assert (cfg.unit.cores, cfg.unit.memory_mb) == (1.0, 200)
    assert cfg.autoscale_interval_s == 300
    assert cfg.cores and cfg.cores >= 1 and cfg.memory_mb and cfg.memory_mb > 0
    assert str(cfg.gateway) == "10.88.0.1"
    assert cfg.container_prefix == "enorm-edge0-"


def test_file_then_environment(tmp_path, monkeypatch):
    f = tmp_path / "node.toml"
    f.write_text('name = "board1"\nunit = { cores = 0.5, memory_mb = 128 }\n')
    assert config.load(f).unit.cores == 0.5
    monkeypatch.setenv("ENORM_UNIT__CORES", "2")
    cfg = config.load(f)
    assert cfg.unit.cores == 2 and cfg.name == "board1"


@pytest.mark.parametrize(
    ("text", "field"),
    [
        ('port_range = [5000, 4000]', "port_range"),
        ('name = "Bad Name"', "name"),
        ('name = "base"', "name: .*base containers"),
        ('subnet = "10.0.0.0/30"', "subnet"),
        ('unit = { cores = 0 }', "unit.cores"),
        ('nosuch = 1', "nosuch"),
        ('container_egress = ["10.0.0.1"]', "container_egress"),
        ('container_egress = ["10.0.0.1:0"]', "container_egress"),
        ('container_egress = ["cloud.example:80"]', "container_egress"),
    ],
)
def test_bad_settings_name_the_field(tmp_path, text, field):
    f = tmp_path / "node.toml"
    f.write_text(text + "\n")
    with pytest.raises(config.ConfigError, match=field):
        config.load(f)


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(config.ConfigError, match="does not exist"):
        config.load(tmp_path / "nope.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("name = \n")
    with pytest.raises(config.ConfigError, match="not valid TOML"):
        config.load(bad)


def request(**over):
    body = {"app": "game", "priority": 5, "ports": [8080], "latency_objective_ms": 50,
            "ssh_public_key": KEY, "users": [{"id": "1", "address": "198.18.0.1"}]}
    body.update(over)
    return body


@pytest.mark.parametrize(
    ("over", "field"),
    [
        ({"priority": -1}, "priority"),
        ({"ports": [22]}, "ports"),
        ({"ports": [0]}, "ports"),
        ({"users": [{"id": "1", "address": "1.2.3.4"}, {"id": "1", "address": "1.2.3.5"}]},
         "users"),
        ({"latency_objective_ms": 0}, "latency_objective_ms"),
        ({"ssh_public_key": "ssh-ed25519 short"}, "ssh_public_key"),
        ({"data_sink": {"url": "http://x"}}, "data_sink.url"),
        ({"callback_url": "not a url"}, "callback_url"),
        ({"unknown": 1}, "unknown"),
    ],
)
def test_setup_request_rejects_with_the_field(over, field):
    with pytest.raises(ValidationError) as exc:
        SetupRequest.model_validate(request(**over))
    locs = {".".join(str(p) for p in e["loc"]) for e in exc.value.errors()}
    assert any(loc.startswith(field) for loc in locs), locs


def test_setup_request_defaults():
    r = SetupRequest.model_validate(request())
    assert r.termination == "single" and r.override is False and r.data_sink is None


def test_intercept_must_go_to_a_forwarded_port_once_per_destination():
    from enorm.protocol import SetupRequest

    base = {"app": "game", "priority": 5, "ports": [8080], "latency_objective_ms": 50,
            "ssh_public_key": KEY}
    ok = SetupRequest.model_validate(
        {**base, "intercept": [{"address": "192.0.2.10", "port": 80, "to_port": 8080}]})
    assert str(ok.intercept[0].address) == "192.0.2.10"
    for bad in ([{"address": "192.0.2.10", "port": 80, "to_port": 9090}],
                [{"address": "192.0.2.10", "port": 80, "to_port": 8080}] * 2,
                [{"address": "192.0.2.10", "port": 0, "to_port": 8080}]):
        with pytest.raises(ValidationError):
            SetupRequest.model_validate({**base, "intercept": bad})


def test_probe_requests_name_users_only():
    from enorm.protocol import ProbeRequest

    assert len(ProbeRequest.model_validate({"addresses": ["198.51.100.7"]}).addresses) == 1
    for bad in (["127.0.0.1"], ["0.0.0.0"], ["224.0.0.1"], ["169.254.1.1"], [],
                ["10.0.0.1"] * 257):
        with pytest.raises(ValidationError):
            ProbeRequest.model_validate({"addresses": bad})


def test_the_record_is_made_from_the_setup_request_whole():
    """Every field of a setup request reaches the server's record: as it came, reshaped
    (ports, users), or as a digest (handover_key); the answer is made from the record."""
    from enorm.protocol import Resources, SetupResponse
    from enorm.store import _AS_REQUESTED, ServerRecord, key_digest

    assert set(SetupRequest.model_fields) == _AS_REQUESTED | {"ports", "users", "handover_key"}
    req = SetupRequest.model_validate({
        "app": "game", "priority": 7, "ports": [8080, 9000], "latency_objective_ms": 40,
        "ssh_public_key": KEY, "users": [{"id": "u1", "address": "10.90.1.2"}],
        "data_sink": {"url": "redis://10.0.0.9:6379/0", "shared_patterns": ["region:*"]},
        "callback_url": "http://10.0.0.9:8000/edge-events", "override": True,
        "termination": "multiple", "handover_key": "k" * 43,
        "intercept": [{"address": "10.0.0.9", "port": 8000, "to_port": 8080}]})
    unit = Resources(cores=1, memory_mb=200)
    rec = ServerRecord.admitted(req, sid="ab12", owner="cloud-a", container="enorm-x-ab12",
                                address="10.88.0.2", host_ports=[20001, 20002, 20003],
                                limits=unit, created_at=1.0)
    for name in _AS_REQUESTED:
        assert getattr(rec, name) == (str(req.callback_url) if name == "callback_url"
                                      else getattr(req, name)), name
    assert (rec.state, rec.access_port, rec.ports, rec.users) == (
        "launching", 20001, {8080: 20002, 9000: 20003}, 1)
    assert rec.handover_digest == key_digest("k" * 43) and rec.redis_password
    resp = rec.response("192.0.2.1")
    assert resp == SetupResponse(server_id="ab12", container="enorm-x-ab12",
                                 address="10.88.0.2", access={"host": "192.0.2.1",
                                                              "port": 20001},
                                 ports={8080: 20002, 9000: 20003}, limits=unit,
                                 redis_password=rec.redis_password)
