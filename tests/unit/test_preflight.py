"""Preflight against the /proc and /sys files of v1, hybrid and v2 machines (fixtures)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from enorm import preflight

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures" / "preflight"


def by_check(root: Path) -> dict[str, preflight.Finding]:
    return {f.check: f for f in preflight.run(root, live=False)}


@pytest.mark.parametrize("machine, kind", [("v1", "v1"), ("hybrid", "hybrid"), ("v2", "v2")])
def test_a_complete_machine_passes_in_each_layout(machine: str, kind: str) -> None:
    found = by_check(FIXTURES / machine)
    assert found["cgroup layout"].detail == kind
    assert not preflight.failures(list(found.values()))
    need = preflight.CONTROLLERS_V2 if kind == "v2" else preflight.CONTROLLERS_V1
    assert {f"cgroup {c}" for c in need} <= set(found)


def test_raspberry_pi_os_without_memory_is_refused_with_the_fix() -> None:
    findings = preflight.run(FIXTURES / "rpi-nomem", live=False)
    bad = preflight.failures(findings)
    assert [f.check for f in bad] == ["cgroup memory"]
    assert bad[0].detail == "disabled by the kernel command line"
    assert "cgroup_enable=memory cgroup_memory=1" in bad[0].fix
    assert "/boot/firmware/cmdline.txt" in bad[0].fix
    msg = preflight.message(findings)
    assert "cgroup memory" in msg and "cgroup_enable=memory" in msg


def test_a_kernel_that_ignores_cgroup_enable_is_told_apart(tmp_path: Path) -> None:
    """Raspberry Pi 5 kernels that keep memory off although cmdline.txt asks for it: the
    usual fix was applied already, so the message says what is left to do."""
    root = tmp_path / "m"
    shutil.copytree(FIXTURES / "rpi-nomem", root)
    (root / "proc/cmdline").write_text(
        "coherent_pool=1M console=tty1 root=PARTUUID=1-02 rootwait cgroup_disable=memory "
        "cgroup_enable=cpuset cgroup_enable=memory cgroup_memory=1\n")
    bad = preflight.failures(preflight.run(root, live=False))
    assert [f.check for f in bad] == ["cgroup memory"]
    assert bad[0].detail == "disabled although the command line has cgroup_enable=memory"
    assert "raspberrypi/linux issue 6980" in bad[0].fix
    assert "/proc/cmdline" in bad[0].fix
    # not asked yet: the usual fix, which also says where to look if it does not help
    (root / "proc/cmdline").write_text("console=tty1 root=/dev/mmcblk0p2 cgroup_disable=memory\n")
    bad = preflight.failures(preflight.run(root, live=False))
    assert bad[0].detail == "disabled by cgroup_disable=memory on the kernel command line"
    assert "cmdline.txt" in bad[0].fix and "6980" not in bad[0].fix


def test_a_board_booted_with_cgroup_disable_memory_is_told_to_remove_it(tmp_path: Path) -> None:
    """The lab's Debian board booted as the Pi kernels ship (cgroup v2, systemd, Debian's
    kernel through GRUB or the boot loader's command line): the word is named, and so are
    both fixes (remove it; where the firmware adds it, override it in cmdline.txt)."""
    root = tmp_path / "m"
    shutil.copytree(FIXTURES / "rpi-nomem", root)
    (root / "proc/cmdline").write_text(
        "BOOT_IMAGE=/vmlinuz-6.1.0-50-arm64 root=/dev/vda rw console=ttyAMA0 "
        "cgroup_disable=memory\n")
    findings = preflight.run(root, live=False)
    bad = preflight.failures(findings)
    assert [f.check for f in bad] == ["cgroup memory"]
    assert bad[0].detail == "disabled by cgroup_disable=memory on the kernel command line"
    assert bad[0].fix.startswith("remove `cgroup_disable=memory` from the kernel command line")
    assert "/etc/default/grub" in bad[0].fix and "update-grub" in bad[0].fix
    assert "cgroup_enable=memory" in bad[0].fix and "cmdline.txt" in bad[0].fix
    # the other controllers the command line does not name stay enabled
    assert {f.check for f in findings if f.ok} >= {"cgroup cpu", "cgroup cpuset", "cgroup pids"}
    msg = preflight.message(findings)
    assert "not starting" in msg and "cgroup_disable=memory" in msg


def test_v1_controller_enabled_but_not_mounted(tmp_path: Path) -> None:
    root = tmp_path / "m"
    shutil.copytree(FIXTURES / "v1", root)
    mounts = root / "proc/self/mounts"
    mounts.write_text("".join(ln + "\n" for ln in mounts.read_text().splitlines()
                              if not ln.endswith("pids 0 0")))
    bad = preflight.failures(preflight.run(root, live=False))
    assert [f.check for f in bad] == ["cgroup pids"]
    assert "not in a v1 mount" in bad[0].detail


def test_controller_missing_from_the_kernel(tmp_path: Path) -> None:
    root = tmp_path / "m"
    shutil.copytree(FIXTURES / "v2", root)
    cg = root / "proc/cgroups"
    cg.write_text("".join(ln + "\n" for ln in cg.read_text().splitlines()
                          if not ln.startswith("pids")))
    bad = preflight.failures(preflight.run(root, live=False))
    assert [(f.check, f.detail) for f in bad] == [("cgroup pids", "not built into this kernel")]


def test_v2_controller_enabled_but_not_available(tmp_path: Path) -> None:
    root = tmp_path / "m"
    shutil.copytree(FIXTURES / "v2", root)
    (root / "sys/fs/cgroup/cgroup.controllers").write_text("cpuset cpu io memory\n")
    bad = preflight.failures(preflight.run(root, live=False))
    assert [f.check for f in bad] == ["cgroup pids"]
    assert "cgroup.controllers" in bad[0].detail


def test_missing_tools_are_named() -> None:
    found = {f.check: f for f in preflight.check_tools(path="/nonexistent")}
    assert all(not f.ok and f.fix for f in found.values())
    assert "tool lxc-start" in found


@pytest.mark.parametrize("mounted,answers,ok,detail", [
    (True, True, True, "serving /var/lib/lxcfs"),
    (True, False, False, "stale mount (lxcfs is gone)"),
    (False, False, False, "not running"),
])
def test_lxcfs_must_answer_not_only_be_mounted(tmp_path: Path, mounted: bool, answers: bool,
                                               ok: bool, detail: str) -> None:
    (tmp_path / "proc/self").mkdir(parents=True)
    line = "lxcfs /var/lib/lxcfs fuse.lxcfs rw,nosuid,nodev 0 0\n" if mounted else ""
    (tmp_path / "proc/self/mounts").write_text("/dev/vda / ext4 rw 0 0\n" + line)
    if answers:
        (tmp_path / "var/lib/lxcfs/proc").mkdir(parents=True)
        (tmp_path / "var/lib/lxcfs/proc/meminfo").write_text("MemTotal: 65536 kB\n")
    found = preflight.check_lxcfs(tmp_path)
    assert (found.ok, found.detail) == (ok, detail)
    assert ok or "start lxcfs" in found.fix
    assert ("umount -l" in found.fix) == (mounted and not answers)
