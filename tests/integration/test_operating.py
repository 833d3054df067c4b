"""What an operator sees and drives: /metrics, the live dashboard in a real browser, the
decision log, and the CLI's output and exit codes, on a real node."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest
import requests
from nodes import VENV_BIN
from prometheus_client.parser import text_string_to_metric_families
from test_edge_node import handshake

pytestmark = pytest.mark.system

ARTIFACTS = Path(__file__).resolve().parents[1] / "artifacts"
METRICS_DOC = Path(__file__).resolve().parents[2] / "docs" / "metrics.md"


def scrape(node, token: str | None) -> requests.Response:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return requests.get(node.url + "/metrics", headers=headers, timeout=10)


def samples(text: str) -> dict[tuple[str, frozenset], float]:
    return {(s.name, frozenset(s.labels.items())): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples}


def value(found: dict, name: str, **labels: str) -> float | None:
    return found.get((name, frozenset(labels.items())))


def test_metrics_and_decision_log(edge_node, monkeypatch):
    monkeypatch.setenv("ENORM_LOG_JSON", "1")
    node = edge_node(cores=1.0, unit={"cores": 0.5, "memory_mb": 64})
    op = node.settings["operator_token"]
    a = handshake(node).json()
    b = handshake(node, owner="cloud-b").json()
    refused = handshake(node)
    assert refused.status_code == 409
    assert node.client().delete(f"{node.url}/v1/servers/{a['server_id']}", timeout=60).ok
    assert requests.post(node.url + "/v1/autoscale", timeout=120,
                         headers={"Authorization": f"Bearer {op}"}).ok

    assert scrape(node, None).status_code == 401
    assert scrape(node, next(iter(node.tokens))).status_code == 403
    resp = scrape(node, op)
    assert resp.status_code == 200
    # One media type with each parameter once (Go's mime.ParseMediaType, which Prometheus
    # 3 uses, refuses a repeated one and fails the scrape), and what promtool accepts.
    kind, *params = [p.strip() for p in resp.headers["Content-Type"].split(";")]
    assert kind == "text/plain" and sorted(p.split("=")[0] for p in params) == [
        "charset", "version"], resp.headers["Content-Type"]
    lint = subprocess.run(["promtool", "check", "metrics"], input=resp.text,
                          capture_output=True, text=True, timeout=60)
    assert lint.returncode == 0, lint.stdout + lint.stderr
    # Every series family is in docs/metrics.md; no `*_created` of prometheus_client.
    documented = set(re.findall(r"`(enorm_\w+)`", METRICS_DOC.read_text()))
    exposed = {f.name + ("_total" if f.type == "counter" else "")
               for f in text_string_to_metric_families(resp.text)}
    assert exposed and exposed <= documented, exposed - documented
    assert not [line for line in resp.text.splitlines() if "_created" in line]
    found = samples(resp.text)
    sid = b["server_id"]
    per = {"server": sid, "app": "game", "owner": "cloud-b"}
    assert value(found, "enorm_handshakes_total", result="accepted", reason="") == 2
    assert value(found, "enorm_handshakes_total", result="rejected",
                 reason="insufficient_resources") == 1
    assert value(found, "enorm_terminations_total", reason="cloud_withdrawal") == 1
    assert value(found, "enorm_deployments_total") == 2
    assert value(found, "enorm_servers", state="running") == 1
    assert value(found, "enorm_node_cores", kind="allocated") == 0.5
    assert value(found, "enorm_node_cores", kind="free") == 0.5
    assert value(found, "enorm_server_cpu_limit_cores", **per) == 0.5
    assert value(found, "enorm_server_units", **per) == 1
    assert value(found, "enorm_server_memory_limit_bytes", **per) == 64 * 1024 * 1024
    assert value(found, "enorm_server_memory_usage_bytes", **per) > 0
    assert value(found, "enorm_server_cpu_seconds_total", **per) > 0
    assert value(found, "enorm_server_state", **per, state="running") == 1
    assert value(found, "enorm_autoscale_rounds_total", result="ok") == 1
    assert value(found, "enorm_autoscale_round_duration_seconds_count") == 1
    # The terminated server's series are gone, not frozen.
    assert not any(dict(k[1]).get("server") == a["server_id"] for k in found)

    log = (node.dir / "daemon.log").read_text()
    records = [json.loads(x) for x in log.splitlines() if x.startswith("{")]
    decisions = [(r["decision"], r["reason"]) for r in records if "decision" in r]
    assert ("rejected", "insufficient_resources") in decisions
    assert ("launched", "handshake") in decisions
    assert ("terminated", "cloud_withdrawal") in decisions
    for secret in (op, *node.tokens, a["redis_password"], b["redis_password"]):
        assert secret not in log and secret not in resp.text


def _browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    os.environ["SE_OFFLINE"] = "true"  # Selenium Manager must not fetch anything
    opts = webdriver.ChromeOptions()
    opts.binary_location = shutil.which("chromium") or "/usr/bin/chromium"
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage",
                 "--disable-gpu", "--window-size=1280,1000", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--disable-default-apps", "--dns-prefetch-disable",
                 "--disable-domain-reliability", "--disable-features=Translate,MediaRouter",
                 # Nothing may leave the machine, not even a name lookup.
                 "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
                 "--proxy-server=127.0.0.1:9"):  # loopback is never proxied
        opts.add_argument(flag)
    service = Service(shutil.which("chromedriver") or "/usr/bin/chromedriver")
    return webdriver.Chrome(options=opts, service=service)


def _rows(driver) -> dict[str, str]:
    """The table's rows read in one script, so a redraw cannot pull them away midway."""
    rows = driver.execute_script(
        "return [...document.querySelectorAll('#servers tbody tr')]"
        ".map(r => [r.dataset.server, r.dataset.state]);")
    return dict(rows)


