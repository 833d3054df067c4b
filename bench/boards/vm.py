"""One board VM under QEMU (TCG): restricted user-mode network, SSH, reboot, stop.

The VM's network is QEMU's user-mode stack with `restrict=on`: the guest reaches neither
the host nor anything beyond, except through the forwards a run names. `guestfwd` entries
connect a guest address (HOST_ALIAS:port) to a service on the host's 127.0.0.1 (the apt
proxy, the cloud's Redis and HTTP server), one `socat` per connection; `hostfwd` entries
publish guest ports on the host's 127.0.0.1 only (SSH, the node's API, the node's host
ports, each under the same number as in the guest, so that the endpoints the node hands
out hold on the host too).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from bench.boards import at_nice
from bench.boards.disk import GUEST, Disk

# The host as the guest sees it through the guestfwd entries.
HOST_ALIAS = "10.0.2.100"
PREFIX = "enorm-board-"
MACHINE = {
    "arm64": ("qemu-system-aarch64", ["-M", "virt", "-cpu", "cortex-a72"], "ttyAMA0"),
    "amd64": ("qemu-system-x86_64", ["-M", "q35", "-cpu", "max"], "ttyS0"),
}


@dataclass
class Spec:
    """What one VM boots with; `hostfwd` maps host port -> guest port, `guestfwd` guest
    port (at HOST_ALIAS) -> host port on 127.0.0.1."""

    arch: str
    disk: Disk
    overlay: Path
    console: Path
    pidfile: Path
    cpus: int = 4
    memory_mb: int = 1024
    cmdline_extra: str = ""
    hostfwd: dict[int, int] = field(default_factory=dict)
    guestfwd: dict[int, int] = field(default_factory=dict)
    # What the overlay is made on: the fresh disk (raw), or a provisioned one (qcow2).
    backing: Path | None = None

    @property
    def backing_disk(self) -> tuple[Path, str]:
        if self.backing is None:
            return self.disk.image, "raw"
        return self.backing, "qcow2"


def netdev(spec: Spec) -> str:
    """The `-nic` of the VM: restricted, IPv4 only, exactly the forwards named."""
    net = GUEST["gateway"].rsplit(".", 1)[0] + ".0/24"
    parts = ["user", "model=virtio-net-pci", "restrict=on", "ipv6=off", f"net={net}",
             f"host={GUEST['gateway']}"]
    parts += [f"hostfwd=tcp:127.0.0.1:{h}-:{g}" for h, g in sorted(spec.hostfwd.items())]
    parts += [f"guestfwd=tcp:{HOST_ALIAS}:{g}-cmd:socat STDIO TCP:127.0.0.1:{h}"
              for g, h in sorted(spec.guestfwd.items())]
    return ",".join(parts)


def kernel_cmdline(spec: Spec) -> str:
    console = MACHINE[spec.arch][2]
    return " ".join(filter(None, [f"console={console}", "root=/dev/vda", "rw",
                                  spec.cmdline_extra]))


def command(spec: Spec) -> list[str]:
    binary, machine, _ = MACHINE[spec.arch]
    return [
        binary, *machine, "-name", f"{PREFIX}{spec.arch}",
        "-smp", str(spec.cpus), "-m", str(spec.memory_mb), "-accel", "tcg,thread=multi",
        "-kernel", str(spec.disk.kernel), "-initrd", str(spec.disk.initrd),
        "-append", kernel_cmdline(spec),
        "-drive", f"file={spec.overlay},format=qcow2,if=virtio",
        "-nic", netdev(spec),
        "-display", "none", "-monitor", "none", "-serial", f"file:{spec.console}",
        "-pidfile", str(spec.pidfile),
    ]


class VM:
    """A VM of this run: its overlay, console log and QEMU process are its own."""

    def __init__(self, arch: str, disk: Disk, key: Path, *, ssh_port: int,
                 hostfwd: dict[int, int], guestfwd: dict[int, int],
                 cmdline_extra: str = "", memory_mb: int = 1024, cpus: int = 4,
                 backing: Path | None = None) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix=f"{PREFIX}{arch}-", dir="/var/tmp"))
        self.key = key
        self.ssh_port = ssh_port
        self.spec = Spec(arch, disk, self.dir / "overlay.qcow2", self.dir / "console.log",
                         self.dir / "qemu.pid", cpus, memory_mb, cmdline_extra,
                         {ssh_port: 22, **hostfwd}, dict(guestfwd), backing)
        self.proc: subprocess.Popen | None = None

    # -- lifecycle ----------------------------------------------------------------------
    def start(self) -> None:
        """Boot a fresh copy-on-write overlay of the cached disk, fresh or provisioned
        (which stays pristine)."""
        image, fmt = self.spec.backing_disk
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-F", fmt, "-b",
                        str(image), str(self.spec.overlay)], check=True)
        self._launch()

    def poweroff(self, timeout: float = 300) -> float:
        """Shut the guest down cleanly (systemd stops the services and unmounts the file
        system; QEMU then exits and closes the overlay): seconds it took. Raises if QEMU
        is still running after `timeout` (then it is killed: the disk is not clean)."""
        t0 = time.monotonic()
        with contextlib.suppress(subprocess.TimeoutExpired):  # the session dies with it
            self.run("systemctl poweroff", check=False, timeout=30)
        p = self.proc
        assert p is not None
        try:
            p.wait(timeout)
        except subprocess.TimeoutExpired:
            self.stop()
            raise TimeoutError(f"the {self.spec.arch} VM did not power off in {timeout:.0f} s; "
                               f"console:\n{self.console_tail()}") from None
        self.proc = None
        return time.monotonic() - t0

    def boot_again(self) -> None:
        """Power on the same overlay again (after `poweroff`)."""
        self._launch()

    def restart(self, cmdline_extra: str = "") -> None:
        """Power off and boot the same overlay again, with another kernel command line
        (as an operator who edits a board's cmdline.txt)."""
        self.stop()
        self.spec.cmdline_extra = cmdline_extra
        self._launch()

    def _launch(self) -> None:
        log = open(self.dir / "qemu.log", "ab")  # noqa: SIM115
        self.proc = subprocess.Popen([*at_nice(), *command(self.spec)],
                                     stdout=log, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, start_new_session=True)
        log.close()

    def stop(self) -> None:
        """Kill this run's QEMU (by pid; its socat children end with their sockets)."""
        p, self.proc = self.proc, None
        if p is not None and p.poll() is None:
            os.killpg(p.pid, signal.SIGTERM)
            try:
                p.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()

    def remove(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)

    def console_tail(self, n: int = 40) -> str:
        try:
            lines = self.spec.console.read_text(errors="replace").splitlines()
        except OSError:
            return ""
        return "\n".join(lines[-n:])

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    # -- SSH ----------------------------------------------------------------------------
    def ssh_args(self) -> list[str]:
        return ["ssh", "-i", str(self.key), "-p", str(self.ssh_port),
                "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null",
                "-o", "LogLevel=ERROR", "-o", "BatchMode=yes", "-o", "ConnectTimeout=10",
                "-o", "ServerAliveInterval=15", "root@127.0.0.1"]

    def run(self, cmd: str, *, check: bool = True, timeout: float = 600,
            input: str | None = None) -> subprocess.CompletedProcess:
        p = subprocess.run([*self.ssh_args(), cmd], capture_output=True, text=True,
                           timeout=timeout, input=input)
        if check and p.returncode != 0:
            raise RuntimeError(f"on the {self.spec.arch} VM: `{cmd}` exited {p.returncode}:\n"
                               f"{(p.stdout + p.stderr)[-3000:]}")
        return p

    def wait_ssh(self, timeout: float = 600) -> float:
        """Seconds until root's SSH session works (the boot as a user sees it)."""
        t0 = time.monotonic()
        while True:
            if not self.alive():
                raise RuntimeError(f"QEMU ({self.spec.arch}) exited; console:\n"
                                   + self.console_tail())
            try:
                if self.run("true", check=False, timeout=30).returncode == 0:
                    return time.monotonic() - t0
            except subprocess.TimeoutExpired:
                pass
            if time.monotonic() - t0 > timeout:
                raise TimeoutError(f"the {self.spec.arch} VM gave no SSH session in "
                                   f"{timeout:.0f} s; console:\n{self.console_tail()}")
            time.sleep(2)

    def boot_id(self) -> str:
        return self.run("cat /proc/sys/kernel/random/boot_id").stdout.strip()

    def reboot(self, timeout: float = 900) -> float:
        """Reboot from inside (systemd); seconds until SSH answers from the new boot."""
        before = self.boot_id()
        t0 = time.monotonic()
        self.run("systemctl reboot", check=False, timeout=30)
        while True:
            time.sleep(3)
            self.wait_ssh(max(1.0, timeout - (time.monotonic() - t0)))
            try:
                if self.boot_id() != before:
                    return time.monotonic() - t0
            except (RuntimeError, subprocess.TimeoutExpired):
                pass

    def __enter__(self) -> VM:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()
