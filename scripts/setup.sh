#!/usr/bin/env bash
# Install everything enorm needs on a Debian machine, idempotently, reusing what is there:
# system packages, the project's venv (.venv), and the base container image.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "$(id -u)" != 0 ]; then
    echo "setup: enorm manages LXC containers, iptables and bridges: run as root" >&2
    exit 1
fi

# chromium + its driver: the dashboard's browser test; libnetfilter-queue-dev: the
# testbed's NFQUEUE delayer (netfilterqueue builds against it).
packages=(lxc lxc-dev redis-server redis-tools iptables iproute2 debootstrap openssh-client
          build-essential python3-dev python3-venv chromium chromium-driver
          libnetfilter-queue-dev)
missing=()
for p in "${packages[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
    echo "setup: installing ${missing[*]}"
    apt-get -o DPkg::Lock::Timeout=600 update -qq
    DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=600 install -y -qq \
        --no-install-recommends "${missing[@]}" >/dev/null
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

.venv/bin/enorm image build debian | tail -n 3
