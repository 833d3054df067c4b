#!/usr/bin/env bash
# Install everything enorm needs on a Debian machine, idempotently, reusing what is there:
# system packages, the project's venv (.venv), and the base container image.
#
#   scripts/setup.sh [--foreign ARCH]...
#
# --foreign ARCH (Debian names: arm64, armhf, armel, amd64): this machine will also build
# and run containers of ARCH (`make test`'s arm64 container): qemu-user-static and
# binfmt-support are installed and ARCH's emulator registered with binfmt_misc. Only
# then: `make demo` needs none of it.
set -euo pipefail
cd "$(dirname "$0")/.."

foreign=()
while [ $# -gt 0 ]; do
    case "$1" in
        --foreign) [ $# -ge 2 ] || { echo "setup: --foreign needs an ARCH" >&2; exit 2; }
                   foreign+=("$2"); shift 2 ;;
        *) echo "setup: unknown argument $1 (usage: setup.sh [--foreign ARCH]...)" >&2; exit 2 ;;
    esac
done
# The binfmt_misc entries the foreign architectures need (none for those the CPU runs).
qemu_name() {  # Debian architecture -> the name of its binfmt entry
    case "$1" in
        arm64) echo qemu-aarch64 ;; armhf|armel) echo qemu-arm ;; amd64) echo qemu-x86_64 ;;
        i386) echo qemu-i386 ;; riscv64) echo qemu-riscv64 ;; ppc64el) echo qemu-ppc64le ;;
        s390x) echo qemu-s390x ;;
        *) echo "setup: --foreign $1: not a Debian architecture this script knows" >&2; exit 2 ;;
    esac
}
native=$(dpkg --print-architecture)
entries=()
for a in "${foreign[@]}"; do
    case "$native:$a" in
        "$native:$native"|amd64:i386|arm64:armhf|arm64:armel) continue ;;  # the CPU runs it
    esac
    entries+=("$(qemu_name "$a")") || exit 2
done

if [ "$(id -u)" != 0 ]; then
    echo "setup: enorm manages LXC containers, iptables and bridges: run as root" >&2
    exit 1
fi

# chromium + its driver: the dashboard's browser test; libnetfilter-queue-dev: the
# testbed's NFQUEUE delayer (netfilterqueue builds against it); redis-redisearch: a Redis
# module whose values are of a type datasync has no merge rule for (the shared keys' test);
# prometheus: its promtool checks the node's /metrics exposition (the server is not
# started: policy-rc.d).
packages=(lxc lxc-dev redis-server redis-tools iptables iproute2 debootstrap openssh-client
          build-essential python3-dev python3-venv chromium chromium-driver
          libnetfilter-queue-dev lxcfs e2fsprogs redis-redisearch prometheus)
