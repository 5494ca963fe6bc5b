#!/usr/bin/env bash
# Installs the Debian packages Multiverse needs on a host, once. Safe to run again.
# Arguments name more packages, for one use only (the Makefile's test-deps: chromium, openssh-server).
set -euo pipefail
pkgs=(qemu-system-x86 qemu-utils e2fsprogs iproute2 nftables iptables dnsmasq-base debootstrap postgresql "$@")
missing=()
for p in "${pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
[ ${#missing[@]} -eq 0 ] && exit 0
if [ "$(id -u)" -ne 0 ]; then
  echo "Multiverse needs these Debian packages: ${missing[*]}" >&2
  echo "Install them with: sudo apt-get install --no-install-recommends ${missing[*]}" >&2
  exit 1
fi
echo "installing ${missing[*]} ..."
# The tests run PostgreSQL as private clusters of their own (tests/postgres.py): no system
# cluster is wanted, so none is made at install.
if [[ " ${missing[*]} " == *" postgresql "* ]]; then
  mkdir -p /etc/postgresql-common/createcluster.d
  echo "create_main_cluster = false" > /etc/postgresql-common/createcluster.d/multiverse.conf
fi
apt-get update -qq
DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
