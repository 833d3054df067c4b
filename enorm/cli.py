"""`enorm`: the edge daemon and the operator's commands on the board.

Every command but `serve` and `image` talks to the running daemon over its HTTP API with
the operator token, so the CLI never races the daemon over containers or rules.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import click
import requests

from enorm import config as config_mod
from enorm import output, preflight
from enorm.output import EXIT_UNREACHABLE, EXIT_USAGE, fail

DEFAULT_CONFIG = Path("/etc/enorm/node.toml")


def load_config(path: str | None) -> config_mod.NodeConfig:
    if path is None and DEFAULT_CONFIG.exists():
        path = str(DEFAULT_CONFIG)
    try:
        return config_mod.load(path)
    except config_mod.ConfigError as exc:
        fail(str(exc), EXIT_USAGE)


class Client:
    """The operator's view of the local daemon."""

    def __init__(self, cfg: config_mod.NodeConfig) -> None:
        from enorm.daemon import operator_token

        self.url = cfg.url
        try:
            token = operator_token(cfg)
        except OSError as exc:
            fail(f"cannot read the operator token: {exc}")
        self.s = requests.Session()
        self.s.headers["Authorization"] = f"Bearer {token}"

    def call(self, method: str, path: str, **kw: Any) -> Any:
        try:
            resp = self.s.request(method, self.url + path, timeout=kw.pop("timeout", 60), **kw)
        except requests.ConnectionError:
            fail(f"the daemon does not answer at {self.url} (is `enorm serve` running?)",
                 EXIT_UNREACHABLE)
        if resp.status_code >= 400:
            try:
                body = resp.json()
                msg = body.get("detail", resp.text)
                if body.get("field"):
                    msg = f"{body['field']}: {msg}"
            except ValueError:
                msg = resp.text
            fail(f"{method} {path}: {resp.status_code} {msg}")
        return resp.json()


config_option = click.option(
    "--config", "-c", "config_path", envvar="ENORM_CONFIG", type=click.Path(dir_okay=False),
    help=f"node config (TOML); default {DEFAULT_CONFIG} if it exists, else built-in defaults",
)


def setup_logging(verbose: bool, as_json: bool) -> None:
    """Plain lines by default; with JSON, one object per line (decisions carry their
    `decision`, `reason` and `fields` as keys) for a log shipper."""
    handler = logging.StreamHandler()
    if as_json:
        from pythonjsonlogger.json import JsonFormatter

        handler.setFormatter(JsonFormatter("%(asctime)s %(name)s %(levelname)s %(message)s"))
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.DEBUG if verbose else logging.INFO)
    logging.getLogger("apscheduler").setLevel(logging.WARNING)


@click.group()
@click.option("-v", "--verbose", is_flag=True, help="log more")
@click.option("--log-json", is_flag=True, envvar="ENORM_LOG_JSON",
              help="log one JSON object per line")
def main(verbose: bool, log_json: bool) -> None:
    """Edge NOde Resource Management: the edge node's daemon and tools.

    \b
    Exit codes: 0 ok, 1 failed, 2 bad usage or config, 3 the daemon does not answer.
    Piped, tables become tab-separated lines; --json where offered gives JSON.
    """
    setup_logging(verbose, log_json)


@main.command()
@config_option
@click.option("--no-autoscale", is_flag=True,
              help="schedule neither the auto-scaler nor migration retries")
def serve(config_path: str | None, no_autoscale: bool) -> None:
    """Run the edge node daemon (foreground) with the production WSGI server."""
    from enorm import memory
    from enorm.daemon import Daemon

    memory.bound_malloc_arenas()  # before the daemon's first thread

    cfg = load_config(config_path)
    findings = _preflight(cfg)
    if preflight.failures(findings):
        # Not a failure that waiting cures: a supervisor should not restart it (the
        # systemd unit's RestartPreventExitStatus), the board needs the fix named.
        fail(preflight.message(findings), EXIT_USAGE)
    try:
        d = Daemon.open(cfg, background=not no_autoscale)
    except Exception as exc:
        fail(f"cannot start node {cfg.name}: {exc}")
    output.progress(f"node {cfg.name}: reconciled {json.dumps(d.reconciled)}")
    output.progress(f"node {cfg.name}: serving on {cfg.url}")
    try:
        d.serve()
    finally:
        d.close()


def _preflight(cfg: config_mod.NodeConfig | None = None) -> list[preflight.Finding]:
    # ENORM_PREFLIGHT_ROOT points the checks at a copy of another machine's /proc and
    # /sys files (the tests' fixtures); the tools and the write probe need the real one.
    root = os.environ.get("ENORM_PREFLIGHT_ROOT", "/")
    findings = preflight.run(root, live=root == "/", ids=cfg.id_range if cfg else None,
                             disk_mb=cfg.disk_mb if cfg else 0,
                             probe_source=str(cfg.probe_source or "") if cfg else "")
    if cfg is not None and root == "/":
        # An image of another architecture needs its emulator (enorm.images).
        from enorm import images

        arch = images.resolve(cfg.image).arch
        problem = images.emulation_problem(arch)
        how = "native" if images.native(arch) else f"through {images.QEMU[arch]} (binfmt_misc)"
        findings.append(preflight.Finding("image architecture", problem is None,
                                          problem or f"{arch}, {how}"))
    return findings