# Install those of the packages that are not installed (apt-get update first, only then).
install_missing() {
    local missing=() p
    for p in "$@"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
    done
    [ ${#missing[@]} -gt 0 ] || return 0
    echo "setup: installing ${missing[*]}"
    apt-get -o DPkg::Lock::Timeout=600 update -qq
    DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=600 install -y -qq \
        --no-install-recommends "${missing[@]}" >/dev/null
}
install_missing "${packages[@]}"

# JMeter (bench/jmeter.py): Debian's 2.13 cannot load a plan with bookworm's xstream 1.4.20
# (it forbids JMeter's classes), so the runner puts bullseye's xstream 1.4.15 first on the
# class path. That one jar is fetched through a private apt configuration (its own sources
# list, lists and cache in a temporary directory): the machine's apt sources stay as they are.
xstream_jar=/var/cache/enorm/jmeter/xstream-1.4.15.jar
install_missing jmeter jmeter-http default-jre-headless
if [ ! -f $xstream_jar ]; then
    echo "setup: fetching xstream 1.4.15 (bullseye) for jmeter"
    # The Debian archive of this machine's apt sources (or ENORM_DEBIAN_MIRROR): it serves
    # bullseye as well as the machine's own suite.
    mirror=$(python3 -m enorm.mirrors bullseye)
    tmp=$(mktemp -d /tmp/enorm-xstream.XXXXXX)
    trap 'rm -rf "$tmp"' EXIT
    echo "deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] $mirror bullseye main" \
        > "$tmp/sources.list"
    mkdir -p "$tmp/lists/partial" "$tmp/cache/archives/partial"
    aptopts=(-o Dir::Etc::SourceList="$tmp/sources.list" -o Dir::Etc::SourceParts=/dev/null
             -o Dir::State::Lists="$tmp/lists" -o Dir::Cache="$tmp/cache" -o APT::Sandbox::User=root)
    apt-get "${aptopts[@]}" update -qq
    (cd "$tmp" && apt-get "${aptopts[@]}" download -qq libxstream-java=1.4.15-3+deb11u2)
    dpkg-deb -x "$tmp"/libxstream-java_*.deb "$tmp/x"
    mkdir -p "$(dirname $xstream_jar)"
    cp "$tmp/x/usr/share/java/xstream.jar" "$xstream_jar.part" && mv "$xstream_jar.part" "$xstream_jar"
fi

# Foreign architectures: qemu-user through binfmt_misc. The registration's F flag makes
# the kernel open the emulator at registration time, so that ARCH's binaries also run
# inside containers and chroots that do not hold the emulator. binfmt_misc is not always
# mounted (no systemd here to do it); registrations do not survive a reboot, so every
# run checks them.
if [ ${#entries[@]} -gt 0 ]; then
    install_missing qemu-user-static binfmt-support
    binfmt=/proc/sys/fs/binfmt_misc
    if [ ! -e $binfmt/status ]; then
        echo "setup: mounting binfmt_misc on $binfmt"
        mount -t binfmt_misc binfmt_misc $binfmt
    fi
    for e in "${entries[@]}"; do
        if ! head -n1 "$binfmt/$e" 2>/dev/null | grep -qx enabled; then
            echo "setup: registering $e with binfmt_misc"
            update-binfmts --enable "$e"
        fi
        grep -q "^flags: .*F" "$binfmt/$e" \
            || { echo "setup: $e is registered without the F flag: containers cannot run it" >&2; exit 1; }
    done
fi

python=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    echo "setup: creating .venv"
    "$python" -m venv .venv
fi
stamp=.venv/.enorm-installed
want=$(cat setup.cfg pyproject.toml | sha256sum | cut -d' ' -f1)
if [ "$(cat $stamp 2>/dev/null)" != "$want" ]; then
    echo "setup: installing the project into .venv"
    .venv/bin/pip install -q --upgrade pip wheel >/dev/null
    .venv/bin/pip install -q -e '.[dev]' >/dev/null
    .venv/bin/python -c 'import enorm, lxc, redis, flask' # fails loudly if the install did
    echo "$want" > $stamp
fi

# wrk: the benches' load generator for the high-rate points (bench/jmeter.py, engine
# "wrk"; a fraction of JMeter's CPU per request). Its own block: the list above is shared.
if ! dpkg-query -W -f='${Status}' wrk 2>/dev/null | grep -q "install ok installed"; then
    echo "setup: installing wrk"
    apt-get -o DPkg::Lock::Timeout=600 update -qq
    DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=600 install -y -qq \
        --no-install-recommends wrk >/dev/null
fi

# Unprivileged containers (enorm/idmap.py): the host ids their roots map to, registered
# for root so that no other tool hands them out. Matches the config's defaults
# (idmap_start, idmap_count).
idrange="root:1200000000:16777216"
for f in /etc/subuid /etc/subgid; do
    if ! grep -qx "$idrange" "$f" 2>/dev/null; then
        echo "setup: registering $idrange in $f"
        echo "$idrange" >> "$f"
    fi
done

# lxcfs: a container's /proc/meminfo, /proc/cpuinfo and /sys/devices/system/cpu show its
# own limits (LXC's lxcfs hook mounts them when /var/lib/lxcfs is served). Started here
# unless something (its systemd unit) serves it already; --enable-cfs for the CPU view.
# A mount whose lxcfs is gone (killed with the shell that started it) is stale: reads
# fail with "Transport endpoint is not connected"; it is unmounted and lxcfs started
# again, in a session of its own so that the end of this job does not take it along.
lxcfs_serves() { head -c1 /var/lib/lxcfs/proc/meminfo >/dev/null 2>&1; }
if ! lxcfs_serves; then
    if grep -q " /var/lib/lxcfs fuse.lxcfs " /proc/self/mounts; then
        echo "setup: lxcfs mount on /var/lib/lxcfs is stale: unmounting it"
        umount -l /var/lib/lxcfs
    fi
    echo "setup: starting lxcfs on /var/lib/lxcfs"
    mkdir -p /var/lib/lxcfs
    setsid -f lxcfs --enable-cfs -p /run/lxcfs.pid /var/lib/lxcfs >/dev/null 2>&1 </dev/null
    for _ in $(seq 50); do
        lxcfs_serves && break
        sleep 0.1
    done
    lxcfs_serves || { echo "setup: lxcfs did not come up" >&2; exit 1; }
fi

.venv/bin/enorm image build debian | tail -n 3
