"""The board lab: enorm on emulated boards (issue 25).

Two QEMU virtual machines stand in for 1 GB single-board computers: Debian 12 arm64
(`-M virt -cpu cortex-a72`, the Raspberry Pi 4's architecture) and Debian 12 amd64, each
with 4 vCPUs, 1 GB, systemd and a unified cgroup v2 tree, emulated with TCG (this machine
has no working KVM). Nothing is installed on a VM by hand: the project's Ansible playbook
provisions it over SSH, then the host's cloud manager runs the whole cycle against the
board's node, and the lab checks limits from inside a container, the pressure watcher, a
reboot and a board without a memory controller.

Pieces, one per concept:

- `sources`: where packages come from, read from this machine's apt configuration;
- `aptproxy`: apt-cacher-ng on 127.0.0.1, the VMs' only way to Debian packages;
- `wheelhouse`: the project's Python dependencies for the VM's platform (pip download);
- `disk`: the VM disk (debootstrap, kernel, one initramfs), cached under
  /var/cache/enorm/boards; every run boots a copy-on-write overlay of it;
- `provisioned`: the board's disk as the playbook left it, cached for the quick runs
  (keyed by the base disk, the roles' packages and the Python pins);
- `vm`: one QEMU VM: user-mode network restricted to the forwards a run names, SSH;
- `cloud`: the cloud tier on the host (Redis, game server, cloud manager);
- `lab`: the scenario and its figures (`python -m bench.boards`, `make boards`);
- `parallel`: the boards side by side, one thread each, and when the host has no room;
- `results`: the run's results file, written as it goes by both boards.

Everything it starts is named `enorm-board-*` and stopped (by pid) or removed at the end,
also on failure.
"""

import os

# Long work runs at nice 10 on this shared machine (GUIDE), and no lower: `make boards`
# is at 10 already, and 10 more on top put the VM at 19, where it got about a seventh of
# the CPU share of everyone else's nice-10 work and a boot took minutes under load.
NICENESS = 10


def at_nice() -> list[str]:
    """The prefix that runs a command at NICENESS (from wherever this process is)."""
    return ["nice", "-n", str(max(0, NICENESS - os.nice(0)))]
