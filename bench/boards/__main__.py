"""`python -m bench.boards [--quick] [--arch arm64,amd64] [--steps reboot,nomem]`: the
board lab (make boards).

Full run: both boards provisioned from zero, every step, figures into
bench/results/boards.json (+ .png).
`--quick`: one board (amd64), the cycle alone, results to /tmp/enorm-boards-quick.json;
it boots the board's provisioned disk saved by an earlier run (`provisioned`) and runs the
playbook once, converging; without a valid one it provisions from zero and saves it.
`--steps`: the cycle and then only these of the later steps (lab.LATER_STEPS), e.g.
`--arch arm64 --steps nomem` for the board booted without its memory controller.
The boards run side by side (one thread each, `parallel`): about the longer board's time
instead of the sum, as each TCG VM keeps about one core busy. `--serial` runs them one
after the other, as before session 8: for a host with one core, or without room for two
VMs (~3 GB each, `parallel.BOARD_MB`); the lab falls back to it by itself, saying why,
where it finds fewer cores than boards or too little memory available.
Exits 1 when a board failed a check (what failed is in the results and on stderr); one
board's failure does not stop the other.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.boards import (
    aptproxy,
    disk,
    image,
    lab,
    parallel,
    provisioned,
    report,
    results,
    sources,
    wheelhouse,
)

RESULTS = Path(__file__).resolve().parents[1] / "results"
KEY = disk.CACHE / "ssh/id_ed25519"
# What the lab needs on the host, from Debian: the VMs, qemu-user for the arm64 disk's
# chroot, the apt proxy, and socat for the VMs' guest forwards.
PACKAGES = ["qemu-system-arm", "qemu-system-x86", "qemu-utils", "qemu-user-static",
            "binfmt-support", "apt-cacher-ng", "socat", "debootstrap", "e2fsprogs"]


def log(msg: str) -> None:
    print(f"{time.strftime('%H:%M:%S')} {msg}", file=sys.stderr, flush=True)


def ensure_packages() -> None:
    """Install what is missing (apt-cacher-ng's own service is not used: the lab runs
    its own instance on 127.0.0.1)."""
    missing = [p for p in PACKAGES if "install ok installed" not in subprocess.run(
        ["dpkg-query", "-W", "-f=${Status}", p], capture_output=True, text=True).stdout]
    if missing:
        log(f"installing {' '.join(missing)}")
        apt = ["apt-get", "-o", "DPkg::Lock::Timeout=600"]
        subprocess.run([*apt, "update", "-qq"], check=True)
        subprocess.run([*apt, "install", "-y", "-qq", "--no-install-recommends", *missing],
                       check=True, env={"DEBIAN_FRONTEND": "noninteractive",
                                        "PATH": "/usr/sbin:/usr/bin:/sbin:/bin"})


def ensure_key() -> Path:
    """The lab's SSH key: its public half is baked into the cached disks."""
    if not KEY.exists():
        KEY.parent.mkdir(parents=True, exist_ok=True)
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "enorm-board-lab",
                        "-f", str(KEY)], check=True)
    return KEY


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="one board, the cycle alone")
    # Quick on amd64: the arm64 board's playbook on a provisioned board took 304-590 s
    # under TCG here (amd64: 178-306 s); its quick run from its provisioned disk took
    # 750 s (2026-12-07), not under 10 min.
    ap.add_argument("--arch", help="comma-separated (default: arm64,amd64; quick: amd64)")
    ap.add_argument("--out", type=Path, help="results JSON (default by mode)")
    ap.add_argument("--image", choices=("host", "board"), default="host",
                    help="build the container image on the host and import it on the board "
                         "(default), or run debootstrap on the board")
    ap.add_argument("--steps", help="the later steps to run after the cycle, comma-separated "
                                    f"of {','.join(lab.LATER_STEPS)} (default: all; quick: none)")
    ap.add_argument("--serial", action="store_true",
                    help="the boards one after the other (a host with one core or without "
                         f"{parallel.BOARD_MB} MB available per board); default: side by side")
    a = ap.parse_args()
    archs = (a.arch or ("amd64" if a.quick else "arm64,amd64")).split(",")
    steps = (() if a.quick else lab.LATER_STEPS) if a.steps is None else tuple(
        filter(None, a.steps.split(",")))
    if unknown := set(steps) - set(lab.LATER_STEPS):
        ap.error(f"--steps: no step {', '.join(sorted(unknown))} "
                 f"(the steps: {', '.join(lab.LATER_STEPS)})")
    out = a.out or (Path("/tmp/enorm-boards-quick.json") if a.quick
                    else RESULTS / "boards.json")
    ensure_packages()
    key = ensure_key()
    pub = key.with_suffix(".pub").read_text()
    lines = sources.debian_lines(disk.SUITE)
    mirror = sources.debian_mirror(disk.SUITE)
    free_mb = parallel.available_mb()
    why = parallel.why_serial(len(archs), serial=a.serial, cores=os.cpu_count() or 1,
                              free_mb=free_mb)
    side_by_side = len(archs) > 1 and why is None
    if side_by_side:
        log(f"the boards side by side ({', '.join(archs)}; {os.cpu_count()} cores, "
            f"{free_mb} MB available)")
    elif len(archs) > 1:
        log(f"the boards one after the other ({', '.join(archs)}): {why}")
    res = results.Results(out, {"mode": "quick" if a.quick else "full", "archs": archs,
                                "side_by_side": side_by_side, "serial_because": why,
                                "steps_after_cycle": list(steps), "image_built_on": a.image,
                                "started": time.strftime("%Y-%m-%d %H:%M:%S")})
    # SIGTERM unwinds like ^C: every VM, forward and proxy of the run is removed.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    work = Path(tempfile.mkdtemp(prefix="enorm-board-run-", dir="/var/tmp"))
    try:
        source = lab.snapshot_source(work / "src")
        run_boards(archs, steps, a.image, source, key, mirror, lines, pub, res,
                   from_cache=a.quick, side_by_side=side_by_side)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    res.save(complete=True)
    if not a.quick:
        report.plot(res.data, out.with_suffix(".png"))
    host = res.data["host"]
    log(f"results in {out}; total {res.data['total_s']:.0f} s, CPU "
        f"{host['cpu_s']['user'] + host['cpu_s']['system']:.0f} s "
        f"({host['cores_busy']} of {host['cores']} cores)")
    if failed := res.failed():
        log(f"FAILED: {', '.join(failed)}")
        sys.exit(1)


