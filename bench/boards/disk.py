"""The VM disk of a board: Debian 12 with its kernel, systemd and sshd, cached.

Built offline from the Debian registry (through the lab's apt proxy) with debootstrap in
two stages: the first unpacks natively; the second configures the packages in a chroot,
under qemu-user for another architecture (binfmt with the F flag). The initramfs is built
once: Debian builds it twice during the second stage (the kernel's postinst, then the
initramfs-tools trigger), each a few minutes under qemu-user, so the second stage runs
with `INITRD=No` (the kernel's hook skips it, the trigger finds no initramfs to update)
and the lab then runs `update-initramfs -c` once, with only the modules a QEMU board
needs to mount its root (`MODULES=list`: virtio and ext4) instead of most of the tree.

The result is an ext4 image (`root.img`, sparse) and the kernel and initramfs beside it
under /var/cache/enorm/boards/<arch>/, with a stamp of what it was built from; a rerun
with the same recipe reuses it. A run never writes it: each VM boots a copy-on-write
overlay (`qemu-img create -b`), which the run removes.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import platform
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from bench.boards import at_nice

CACHE = Path("/var/cache/enorm/boards")
SUITE = "bookworm"
# What a freshly flashed board image has: a kernel, systemd, sshd and Python (Ansible
# needs it). Everything enorm needs comes from the playbook.
PACKAGES = ["initramfs-tools", "systemd-sysv", "udev", "dbus", "openssh-server", "python3",
            "iproute2", "kmod", "procps", "netbase"]
KERNEL = {"arm64": "linux-image-arm64", "amd64": "linux-image-amd64"}
# Enough to mount the root of a QEMU board (virtio-blk on PCI or MMIO, ext4).
INITRAMFS_MODULES = ["virtio_pci", "virtio_mmio", "virtio_blk", "ext4"]
SIZE = "8G"
# Bump when the customisation below changes: cached disks are built again.
REVISION = 1
# The VM's static address on QEMU's user-mode network (no DHCP, no DNS: nothing to
# resolve, nothing to ask).
GUEST = {"address": "10.0.2.15/24", "gateway": "10.0.2.2"}

Progress = Callable[[str], None]


@dataclass(frozen=True)
class Disk:
    """A built board disk: the image and what QEMU boots from it."""

    arch: str
    image: Path
    kernel: Path
    initrd: Path
    build_s: float  # how long it took to build (0 when it was found in the cache)
    digest: str = ""  # of its recipe (what a provisioned disk made from it is keyed by)


def recipe(arch: str, mirror_lines: str, pubkey: str) -> dict:
    """Everything the disk depends on: its stamp, so that a change builds it again."""
    return {"revision": REVISION, "arch": arch, "suite": SUITE,
            "packages": [KERNEL[arch], *PACKAGES], "modules": INITRAMFS_MODULES,
            "sources": mirror_lines, "pubkey": pubkey.strip(), "size": SIZE}


def digest(r: dict) -> str:
    return hashlib.sha256(json.dumps(r, sort_keys=True).encode()).hexdigest()[:16]


def host_arch() -> str:
    return {"x86_64": "amd64", "aarch64": "arm64"}.get(platform.machine(), platform.machine())


def ensure_binfmt(arch: str) -> None:
    """Foreign binaries run in the chroot through qemu-user (qemu-user-static's
    registration, F flag: no emulator copied into the root)."""
    if arch == host_arch():
        return
    qemu = {"arm64": "qemu-aarch64", "armhf": "qemu-arm"}[arch]
    misc = Path("/proc/sys/fs/binfmt_misc")
    if not (misc / "register").exists():
        subprocess.run(["mount", "-t", "binfmt_misc", "binfmt_misc", str(misc)], check=True)
    if not (misc / qemu).exists():
        subprocess.run(["update-binfmts", "--enable", qemu], check=True)


def _run(cmd: list[str], progress: Progress, env: dict | None = None, tail: int = 30) -> None:
    progress("$ " + " ".join(cmd[:6]) + (" ..." if len(cmd) > 6 else ""))
    p = subprocess.run([*at_nice(), *cmd], capture_output=True, text=True,
                       env={**os.environ, **(env or {})})
    if p.returncode != 0:
        out = (p.stdout + p.stderr).splitlines()[-tail:]
        raise RuntimeError(f"{cmd[0]} failed ({p.returncode}):\n" + "\n".join(out))


@contextlib.contextmanager
def _mounted_for_chroot(root: Path) -> Iterator[None]:
    """/proc, /sys and /dev in the chroot while the initramfs is built; always undone."""
    done: list[Path] = []
    try:
        for src, dst, how in (("proc", "proc", ["-t", "proc"]), ("sysfs", "sys", ["-t", "sysfs"]),
                              ("/dev", "dev", ["--bind"])):
            target = root / dst
            target.mkdir(exist_ok=True)
            subprocess.run(["mount", *how, src, str(target)], check=True)
            done.append(target)
        yield
    finally:
        for target in reversed(done):
            subprocess.run(["umount", "-l", str(target)], check=False)


def _customise(root: Path, arch: str, sources_lines: str, pubkey: str, progress: Progress) -> None:
    """What a board image has after its first-boot wizard: a name, a static address,
    root's SSH key; nothing of enorm's."""
    (root / "etc/hostname").write_text("enorm-board\n")
    (root / "etc/hosts").write_text("127.0.0.1 localhost\n127.0.1.1 enorm-board\n")
    (root / "etc/fstab").write_text("/dev/vda / ext4 rw,errors=remount-ro 0 1\n")
    (root / "etc/resolv.conf").unlink(missing_ok=True)
    (root / "etc/resolv.conf").write_text("# no DNS: the board lab's VMs resolve nothing\n")
    (root / "etc/apt/sources.list").write_text(sources_lines.strip() + "\n")
    net = root / "etc/systemd/network/10-enorm-board.network"
    net.write_text("[Match]\nType=ether\n\n[Network]\n"
                   f"Address={GUEST['address']}\nGateway={GUEST['gateway']}\n"
                   "LinkLocalAddressing=no\nIPv6AcceptRA=no\n")
    ssh = root / "root/.ssh"
    ssh.mkdir(mode=0o700, exist_ok=True)
    (ssh / "authorized_keys").write_text(pubkey.strip() + "\n")
    (ssh / "authorized_keys").chmod(0o600)
    # A new machine id at each boot of a fresh overlay, as on a freshly flashed card.
    (root / "etc/machine-id").write_text("")
    _run(["chroot", str(root), "systemctl", "enable", "systemd-networkd"], progress)
    (root / "etc/initramfs-tools/conf.d").mkdir(parents=True, exist_ok=True)
    (root / "etc/initramfs-tools/conf.d/enorm-board").write_text("MODULES=list\n")
    (root / "etc/initramfs-tools/modules").write_text("\n".join(INITRAMFS_MODULES) + "\n")


def build(arch: str, *, mirror: str, sources_lines: str, pubkey: str, proxy: str,
          progress: Progress = print, cache: Path = CACHE) -> Disk:
    """The cached disk of `arch`, built if missing or built from another recipe."""
    r = recipe(arch, sources_lines, pubkey)
    d = cache / arch
    image, kernel, initrd, stamp = d / "root.img", d / "vmlinuz", d / "initrd.img", d / "stamp"
    if stamp.exists() and stamp.read_text().strip() == digest(r) and image.exists():
        progress(f"disk {arch}: reusing {image}")
        return Disk(arch, image, kernel, initrd, 0.0, digest(r))
    t0 = time.monotonic()
    d.mkdir(parents=True, exist_ok=True)
    stamp.unlink(missing_ok=True)
    root = d / "root.tmp"
    _remove_tree(root)
    ensure_binfmt(arch)
    env = {"http_proxy": proxy, "DEBIAN_FRONTEND": "noninteractive"}
    progress(f"disk {arch}: debootstrap, first stage (unpacking natively)")
    _run(["debootstrap", "--foreign", "--variant=minbase", f"--arch={arch}",
          "--include=" + ",".join(r["packages"]), SUITE, str(root), mirror], progress, env)
    progress(f"disk {arch}: debootstrap, second stage (configuring"
             f"{'' if arch == host_arch() else ', under qemu-user'}; no initramfs yet)")
    _run(["chroot", str(root), "/debootstrap/debootstrap", "--second-stage"], progress,
         {**env, "INITRD": "No"})
    _customise(root, arch, sources_lines, pubkey, progress)
    versions = sorted(p.name.removeprefix("vmlinuz-") for p in (root / "boot").glob("vmlinuz-*"))
    if len(versions) != 1:
        raise RuntimeError(f"disk {arch}: expected one kernel in /boot, found {versions}")
    progress(f"disk {arch}: the initramfs, once ({versions[0]})")
    with _mounted_for_chroot(root):
        _run(["chroot", str(root), "update-initramfs", "-c", "-k", versions[0]], progress)
    shutil.copyfile(root / f"boot/vmlinuz-{versions[0]}", kernel)
    shutil.copyfile(root / f"boot/initrd.img-{versions[0]}", initrd)
    progress(f"disk {arch}: ext4 image ({SIZE}, sparse)")
    image.unlink(missing_ok=True)
    _run(["mkfs.ext4", "-q", "-F", "-L", "enorm-board", "-d", str(root), str(image), SIZE],
         progress)
    _remove_tree(root)
    stamp.write_text(digest(r) + "\n")
    (d / "recipe.json").write_text(json.dumps(r, indent=1) + "\n")
    return Disk(arch, image, kernel, initrd, round(time.monotonic() - t0, 1), digest(r))


def _remove_tree(root: Path) -> None:
    """A half-built root may still have the chroot's mounts: undo them first."""
    if not root.exists():
        return
    for sub in ("dev", "sys", "proc"):
        subprocess.run(["umount", "-l", str(root / sub)], capture_output=True, check=False)
    inside = [ln.split()[1] for ln in Path("/proc/self/mounts").read_text().splitlines()
              if ln.split()[1].startswith(str(root) + "/")]
    if inside:  # never delete through a mount into the host's /dev or /proc
        raise RuntimeError(f"{root}: still mounted below it: {inside}")
    shutil.rmtree(root)
