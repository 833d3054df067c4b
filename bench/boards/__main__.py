"""`python -m bench.boards [--quick] [--arch arm64,amd64] [--steps reboot,nomem]`: the
board lab (make boards).

Full run: both boards provisioned from zero, every step, figures into
bench/results/boards.json (+ .png).
`--quick`: one board (amd64), the cycle alone, results to /tmp/enorm-boards-quick.json;
it boots the board's provisioned disk saved by an earlier run (`provisioned`) and runs the
playbook once, converging; without a valid one it provisions from zero and saves it.
`--steps`: the cycle and then only these of the later steps (lab.LATER_STEPS), e.g.
`--arch arm64 --steps nomem` for the board booted without its memory controller.
Exits 1 when a board failed a check (what failed is in the results and on stderr).
"""

from __future__ import annotations

import argparse
import json
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from bench.boards import aptproxy, disk, image, lab, provisioned, report, sources, wheelhouse

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
    a = ap.parse_args()
    archs = (a.arch or ("amd64" if a.quick else "arm64,amd64")).split(",")
    steps = (() if a.quick else lab.LATER_STEPS) if a.steps is None else tuple(
        filter(None, a.steps.split(",")))
    if unknown := set(steps) - set(lab.LATER_STEPS):
        ap.error(f"--steps: no step {', '.join(sorted(unknown))} "
                 f"(the steps: {', '.join(lab.LATER_STEPS)})")
    out = a.out or (Path("/tmp/enorm-boards-quick.json") if a.quick
                    else RESULTS / "boards.json")
    t0 = time.monotonic()
    ensure_packages()
    key = ensure_key()
    pub = key.with_suffix(".pub").read_text()
    lines = sources.debian_lines(disk.SUITE)
    mirror = sources.debian_mirror(disk.SUITE)
    results: dict = {"mode": "quick" if a.quick else "full", "archs": archs,
                     "steps_after_cycle": list(steps), "boards": {},
                     "image_built_on": a.image,
                     "prepare_s": {}, "started": time.strftime("%Y-%m-%d %H:%M:%S")}
    # SIGTERM unwinds like ^C: every VM, forward and proxy of the run is removed.
    signal.signal(signal.SIGTERM, signal.default_int_handler)

    def save(complete: bool = False) -> None:
        results["complete"] = complete
        results["total_s"] = round(time.monotonic() - t0, 1)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_suffix(".tmp")
        tmp.write_text(json.dumps(results, indent=1) + "\n")
        tmp.replace(out)

    work = Path(tempfile.mkdtemp(prefix="enorm-board-run-", dir="/var/tmp"))
    try:
        source = lab.snapshot_source(work / "src")
        run_boards(archs, steps, a.image, source, key, mirror, lines, pub, results, save,
                   from_cache=a.quick)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    save(complete=True)
    if not a.quick:
        report.plot(results, out.with_suffix(".png"))
    log(f"results in {out}; total {results['total_s']:.0f} s")
    failed = {k: b["failed"] for k, b in results["boards"].items() if b["failed"]}
    if failed:
        log(f"FAILED: {', '.join(failed)}")
        sys.exit(1)


def run_boards(archs: list[str], steps: tuple[str, ...], image_on: str, source: Path, key: Path,
               mirror: str, lines: str, pub: str, results: dict,
               save: Callable[[], None], from_cache: bool) -> None:
    # apt-cacher-ng reads its port as a signed 16-bit number: one below 32768.
    with aptproxy.AptProxy(lab.free_block(1, start=31400, stop=32000)[0]) as proxy:
        log(f"apt proxy on {proxy.url} (cache {proxy.cache})")
        for arch in archs:
            t = time.monotonic()
            d = disk.build(arch, mirror=mirror, sources_lines=lines, pubkey=pub,
                           proxy=proxy.url, progress=log)
            w = wheelhouse.build(arch, source)
            tar, tar_s = image.tarball(arch, log) if image_on == "host" else (None, 0.0)
            results["prepare_s"][arch] = {"disk_build_s": d.build_s, "image_tarball_s": tar_s,
                                          "total_s": round(time.monotonic() - t, 1)}
            cache = provisioned.find(provisioned.inputs(
                arch, d.digest, provisioned.role_packages(lab.ANSIBLE_DIR / "roles"), w))
            if from_cache and cache.disk is None:
                log(f"[{arch}] no valid provisioned disk ({cache.why_not}): provisioning "
                    "from zero, and saving it for the next quick run")
            elif from_cache:
                log(f"[{arch}] starting from the provisioned disk {cache.disk}")

            def step_done(board: lab.Board) -> None:
                results["boards"][board.arch] = board.as_dict()
                save()

            board = lab.run_board(arch, d, key, apt_port=proxy.port, source=source,
                                  wheelhouse=w, image_tarball=tar, steps=steps, log=log,
                                  cache=cache, from_cache=from_cache, on_step=step_done)
            results["boards"][arch] = board.as_dict()
            save()


if __name__ == "__main__":
    main()
