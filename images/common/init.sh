#!/bin/sh
# PID 1 of an enorm edge server: give the container its own SSH host key, start sshd and
# the tenant's Redis, then keep running until the edge manager stops the container.
# Kept in sh: a minbase rootfs has no init system, and start-up must take milliseconds.
set -u
[ -s /etc/ssh/ssh_host_ed25519_key ] || ssh-keygen -q -t ed25519 -N '' -f /etc/ssh/ssh_host_ed25519_key
mkdir -p /run/sshd /var/log/enorm-app /var/lib/redis
/usr/sbin/sshd -e
redis-server /etc/redis/enorm.conf
# The tenant's server, if one was started before this container was (re)started.
/usr/local/bin/enorm-app resume
# Processes the deployer starts with `enorm-app` are supervised there, not here.
trap 'exit 0' TERM INT PWR
while :; do
    sleep 3600 &
    wait $!
done