def _until(pred, timeout: float = 8.0) -> float:
    t0 = time.monotonic()
    while not pred():
        if time.monotonic() - t0 > timeout:
            raise AssertionError("the dashboard did not update in time")
        time.sleep(0.1)
    return time.monotonic() - t0


def test_dashboard_in_headless_chromium(edge_node):
    node = edge_node()
    first = handshake(node, priority=3).json()["server_id"]
    driver = _browser()
    try:
        driver.get(f"{node.url}/dashboard#token={node.settings['operator_token']}")
        _until(lambda: first in _rows(driver), timeout=15)
        assert "token" not in driver.current_url  # kept out of the address bar
        assert node.name in driver.title
        second = handshake(node, owner="cloud-b", priority=7).json()["server_id"]
        appeared = _until(lambda: second in _rows(driver))
        assert node.client().delete(f"{node.url}/v1/servers/{first}", timeout=60).ok
        gone = _until(lambda: first not in _rows(driver))
        text = driver.find_element("id", "decisions").text
        assert "terminated" in text and "cloud_withdrawal" in text
        ARTIFACTS.mkdir(exist_ok=True)
        driver.save_screenshot(str(ARTIFACTS / "dashboard.png"))
        assert (ARTIFACTS / "dashboard.png").stat().st_size > 10_000
        # A tenant's token shows only its own servers.
        driver.execute_script("sessionStorage.setItem('enorm-token', arguments[0]);",
                              next(t for t, o in node.tokens.items() if o == "cloud-a"))
        driver.refresh()
        time.sleep(3)
        assert _rows(driver) == {}
    finally:
        driver.quit()
    print(f"dashboard: new server shown after {appeared:.1f} s, removal after {gone:.1f} s")


def test_cli_output_and_exit_codes(edge_node, tmp_path):
    node = edge_node()
    sid = handshake(node).json()["server_id"]
    # Piped: a header and one tab-separated line per server, nothing folded.
    out = node.cli("servers")
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0].split("\t")[:3] == ["id", "app", "owner"]
    assert lines[1].split("\t")[0] == sid and len(lines) == 2
    assert json.loads(node.cli("servers", "--json").stdout)[0]["id"] == sid
    bad = node.cli("terminate", "nosuch")
    assert bad.returncode == 1 and "404" in bad.stderr and "Traceback" not in bad.stderr
    cfg = tmp_path / "bad.toml"
    cfg.write_text("cores = 'many'\n")
    usage = subprocess.run([str(VENV_BIN / "enorm"), "status", "-c", str(cfg)],
                           capture_output=True, text=True, timeout=60)
    assert usage.returncode == 2 and "cores" in usage.stderr
    node.stop()
    down = node.cli("status")
    assert down.returncode == 3 and "does not answer" in down.stderr
    node.start()


