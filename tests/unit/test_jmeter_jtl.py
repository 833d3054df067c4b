"""The JMeter runner's pure parts: the .jtl parser on a fixture, the plans against the
recorded session, and the runner's refusal of bad arguments."""

from __future__ import annotations

from pathlib import Path
from xml.etree import ElementTree as ET

import pytest

from bench import jmeter
from games.pokemon.jmeter import plans

DATA = Path(__file__).resolve().parent / "data"
PLAIN = {"TestPlan", "ThreadGroup", "CSVDataSet", "ConfigTestElement", "HeaderManager",
         "HTTPSamplerProxy", "UniformRandomTimer"}  # fmt: skip


def test_parse_jtl_fixture():
    r = jmeter.parse_jtl(DATA / "sample.jtl", plan="aggressive", users=2, threads=2)
    assert (r.requests, r.errors, r.bytes) == (10, 2, 4590)
    assert (r.p50, r.p95, r.p99, r.mean, r.max) == (50, 100, 100, 55, 100)
    assert r.duration_s == 2.0  # first start .. last end
    assert (r.throughput, r.achieved_rate) == (4.0, 5.0)
    assert r.error_rate == 0.2
    assert r.error_codes == {"404": 1, "Non HTTP response code: java.net.ConnectException": 1}
    wild = r.by_label["wild /wpm"]
    assert (wild["requests"], wild["errors"], wild["p50"], wild["p95"]) == (4, 1, 40, 100)
    assert set(r.by_label) == {"wild /wpm", "pokedex /pd", "party /6pm"}


def test_parse_jtl_leaves_out_the_warmup():
    r = jmeter.parse_jtl(DATA / "sample.jtl", warmup_s=0.35)
    assert (r.requests, r.errors, r.duration_s) == (6, 2, 1.6)
    assert r.p50 == 70


@pytest.mark.parametrize("text, reason", [
    ("", "missing"),
    ("timeStamp,elapsed,label\n1,2,x\n", "missing"),
    ("timeStamp,elapsed,label,responseCode,success\n", "no samples"),
    ("timeStamp,elapsed,label,responseCode,success\n1,fast,x,200,true\n", ":2: bad sample"),
])  # fmt: skip
def test_parse_jtl_refuses_what_is_not_a_jtl(tmp_path, text, reason):
    path = tmp_path / "bad.jtl"
    path.write_text(text)
    with pytest.raises(jmeter.JMeterError, match=reason):
        jmeter.parse_jtl(path)


def test_percentile_is_nearest_rank():
    values = list(range(1, 101))
    assert [jmeter.percentile(values, q) for q in (50, 95, 99, 100)] == [50, 95, 99, 100]
    assert jmeter.percentile([7.0], 99) == 7.0


def test_committed_plans_are_the_ones_the_session_makes():
    think = plans.session_think_ms()
    assert 5000 < think < 15000  # the recorded player's mean think time, in ms
    for name in plans.PLANS:
        assert (plans.HERE / f"{name}.jmx").read_text() == plans.render(name, think), (
            f"{name}.jmx is stale: run python -m games.pokemon.jmeter.plans"
        )


@pytest.mark.parametrize("name", plans.PLANS)
def test_plans_use_plain_elements_and_the_right_requests(name):
    root = ET.parse(plans.HERE / f"{name}.jmx").getroot()
    classes = {e.get("testclass") for e in root.iter()
               if e.get("testclass") and e.tag != "elementProp"}  # fmt: skip
    assert classes <= PLAIN
    paths = [e.find("stringProp[@name='HTTPSampler.path']").text
             for e in root.iter("HTTPSamplerProxy")]  # fmt: skip
    timers = list(root.iter("UniformRandomTimer"))
    data = [p for p in paths if p in ("/wpm", "/pd", "/6pm")]
    if name == "aggressive":
        assert paths == data and not timers
    else:  # as many regular as data-intensive requests, each after a think time
        assert len(data) * 2 == len(paths) and len(timers) == len(paths)
    props = " ".join(e.text or "" for e in root.iter("stringProp"))
    for prop in ("host", "port", "threads", "duration", "users_csv"):
        assert f"${{__P({prop}," in props
    sources = [e.find("stringProp[@name='HTTPSampler.ipSource']").text
               for e in root.iter("HTTPSamplerProxy")]  # fmt: skip
    assert sources == ["${src}"] * len(paths)