def run_boards(archs: list[str], steps: tuple[str, ...], image_on: str, source: Path, key: Path,
               mirror: str, lines: str, pub: str, res: results.Results, from_cache: bool,
               side_by_side: bool) -> None:
    # apt-cacher-ng reads its port as a signed 16-bit number: one below 32768.
    with aptproxy.AptProxy(lab.free_block(1, start=31400, stop=32000)[0]) as proxy:
        log(f"apt proxy on {proxy.url} (cache {proxy.cache})")
        live: dict[str, lab.BoardRun] = {}

        def one(arch: str) -> None:
            """A board from its disk to its last step; whatever ends it early (a failed
            preparation, an error of the lab, a stop) is recorded as its failure."""
            blog = parallel.prefixed(arch, log)
            try:
                board_run(arch, steps, image_on, source, key, mirror, lines, pub, res,
                          from_cache, proxy, blog, live)
            except BaseException as exc:
                why = ("stopped (^C or SIGTERM)" if isinstance(exc, KeyboardInterrupt)
                       else f"{type(exc).__name__}: {exc}")
                blog(f"FAILED: {why}")
                res.fail(arch, why)
                if not side_by_side:  # one after the other: as before, the run ends
                    raise

        if side_by_side:
            parallel.run({arch: (lambda arch=arch: one(arch)) for arch in archs}, live, log)
        else:
            for arch in archs:
                one(arch)


def board_run(arch: str, steps: tuple[str, ...], image_on: str, source: Path, key: Path,
              mirror: str, lines: str, pub: str, res: results.Results, from_cache: bool,
              proxy: aptproxy.AptProxy, log, live: dict[str, lab.BoardRun]) -> None:
    t = time.monotonic()
    d = disk.build(arch, mirror=mirror, sources_lines=lines, pubkey=pub, proxy=proxy.url,
                   progress=log)
    with parallel.WHEELHOUSE:
        w = wheelhouse.build(arch, source)
    tar, tar_s = image.tarball(arch, log) if image_on == "host" else (None, 0.0)
    res.put("prepare_s", arch, {"disk_build_s": d.build_s, "image_tarball_s": tar_s,
                                "total_s": round(time.monotonic() - t, 1)})
    cache = provisioned.find(provisioned.inputs(
        arch, d.digest, provisioned.role_packages(lab.ANSIBLE_DIR / "roles"), w))
    if from_cache and cache.disk is None:
        log(f"[{arch}] no valid provisioned disk ({cache.why_not}): provisioning "
            "from zero, and saving it for the next quick run")
    elif from_cache:
        log(f"[{arch}] starting from the provisioned disk {cache.disk}")
    board = lab.run_board(arch, d, key, apt_port=proxy.port, source=source, wheelhouse=w,
                          image_tarball=tar, steps=steps, log=log, cache=cache,
                          from_cache=from_cache,
                          on_step=lambda b: res.put("boards", b.arch, b.as_dict()),
                          on_run=lambda r: live.__setitem__(arch, r))
    res.put("boards", arch, board.as_dict())


if __name__ == "__main__":
    main()