def test_operator_sets_limits_by_hand(edge_node):
    node = edge_node(cores=2.0, unit={"cores": 0.25, "memory_mb": 64})
    op = {"Authorization": f"Bearer {node.settings['operator_token']}"}
    sid = handshake(node).json()["server_id"]
    url = f"{node.url}/v1/servers/{sid}/limits"
    r = requests.put(url, json={"cores": 0.5, "memory_mb": 128}, headers=op, timeout=30)
    assert r.status_code == 200, r.text
    assert r.json()["limits"] == {"cores": 0.5, "memory_mb": 128}
    import lxc

    c = lxc.Container(r.json()["container"])
    assert int(c.get_cgroup_item("memory.limit_in_bytes")) == 128 * 1024 * 1024
    assert node.client().put(url, json={"cores": 1, "memory_mb": 64}, timeout=10).status_code == 403
    bad = requests.put(url, json={"cores": -1, "memory_mb": 64}, headers=op, timeout=10)
    assert bad.status_code == 400 and bad.json()["field"] == "cores"
    too_big = requests.put(url, json={"cores": 8, "memory_mb": 64}, headers=op, timeout=10)
    assert too_big.status_code == 409
    gone = requests.put(f"{node.url}/v1/servers/nosuch/limits", json={"cores": 1,
                        "memory_mb": 64}, headers=op, timeout=10)
    assert gone.status_code == 404
    out = node.cli("scale", sid, "--cores", "0.75", "--memory-mb", "96")
    assert out.returncode == 0 and "0.75 cores / 96 MB" in out.stdout, out.stderr
    ev = node.client().get(f"{node.url}/v1/events?server={sid}", timeout=10).json()
    assert [e["reason"] for e in ev if e["type"] == "server.scaled"] == ["operator", "operator"]
    # The limits it has already: nothing written, no event, no scaling action counted.
    same = requests.put(url, json={"cores": 0.75, "memory_mb": 96}, headers=op, timeout=10)
    assert same.status_code == 200 and same.json()["limits"] == {"cores": 0.75, "memory_mb": 96}
    ev = node.client().get(f"{node.url}/v1/events?server={sid}", timeout=10).json()
    assert [e["type"] for e in ev].count("server.scaled") == 2
    found = samples(scrape(node, node.settings["operator_token"]).text)
    assert value(found, "enorm_scaling_actions_total", kind="up", reason="operator") == 2


def test_a_refused_resize_writes_nothing(edge_node):
    """Refusals are checked before any write (4xx naming the field), and what the kernel
    refuses midway is undone: the container's cgroup, the store and the events stay as
    they were. The kernel's refusal is real: a child cgroup holding a larger CFS quota
    than the one asked for (cgroup v1 keeps a child's quota within its parent's)."""
    import lxc

    node = edge_node(cores=2.0, unit={"cores": 0.25, "memory_mb": 64})
    op = {"Authorization": f"Bearer {node.settings['operator_token']}"}
    srv = handshake(node).json()
    sid, name = srv["server_id"], srv["container"]
    url = f"{node.url}/v1/servers/{sid}/limits"
    c = lxc.Container(name)

    def kernel() -> tuple[int, int]:
        return (int(c.get_cgroup_item("cpu.cfs_quota_us")),
                int(c.get_cgroup_item("memory.limit_in_bytes")))

    def stored() -> dict:
        return requests.get(f"{node.url}/v1/servers/{sid}", headers=op, timeout=10).json()

    before = kernel()
    assert before == (25_000, 64 << 20)
    cases = [  # (limits, status, error, field)
        ({"cores": 0.0, "memory_mb": 0}, 400, "bad_request", "cores"),
        ({"cores": 0.5, "memory_mb": 0}, 400, "bad_request", "memory_mb"),
        ({"cores": 0.5, "memory_mb": 1}, 409, "below_needs", "memory_mb"),
        ({"cores": 2.5, "memory_mb": 64}, 409, "insufficient_resources", "cores"),
    ]
    for limits, status, error, field in cases:
        r = requests.put(url, json=limits, headers=op, timeout=30)
        assert (r.status_code, r.json()["error"], r.json()["field"]) == (status, error, field), \
            (limits, r.text)
        assert kernel() == before, limits
    child = Path(f"/sys/fs/cgroup/cpu/lxc.payload.{name}/enorm-test-quota")
    child.mkdir()
    try:
        (child / "cpu.cfs_quota_us").write_text("25000")
        # Memory is written first (64 -> 128 MB), then the kernel refuses the quota.
        r = requests.put(url, json={"cores": 0.125, "memory_mb": 128}, headers=op, timeout=30)
        assert r.status_code == 409 and r.json()["field"] == "cores", r.text
        assert "cpu.cfs_quota_us" in r.json()["detail"]
        assert kernel() == before
    finally:  # unlimited first: a removed cgroup lingers in the kernel for a moment
        (child / "cpu.cfs_quota_us").write_text("-1")
        child.rmdir()
    assert stored()["limits"] == {"cores": 0.25, "memory_mb": 64}
    ev = node.client().get(f"{node.url}/v1/events?server={sid}", timeout=10).json()
    assert "server.scaled" not in [e["type"] for e in ev]
    ok = requests.put(url, json={"cores": 0.125, "memory_mb": 128}, headers=op, timeout=30)
    assert ok.status_code == 200 and kernel() == (12_500, 128 << 20), ok.text