@pytest.mark.parametrize("kw, field", [
    ({"plan": "calm"}, "plan"),
    ({"host": "localhost"}, "host"),
    ({"port": 0}, "port"),
    ({"users": 3}, "players"),
    ({"users": 0}, "users"),
    ({"duration": 0}, "duration"),
    ({"engine": "ab"}, "engine"),
    ({"players": [jmeter.Player("1", "t", 51.5, -0.1, "edge.example")]}, "players"),
    ({"players": [jmeter.Player("1", "t", 51.5, -0.1, "127.0.0.2")], "engine": "locust"},
     "players"),
])  # fmt: skip
def test_run_refuses_bad_arguments_before_starting_jmeter(kw, field):
    args = {"plan": "mixed", "host": "127.0.0.1", "port": 8080, "users": 1, "duration": 1,
            "players": [jmeter.Player("1", "t", 51.5, -0.1)], **kw}  # fmt: skip
    with pytest.raises(ValueError, match=f"^{field}:"):
        jmeter.run(**args)


def test_a_bad_players_csv_is_named_with_its_line(tmp_path):
    path = tmp_path / "p.csv"
    for bad in ("2,tok,north,-0.1", "2,tok,51.5,-0.1,somehost", "2,tok,51.5,-0.1,,x", "2,tok"):
        path.write_text(f"1,tok,51.5,-0.1\n{bad}\n")
        with pytest.raises(ValueError, match=r"^players: .*p.csv:2: expected uid,token,lat,lng"):
            jmeter.read_players(path)
    path.write_text("1,tok,51.5,-0.1\n2,tok,51.5,-0.1,198.18.0.7\n")
    assert [p.src for p in jmeter.read_players(path)] == ["", "198.18.0.7"]


def test_players_csv_round_trip(tmp_path):
    players = [jmeter.Player(str(i), f"tok{i}", *jmeter.spot(i), src=f"198.18.{i // 256}.{i % 256}")
               for i in range(300)]  # fmt: skip
    path = jmeter.write_players(tmp_path / "p.csv", players)
    assert jmeter.read_players(path) == players
    assert len({(p.lat, p.lng) for p in players}) == 300  # every user at its own spot


def test_cli_names_the_bad_field_and_exits_non_zero(tmp_path, capsys):
    players = jmeter.write_players(tmp_path / "p.csv", [jmeter.Player("1", "t", 51.5, -0.1)])
    code = jmeter.main(["--plan", "mixed", "--host", "edge.example", "--port", "8080",
                        "--players", str(players)])  # fmt: skip
    assert code == 2
    assert "host: 'edge.example' is not an IP literal" in capsys.readouterr().err


def test_join_jtl_cuts_each_engines_own_warmup(tmp_path: Path):
    head, *rows = (DATA / "sample.jtl").read_text().splitlines()
    later = tmp_path / "later.jtl"  # a second engine that started 10 s later
    later.write_text("\n".join([head] + [str(int(r[:13]) + 10_000) + r[13:] for r in rows]) + "\n")
    joined = jmeter.join_jtl([DATA / "sample.jtl", later], tmp_path / "all.jtl", warmup_s=0.35)
    assert joined.read_text().count("timeStamp") == 1
    r = jmeter.parse_jtl(joined)
    assert (r.requests, r.errors) == (12, 4)  # 6 of 10 kept from each
    assert jmeter.parse_jtl(jmeter.join_jtl([later], tmp_path / "one.jtl", 0)).requests == 10