@main.command()
@config_option
@click.option("--json", "as_json", is_flag=True, help="print JSON")
def doctor(config_path: str | None, as_json: bool) -> None:
    """Check that this board can enforce the limits enorm sets (as `serve` does at start):
    cgroup controllers enabled, mounted and writable, the tools it calls installed, and
    for unprivileged containers the id range and idmapped mounts.
    Exits 1 when something is missing, naming the fix."""
    findings = _preflight(load_config(config_path))
    if as_json:
        output.line(json.dumps([f.as_dict() for f in findings]))
    else:
        output.table("preflight", ("check", "ok", "detail", "fix"),
                     [(f.check, "yes" if f.ok else "NO", f.detail, f.fix) for f in findings])
    if preflight.failures(findings):
        fail(f"{len(preflight.failures(findings))} check(s) failed")


def _res(r: dict) -> str:
    return f"{r['cores']:g} cores / {r['memory_mb']} MB"


SERVER_COLUMNS = ("id", "app", "owner", "priority", "state", "address", "access", "ports",
                  "limits", "users")


def _servers_table(servers: list[dict]) -> None:
    rows = [(s["id"], s["app"], s["owner"], s["priority"], s["state"], s["address"],
             s["access_port"], ", ".join(f"{c}->{h}" for c, h in s["ports"].items()),
             _res(s["limits"]), s["users"]) for s in servers]
    output.table("edge servers", SERVER_COLUMNS, rows)


@main.command()
@config_option
@click.option("--json", "as_json", is_flag=True, help="print JSON")
def status(config_path: str | None, as_json: bool) -> None:
    """Node resources and the servers it runs."""
    c = Client(load_config(config_path))
    node = c.call("GET", "/v1/node")
    servers = c.call("GET", "/v1/servers")
    if as_json:
        click.echo(json.dumps({"node": node, "servers": servers}, indent=2))
        return
    rows: list[tuple] = [("node", node["name"]), ("admission", node["admission"])]
    rows += [(k.replace("_", " "), _res(node[k]))
            for k in ("capacity", "reserved", "basic_service", "allocated", "free", "unit")]
    rows.append(("host ports free", node["ports_free"]))
    output.table(f"node {node['name']}", ("resource", "amount"), rows)
    _servers_table(servers)


@main.command()
@config_option
@click.option("--json", "as_json", is_flag=True, help="print JSON")
def servers(config_path: str | None, as_json: bool) -> None:
    """The edge servers on this node."""
    data = Client(load_config(config_path)).call("GET", "/v1/servers")
    if as_json:
        click.echo(json.dumps(data, indent=2))
    else:
        _servers_table(data)


@main.command()
@config_option
@click.argument("server_ids", nargs=-1, required=True)
def terminate(config_path: str | None, server_ids: tuple[str, ...]) -> None:
    """Terminate servers (their data is merged back to the cloud first)."""
    c = Client(load_config(config_path))
    for sid in server_ids:
        if len(server_ids) > 1:
            output.progress(f"terminating {sid} ...")
        r = c.call("DELETE", f"/v1/servers/{sid}")
        output.line(f"{sid}: terminated {r['terminated']}, pending {r['pending']}, "
                    f"keys migrated {r['keys_migrated']} ({r.get('untouched', 0)} untouched)")


@main.command()
@config_option
@click.argument("server_id")
@click.option("--cores", type=click.FloatRange(min=0, min_open=True), required=True)
@click.option("--memory-mb", type=click.IntRange(min=1), required=True)
def scale(config_path: str | None, server_id: str, cores: float, memory_mb: int) -> None:
    """Set a server's limits by hand (the auto-scaler may change them again)."""
    r = Client(load_config(config_path)).call(
        "PUT", f"/v1/servers/{server_id}/limits", json={"cores": cores, "memory_mb": memory_mb})
    output.line(f"{server_id}: {_res(r['limits'])}")


@main.command()
@config_option
@click.option("--limit", default=20, show_default=True, type=click.IntRange(1, 10_000))
@click.option("--json", "as_json", is_flag=True, help="print JSON")
def events(config_path: str | None, limit: int, as_json: bool) -> None:
    """Recent events (launch, scale, terminate), newest first."""
    evs = Client(load_config(config_path)).call("GET", f"/v1/events?limit={limit}")
    if as_json:
        click.echo(json.dumps(evs, indent=2))
        return
    output.table("events", ("at", "type", "server", "app", "reason", "data"),
                 [(f"{e['at']:.3f}", e["type"], e["server_id"], e["app"], e["reason"],
                   json.dumps(e["data"])) for e in evs])


