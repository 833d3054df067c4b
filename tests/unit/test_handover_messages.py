"""The node-to-node handover's messages and wire format, without a node."""

from __future__ import annotations

import base64

import pytest
from pydantic import ValidationError

from enorm import handover
from enorm.protocol import HandoverData, HandoverRequest
from enorm.store import ServerRecord

KEY = "k" * 43


@pytest.mark.parametrize("url", ["http://10.0.0.2:8700", "https://[fd00::2]:8700/"])
def test_a_node_api_url_is_accepted(url: str) -> None:
    req = HandoverRequest(to_url=url, to_server="ab12cd34", key=KEY)
    assert not req.to_url.endswith("/")


@pytest.mark.parametrize("field, value", [
    ("to_url", "redis://10.0.0.2:6379"),   # not the node's API
    ("to_url", "http://10.0.0.2:8700/v1/x"),  # a path: the node builds it
    ("to_url", "http:///nohost"),
    ("to_server", "../etc"),
    ("key", "short"),
    ("key", "k" * 40 + "\n"),
])  # fmt: skip
def test_bad_handover_requests_name_the_field(field: str, value: str) -> None:
    body = {"to_url": "http://10.0.0.2:8700", "to_server": "ab12cd34", "key": KEY,
            field: value}
    with pytest.raises(ValidationError) as err:
        HandoverRequest.model_validate(body)
    assert err.value.errors()[0]["loc"][0] == field


def test_import_data_is_strict() -> None:
    ok = HandoverData.model_validate_json(b'{"keys": [["YQ==", "Yg==", 0]], "final": true}',
                                          strict=True)
    assert ok.keys == [("YQ==", "Yg==", 0)] and ok.final
    for bad in (b'{"keys": [["YQ==", "Yg==", "0"]]}', b'{"keys": [["YQ==", "Yg=="]]}',
                b'{"keys": [], "final": 1}', b'{"keys": [], "more": 1}'):
        with pytest.raises(ValidationError):
            HandoverData.model_validate_json(bad, strict=True)


def test_batches_stay_under_the_post_size_and_end_with_a_final_one(monkeypatch) -> None:
    monkeypatch.setattr(handover, "POST_BYTES", 1000)
    dumped = {f"pm:{{u1}}:{i}".encode(): (bytes([i % 256]) * 100, i) for i in range(40)}
    batches = list(handover._batches(dumped))
    assert len(batches) > 3
    sent = [item for b in batches for item in b]
    assert [base64.b64decode(k) for k, _, _ in sent] == list(dumped)
    assert all(base64.b64decode(p) == dumped[base64.b64decode(k)][0] and t == dumped[
        base64.b64decode(k)][1] for k, p, t in sent)
    assert all(sum(len(k) + len(p) for k, p, _ in b) < 1000 + 300 for b in batches)
    assert list(handover._batches({})) == [[]]  # nothing to give: one final, empty


def test_only_the_setup_requests_key_opens_the_import() -> None:
    rec = ServerRecord.model_construct(handover_digest=handover.key_digest(KEY))
    assert handover.key_matches(rec, KEY)
    assert not handover.key_matches(rec, KEY[:-1] + "x")
    assert not handover.key_matches(ServerRecord.model_construct(handover_digest=None), KEY)


def test_the_cloud_config_names_a_bad_handover_path(tmp_path) -> None:
    from cloud_manager import config

    base = ('cloud_redis = "redis://127.0.0.1:6379/0"\napp = "games.pokemon.deploy:app"\n'
            '[[nodes]]\nname = "e0"\nurl = "http://127.0.0.1:8470"\ntoken = "t"\n')
    good, bad = tmp_path / "good.toml", tmp_path / "bad.toml"
    good.write_text('handover_path = "cloud"\n' + base)
    bad.write_text('handover_path = "sideways"\n' + base)
    assert config.load(good).handover_path == "cloud"
    with pytest.raises(config.ConfigError, match="handover_path"):
        config.load(bad)