@main.command()
@config_option
@click.option("--once", is_flag=True, required=True, help="run one round now")
def autoscale(config_path: str | None, once: bool) -> None:
    """Run one auto-scaling round on the daemon and print the plan and what was done."""
    r = Client(load_config(config_path)).call("POST", "/v1/autoscale", timeout=600)
    click.echo(json.dumps(r, indent=2))


@main.command()
@config_option
@click.option("--keep-bridge", is_flag=True, help="leave the bridge (its route guard stays anyway)")
@click.option("--force", is_flag=True,
              help="discard servers whose data cannot be merged back, after saving their "
                   "keys to files under STATE_DIR/discarded")
def down(config_path: str | None, keep_bridge: bool, force: bool) -> None:
    """Decommission the node: terminate every server, then remove chains and the store.

    The daemon must be stopped first; its servers are terminated here, data merged back.
    Works whatever state a crash left (enorm/decommission.py) and whatever the unit or
    the image. Runs on the board as root: only the operator can use it (and --force).
    """
    from enorm import decommission

    cfg = load_config(config_path)
    try:
        requests.get(cfg.url + "/healthz", timeout=1)
        fail(f"the daemon still answers at {cfg.url}: stop it first")
    except requests.ConnectionError:
        pass
    try:
        r = decommission.down(cfg, force=force, keep_bridge=keep_bridge,
                              progress=output.progress)
    except Exception as exc:  # a message, not a traceback: the store is stopped anyway
        logging.getLogger(__name__).debug("down", exc_info=True)
        fail(f"node {cfg.name}: not entirely down: {exc}")
    output.line(f"terminated {r.terminated}, pending {r.pending}")
    for sid, path in r.saved.items():
        output.line(f"WARNING: server {sid} was NOT merged back to its sink; its "
                    f"keys are saved in {path} (RESTORE them by hand)")
    if r.leftovers:
        n = len(r.leftovers)
        output.line(f"removed what was left of {n} container{'s' * (n != 1)}: "
                    f"{' '.join(r.leftovers)}")
    output.line(f"node {cfg.name}: down")


@main.group()
def image() -> None:
    """Base container images."""


@image.command("build")
@click.argument("name", default="debian")
@click.option("--arch", help="Debian architecture (amd64, arm64, armhf, armel); default: "
              "this machine's. Another one runs under qemu-user (binfmt_misc) and its "
              "base is enorm-base-NAME-ARCH")
@click.option("--mirror", envvar="ENORM_DEBIAN_MIRROR", show_envvar=True,
              help="the Debian archive to debootstrap from; default: the recipe's "
              "`mirror`, else the Debian archive of this machine's apt sources")
@click.option("--rebuild", is_flag=True, help="rebuild even if the base container exists")
@click.option("--lxc-path", default="/var/lib/lxc", show_default=True)
def image_build(name: str, arch: str | None, mirror: str | None, rebuild: bool,
                lxc_path: str) -> None:  # fmt: skip
    """Turn the recipe images/NAME into a base container: enorm-base-NAME for this
    machine's architecture (the node config's `image = "NAME"`), enorm-base-NAME-ARCH
    for another (`image = "NAME-ARCH"`; NAME-ARCH also works here). The root file system
    is cached under /var/cache/enorm/images by suite, architecture and package list; a
    rebuilt base is swapped in atomically, under running containers too."""
    from enorm import images, mirrors

    try:
        images.resolve(name, arch)
        if mirror:
            mirrors.check_uri(mirror, "--mirror")
    except (images.ImageError, mirrors.MirrorError) as exc:
        fail(str(exc), EXIT_USAGE)
    try:
        built = images.build(name, arch=arch, mirror=mirror, lxc_path=Path(lxc_path),
                             rebuild=rebuild, progress=output.progress)
    except images.ImageError as exc:
        fail(str(exc))
    output.line(f"{built} ready")


@image.command("import")
@click.argument("name")
@click.argument("tarball", type=click.Path(exists=True, dir_okay=False))
@click.option("--lxc-path", default="/var/lib/lxc", show_default=True)
def image_import(name: str, tarball: str, lxc_path: str) -> None:
    """Build enorm-base-NAME from a tarball of NAME's rootfs made elsewhere for this
    board's architecture (a controller's `enorm image build`): no debootstrap here."""
    from enorm import images

    try:
        built = images.import_rootfs(name, Path(tarball), lxc_path=Path(lxc_path),
                                     progress=output.progress)
    except images.ImageError as exc:
        fail(str(exc))
    output.line(f"{built} ready")


@image.command("list")
def image_list() -> None:
    """The recipes this installation knows, with their architectures."""
    from enorm import images

    for r in images.recipes():
        arches = sorted(set(images.load_recipe(r)["arch"].values()))
        click.echo(f"{r}\t{' '.join(arches)}")


if __name__ == "__main__":
    main()
